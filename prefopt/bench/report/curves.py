"""The run directory's frames as arrays: one curve per run, grouped by label, and best-of-n as labels of its own.

A ``Label`` holds every curve of one label (one per setting x draw x seed) on the eval prompts, aligned to the same
prompt order, plus the start's per-prompt values per draw; a setting's checkpoints align across its cells by step,
or by position from the last one where its runs stopped at different steps (``align``). Columns of a curve's
``values`` ([steps, prompts, columns]): ``COLUMNS`` (gold, length, cond_acc, proxy, entropy, win), NaN where a run
did not record one; ``win`` is 1 / 0.5 / 0 as the run's gold beats / ties / loses to the start's on the same prompt
and draw.

Best-of-n (prefopt.bench.report.frontier.best_of_n_expected) gives two labels from each draw's n_max samples per
prompt: ``best_of_n`` (ranked by the proxy) and ``best_of_n@true`` (ranked by the true reward: the oracle), one
curve per draw over n = 1, 2, 4, ... at KL log n - (n - 1) / n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prefopt.bench.report.frontier import best_of_n_expected, bon_kl
from prefopt.bench.report.reading import RunDir

COLUMNS = ("gold", "length", "cond_acc", "proxy", "entropy", "win")
BON, BON_TRUE = "best_of_n", "best_of_n@true"


@dataclass
class Curve:
    run_id: str
    value: object  # the knob value (best-of-n: None)
    draw: int
    seed: int
    steps: np.ndarray  # [T]
    kl: np.ndarray  # [T] mean KL over the eval prompts
    values: np.ndarray  # [T, prompts, len(COLUMNS)]
    keys: np.ndarray | None = None  # [T] what aligns checkpoints across the cells of a setting (``align``)

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = self.steps


@dataclass
class Label:
    name: str
    phase: str
    reward: str
    algorithm: str
    oracle_of: str | None = None  # the label trained on the proxy that this oracle (true reward) shadows
    curves: list[Curve] = field(default_factory=list)

    @property
    def settings(self) -> list[object]:
        return sorted({c.value for c in self.curves},
                      key=lambda v: (v is None, v if isinstance(v, (int, float)) else str(v)))

    @property
    def cells(self) -> list[tuple[int, int]]:
        return sorted({(c.draw, c.seed) for c in self.curves})


@dataclass
class Arrays:
    prompts: np.ndarray  # the eval prompt ids, in order
    draws: list[int]
    start: dict[int, np.ndarray]  # draw -> [prompts, len(COLUMNS)] (win = 0.5)
    labels: dict[str, Label]
    bon_ns: list[int]


def column(name: str) -> int:
    return COLUMNS.index(name)


def build(data: RunDir, bon_ns: list[int] | None = None) -> Arrays:
    """Curves of every finished run and of best-of-n (n in ``bon_ns``, default powers of 2 up to n_max)."""
    start_eval = data.start[data.start["set"] == "eval"] if not data.start.empty else data.start
    prompts = np.array(sorted(set(start_eval["i"])) if not start_eval.empty else
                       sorted(set(data.evals.loc[data.evals["set"] == "eval", "i"])) if not data.evals.empty else [])
    draws = sorted(set(data.draws) | (set(start_eval["draw"]) if not start_eval.empty else set()))
    start = {d: _table(start_eval[start_eval["draw"] == d], prompts) for d in draws}
    for table in start.values():
        table[:, column("win")] = 0.5
    arrays = Arrays(prompts, draws, start, {}, [])
    evals = data.evals
    if not evals.empty:
        algorithms = dict(zip(data.runs["id"], data.runs.get("algorithm", data.runs["id"])))
        for run_id, rows in evals.groupby("id", sort=True):
            first = rows.iloc[0]
            algorithm = algorithms.get(run_id) or first["label"]
            meta = data.labels.get(first["label"]) or {}
            label = arrays.labels.setdefault(first["label"], Label(str(first["label"]), str(first.get("phase", "main")),
                                                                   str(first.get("reward", "proxy")), str(algorithm),
                                                                   meta.get("oracle_of")))
            label.curves.append(_curve(rows, prompts, start.get(int(first["draw"]))))
    for label in arrays.labels.values():
        align(label)
    _best_of_n(data, arrays, bon_ns)
    return arrays


def align(label: Label) -> None:
    """Checkpoints of one setting compare across (draw, seed) cells by step; where the cells stopped at different
    steps (offline runs train ceil(epochs x labelled rows / batch) steps, and each draw has its own labelled rows),
    by position counted from the last checkpoint instead (key 0 = last, -1 = the one before, ...: the same share of
    each run's training, checkpoints being log-spaced up to its own last step)."""
    by_value: dict[object, list[Curve]] = {}
    for curve in label.curves:
        by_value.setdefault(curve.value, []).append(curve)
    for curves in by_value.values():
        if len({tuple(c.steps.tolist()) for c in curves}) > 1:
            for curve in curves:
                curve.keys = np.arange(len(curve.steps)) - (len(curve.steps) - 1)


def _table(rows: pd.DataFrame, prompts: np.ndarray) -> np.ndarray:
    """[prompts, columns] of one checkpoint's rows (NaN where a prompt or a column is missing)."""
    out = np.full((len(prompts), len(COLUMNS)), np.nan)
    if rows.empty:
        return out
    rows = rows.drop_duplicates("i", keep="last").set_index("i").reindex(prompts)
    for index, name in enumerate(COLUMNS):
        if name in rows:
            out[:, index] = pd.to_numeric(rows[name], errors="coerce").to_numpy(dtype=float)
    return out


def _curve(rows: pd.DataFrame, prompts: np.ndarray, start: np.ndarray | None) -> Curve:
    first = rows.iloc[0]
    evals = rows[rows["set"] == "eval"]
    steps = np.array(sorted(set(evals["step"])), dtype=int)
    values = np.full((len(steps), len(prompts), len(COLUMNS)), np.nan)
    t = np.searchsorted(steps, evals["step"].to_numpy())
    p = np.searchsorted(prompts, evals["i"].to_numpy())
    known = (p < len(prompts)) & (prompts[np.minimum(p, len(prompts) - 1)] == evals["i"].to_numpy())
    for index, name in enumerate(COLUMNS):
        if name in evals:
            values[t[known], p[known], index] = pd.to_numeric(evals[name], errors="coerce").to_numpy(float)[known]
    kl = evals.groupby("step")["kl"].mean().reindex(steps).to_numpy(dtype=float)
    if start is not None and len(steps):
        gold, start_gold = values[..., column("gold")], start[None, :, column("gold")]
        values[..., column("win")] = np.where(np.isnan(gold) | np.isnan(start_gold), np.nan,
                                              (gold > start_gold) + 0.5 * (gold == start_gold))
    value = first.get("value")
    return Curve(str(first["id"]), None if pd.isna(value) else value, int(first["draw"]), int(first["seed"]), steps,
                 kl, values)


def _best_of_n(data: RunDir, arrays: Arrays, bon_ns: list[int] | None) -> None:
    samples = data.best_of_n
    if samples.empty or "gold" not in samples:
        return
    n_max = int(samples.groupby(["draw", "i"]).size().min())
    ns = [n for n in (bon_ns or [2 ** k for k in range(12)]) if n <= n_max]
    arrays.bon_ns = ns
    for name, key in ((BON, "proxy"), (BON_TRUE, "gold")):
        if key not in samples:
            continue
        label = arrays.labels[name] = Label(name, "main" if name == BON else "oracle",
                                            "proxy" if name == BON else "true", "best_of_n",
                                            None if name == BON else BON)
        for draw, rows in samples.groupby("draw", sort=True):
            by_prompt = {i: g.sort_values("j").head(n_max) for i, g in rows.groupby("i")}
            start = arrays.start.get(int(draw))
            values = np.full((len(ns), len(arrays.prompts), len(COLUMNS)), np.nan)
            for p, i in enumerate(arrays.prompts):
                group = by_prompt.get(i)
                if group is None:
                    continue
                table = np.stack([group[c].to_numpy(dtype=float) if c in group else np.full(len(group), np.nan)
                                  for c in COLUMNS], axis=1)
                if start is not None:  # the win indicator of each sample against the start's sample
                    gold, start_gold = table[:, column("gold")], start[p, column("gold")]
                    table[:, column("win")] = (gold > start_gold) + 0.5 * (gold == start_gold)
                values[:, p] = best_of_n_expected(group[key].to_numpy(dtype=float), table, ns)
            label.curves.append(Curve(f"{name}/draw{draw}", None, int(draw), 0, np.array(ns),
                                      np.array([bon_kl(n) for n in ns]), values))
