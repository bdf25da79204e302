"""The report's tables (pandas frames; each is also written as a CSV) and their markdown.

* ``frontier``: every (label, setting, checkpoint): cells, mean KL, gold with its 95% interval, the length-adjusted
  gold ``gold - slope (length - start length)``, length, conditional accuracy, proxy, entropy, win rate vs the start;
* ``fits``: Gao et al.'s alpha, beta, R^2 and fitted peak per curve (setting), from its mean points; a peak more than
  2x past the largest measured KL is an extrapolation and is not shown (``peak`` says where it lies);
* ``best``: each label's best point under the KL budget, with its interval, win rate against the start and the
  variance decomposition of its gold (shares of the grand mean's variance carried by draws / seeds / prompts);
* ``footing``: the budget actually spent per label (run.json ``cost``), means over its finished runs;
* ``pref``: implicit-reward preference accuracy on held-out pairs (pref.json) at the last step, per setting;
* ``runs``: every planned run: status, error, and its last checkpoint's numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from prefopt.bench.report.curves import Arrays, column
from prefopt.bench.report.frontier import gao_fit
from prefopt.bench.report.reading import RunDir
from prefopt.bench.report.stats import nested_interval, variance_shares
from prefopt.bench.report.views import best_point, frontier_rows

COST = ["updates", "samples", "tokens", "flops", "labels_consumed", "epochs_over_pairs", "wall_s", "cpu_s",
        "peak_rss_mb"]


def start_means(arrays: Arrays) -> dict[str, float]:
    """Mean gold / length / cond_acc of the start over draws and eval prompts."""
    if not arrays.start:
        return {"gold": float("nan"), "length": float("nan"), "cond_acc": float("nan")}
    stacked = np.stack(list(arrays.start.values()))
    return {name: float(np.nanmean(stacked[..., column(name)])) if not np.isnan(stacked[..., column(name)]).all()
            else float("nan") for name in ("gold", "length", "cond_acc")}


def frontier_table(arrays: Arrays, slope: float) -> pd.DataFrame:
    start = start_means(arrays)
    rows = [row for label in arrays.labels.values() for row in frontier_rows(arrays, label)]
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["gold length-adjusted"] = frame["gold"] - slope * (frame["length"] - start["length"])
    return frame


def fits_table(frontier: pd.DataFrame, arrays: Arrays) -> pd.DataFrame:
    start_gold = start_means(arrays)["gold"]
    rows = []
    for (label, value), curve in frontier.groupby(["label", "value"], dropna=False, sort=False):
        form = "bon" if str(label).startswith("best_of_n") else "rl"
        fit = gao_fit(curve["kl"].to_numpy(), curve["gold"].to_numpy() - start_gold, form)
        measured = float(curve["kl"].max())
        rows.append({"label": label, "value": value, "form": "d(alpha - beta d)" if form == "bon"
                     else "d(alpha - beta log d)", **fit, "max measured kl": measured,
                     "peak": _peak_note(fit["peak_kl"], fit["beta"], measured)})
        if rows[-1]["peak"].startswith("beyond"):  # an extrapolation is not a finding
            rows[-1].update(peak_kl=float("nan"), peak_reward=float("nan"))
    return pd.DataFrame(rows)


def _peak_note(peak_kl: float, beta: float, measured: float) -> str:
    """Where the fitted peak lies against the measured KLs (Gao et al.: gold peaks, then falls, under a proxy)."""
    if math.isnan(beta):
        return "no fit (< 3 points with KL > 0)"
    if beta <= 0 or math.isnan(peak_kl):
        return "none: still rising (beta <= 0)"
    if peak_kl <= measured:
        return "within the measured KL"
    return "past the measured KL (<= 2x)" if peak_kl <= 2 * measured else "beyond 2x the measured KL: not shown"


def best_table(arrays: Arrays, budget: float, slope: float, chosen: dict[str, object]) -> pd.DataFrame:
    start = start_means(arrays)
    rows = []
    for label in arrays.labels.values():
        point, note = best_point(label, budget, chosen.get(label.name))
        row: dict[str, Any] = {"label": label.name, "phase": label.phase, "setting": point.setting, "step": point.step,
                               "cells": f"{len(point.cells)}/{len(label.cells)}", "chosen": note}
        if point.cells:
            array = point.array(arrays.draws)
            gold, win = (nested_interval(array[..., column(c)]) for c in ("gold", "win"))
            shares = variance_shares(array[..., column("gold")]) if array.shape[0] > 1 else {}
            row.update({"kl": float(np.mean(list(point.kl.values()))), "gold": gold.mean, "gold_lo": gold.lo,
                        "gold_hi": gold.hi, "win vs start": win.mean, "win_lo": max(win.lo, 0.0),
                        "win_hi": min(win.hi, 1.0),
                        "length": point.mean("length"), "cond_acc": point.mean("cond_acc"),
                        **{f"share {k}": v for k, v in shares.items()}})
            row["gold length-adjusted"] = gold.mean - slope * (row["length"] - start["length"])
        rows.append(row)
    return pd.DataFrame(rows)


def footing_table(data: RunDir) -> pd.DataFrame:
    runs = data.runs
    if runs.empty or "label" not in runs:
        return pd.DataFrame()
    done = runs[(runs["status"] == "done") & runs.get("phase", pd.Series("main", index=runs.index)).isin(
        ["main", "oracle"])]
    rows = []
    for label, group in done.groupby("label", sort=False):
        row = {"label": label, "algorithm": group["algorithm"].iloc[0] if "algorithm" in group else label,
               "policy class": group["policy_class"].iloc[0] if "policy_class" in group else "", "runs": len(group)}
        for name in COST:
            key = f"cost.{name}"
            row[name] = float(pd.to_numeric(group[key], errors="coerce").mean()) if key in group else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def pref_table(data: RunDir) -> pd.DataFrame:
    """Per (label, setting) at each run's last step: the share of held-out pairs whose implicit reward margin
    favours the draw's label (``vs labels``, ties 1/2) and the true order (``vs true``, pairs of distinct true
    reward), means over the runs with intervals over draws."""
    pref = data.pref
    if pref.empty or "margin" not in pref:
        return pd.DataFrame()
    last = pref[pref["step"] == pref.groupby("id")["step"].transform("max")].copy()
    last["vs labels"] = (last["margin"] > 0) + 0.5 * (last["margin"] == 0)
    if "true_sign" in last:
        last["vs true"] = np.where(last["true_sign"] == 0, np.nan, np.sign(last["margin"]) == last["true_sign"])
    per_run = last.groupby(["label", "value", "draw", "seed", "id"], dropna=False)[
        [c for c in ("vs labels", "vs true") if c in last]].mean().reset_index()
    rows = []
    for (label, value), group in per_run.groupby(["label", "value"], dropna=False, sort=False):
        row = {"label": label, "value": value, "step": int(last.loc[last["label"] == label, "step"].max()),
               "runs": len(group), "pairs": int(last[last["id"] == group["id"].iloc[0]]["k"].nunique())}
        draws = sorted(set(group["draw"]))
        for name in ("vs labels", "vs true"):
            if name not in group:
                continue
            cells = {d: group.loc[group["draw"] == d, name].to_numpy(float) for d in draws}
            table = np.full((len(draws), max(len(c) for c in cells.values()), 1), np.nan)
            for index, d in enumerate(draws):
                table[index, :len(cells[d]), 0] = cells[d]
            result = nested_interval(table)
            row.update({name: result.mean, f"{name} lo": max(result.lo, 0.0), f"{name} hi": min(result.hi, 1.0)})
        rows.append(row)
    return pd.DataFrame(rows)


def runs_table(data: RunDir, arrays: Arrays) -> pd.DataFrame:
    last: dict[str, dict[str, float]] = {}
    for label in arrays.labels.values():
        for curve in label.curves:
            if len(curve.steps):
                values = curve.values[-1]
                last[curve.run_id] = {"last step": int(curve.steps[-1]), "kl": float(curve.kl[-1]),
                                      **{name: float(np.nanmean(values[:, column(name)])) if
                                         not np.isnan(values[:, column(name)]).all() else float("nan")
                                         for name in ("gold", "win", "length", "cond_acc")}}
    keep = [c for c in ("id", "label", "phase", "value", "draw", "seed", "learning_rate", "status") if c in data.runs]
    rows = []
    for run in data.runs.to_dict("records"):
        row = {key: run.get(key) for key in keep}
        error = run.get("error")
        row["error"] = str(error).splitlines()[0][:120] if isinstance(error, str) and error else ""
        rows.append({**row, **last.get(str(run.get("id")), {})})
    return pd.DataFrame(rows)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for markdown: 3 decimals; whole numbers and thousands as integers; very large or small ones with 3
    significant digits."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):
            return str(value)
        if abs(value) >= 1e6 or 0 < abs(value) < 10 ** -digits:
            return f"{value:.3g}"
        if float(round(value, digits)).is_integer():
            return f"{value:.0f}"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which this project does not depend on)."""
    if frame.empty:
        return "(none)"
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v).replace("|", "/") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def shares_text(row: dict[str, Any]) -> str:
    """The variance decomposition of a row as "draw/seed/prompt" shares, 2 decimals."""
    parts = [f"{row.get(f'share {k}'):.2f}" if isinstance(row.get(f"share {k}"), (float, int)) and
             not pd.isna(row.get(f"share {k}")) else "" for k in ("draw", "seed", "prompt")]
    return "/".join(parts) if any(parts) else ""


def with_shares(frame: pd.DataFrame) -> pd.DataFrame:
    """The three ``share *`` columns shown as one "shares d/s/p" column (markdown views)."""
    names = [f"share {k}" for k in ("draw", "seed", "prompt")]
    if frame.empty or not set(names) & set(frame):
        return frame
    view = frame.copy()
    view["shares d/s/p"] = [shares_text(row) for row in view.to_dict("records")]
    return view.drop(columns=[n for n in names if n in view])


def with_interval(frame: pd.DataFrame, column_name: str, lo: str, hi: str, digits: int = 3) -> pd.DataFrame:
    """``column_name`` shown as "0.412 [0.380, 0.444]" and the lo / hi columns dropped (markdown views)."""
    if frame.empty or column_name not in frame:
        return frame
    view = frame.copy()
    view[column_name] = [fmt(m, digits) + (f" [{fmt(a, digits)}, {fmt(b, digits)}]" if not pd.isna(a) else "")
                         for m, a, b in zip(view[column_name], view[lo], view[hi])]
    return view.drop(columns=[lo, hi])
