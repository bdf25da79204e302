"""From per-reply rows to per-prompt rows and one summary per model (pandas owns the tables).

Prompts are the units: the n samples of a prompt are averaged first, then every number is a mean over prompts with
a normal-approximation interval over prompts (prefopt.judge.stats.mean_interval), so n samples of one prompt are
never counted as n independent observations. Per prompt:

* ``<judge>``: the mean score of its n replies (mean@n); the first judge is the ``score`` judged against;
* ``win_rate``: the mean over its samples j of the paired win of reply j against the baseline's reply j to the same
  prompt, drawn with the same seed (1 above, 1/2 tie, 0 below);
* ``kl``, ``length``, ``entropy``, ``logp``: means over its replies;
* ``correct`` (replies with score >= the pass threshold) and ``pass@k`` for k = 1, 2, 4, ..., n (Chen et al. 2021's
  unbiased estimator), where the reward is verifiable: a threshold is given, or every score is 0 or 1 (then 1).

The summary of a model holds the mean over prompts of each column and, for the judges, ``win_rate`` and ``kl``,
their intervals ``<name>_ci = [low, high]`` at ``level``; ``preference_summary`` does the same for pair rows.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from prefopt.judge.stats import ks_for, mean_interval, pass_at_k, paired_wins

MEASURES = ("kl", "length", "entropy", "logp")
PLACE = ["prompt_index", "sample"]


def verifiable_threshold(scores: pd.Series, threshold: float | None) -> float | None:
    """The pass threshold: the one given, 1.0 when every score is 0 or 1, else None (pass@k not defined)."""
    if threshold is not None:
        return threshold
    return 1.0 if len(scores) and scores.isin([0.0, 1.0]).all() else None


def prompt_frame(rows: list[dict[str, Any]], judges: list[str], baseline: list[dict[str, Any]] | None = None,
                 threshold: float | None = None) -> pd.DataFrame:
    """One row per prompt (module docstring) from one model's reply rows; ``baseline``: the baseline's reply rows
    on the same prompts and samples (every (prompt_index, sample) of ``rows`` must be there)."""
    frame = pd.DataFrame(rows)
    score = judges[0] if judges else None
    columns = [c for c in (*judges, *MEASURES) if c in frame]
    if score is not None and baseline is not None:
        theirs = pd.DataFrame(baseline)[[*PLACE, score]].rename(columns={score: "baseline"})
        frame = frame.merge(theirs, on=PLACE, how="left", validate="one_to_one")
        if frame["baseline"].isna().any():
            missing = frame.loc[frame["baseline"].isna(), PLACE].iloc[0].tolist()
            raise ValueError(f"the baseline has no reply to prompt {missing[0]} sample {missing[1]}: judge models on "
                             "the same prompts and samples")
        frame["win_rate"] = paired_wins(frame[score].tolist(), frame["baseline"].tolist())
        columns.append("win_rate")
    grouped = frame.groupby("prompt_index", sort=True)
    out = grouped[columns].mean()
    out.insert(0, "samples", grouped.size())
    passed = verifiable_threshold(frame[score], threshold) if score is not None else None
    if passed is not None:
        out["correct"] = grouped[score].apply(lambda s: int((s >= passed).sum()))
        for k in ks_for(int(out["samples"].min())):
            out[f"pass@{k}"] = [pass_at_k(n, c, k) for n, c in zip(out["samples"], out["correct"])]
    out = out.reset_index()
    out.attrs["unit_interval"] = [c for c in out.columns if c == "win_rate" or c.startswith("pass@")
                                  or (c in judges and frame[c].dropna().isin([0.0, 1.0]).all())]
    return out


def summarise(prompts: pd.DataFrame, level: float = 0.95) -> dict[str, Any]:
    """Means over prompts of every column of a ``prompt_frame``, with intervals for the scores, win rate and KL
    (clipped to [0, 1] for a win rate, a pass@k and a judge whose every score is 0 or 1)."""
    summary: dict[str, Any] = {"prompts": len(prompts), "samples_per_prompt": int(prompts["samples"].min())}
    unit = prompts.attrs.get("unit_interval", [])
    for column in prompts.columns:
        if column in ("prompt_index", "samples", "correct"):
            continue
        mean, low, high = mean_interval(prompts[column].tolist(), level,
                                        (0.0, 1.0) if column in unit else (-math.inf, math.inf))
        summary[column] = mean
        if not column.startswith("pass@") and column not in ("length", "entropy", "logp"):
            summary[f"{column}_ci"] = [low, high]
    return summary


def preference_summary(pairs: list[dict[str, Any]], level: float = 0.95) -> dict[str, Any]:
    """``implicit_acc`` and ``logprob_acc`` over the pairs, the first with its interval, and the pair count."""
    frame = pd.DataFrame(pairs)
    mean, low, high = mean_interval(frame["implicit_acc"].tolist(), level, (0.0, 1.0))
    return {"pairs": len(frame), "implicit_acc": mean, "implicit_acc_ci": [low, high],
            "logprob_acc": float(frame["logprob_acc"].mean())}


def table(summaries: dict[str, dict[str, Any]], judges: list[str]) -> str:
    """The short table of the command line: one row per model, the judged numbers with their intervals."""
    shown = [*judges, "win_rate", "kl", "length", "entropy"]
    records = []
    for model, summary in summaries.items():
        record: dict[str, Any] = {"model": model, "prompts": summary.get("prompts")}
        for name in shown:
            if name in summary:
                record[name] = _with_interval(summary[name], summary.get(f"{name}_ci"))
        record.update({k: f"{v:.3f}" for k, v in summary.items() if k.startswith("pass@")})
        if "implicit_acc" in summary:
            record["pref_acc"] = _with_interval(summary["implicit_acc"], summary.get("implicit_acc_ci"))
        records.append(record)
    return pd.DataFrame(records).set_index("model").fillna("").to_string()


def _with_interval(value: float, interval: list[float] | None) -> str:
    if interval is None or any(math.isnan(x) for x in interval):
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
