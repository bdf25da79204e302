"""A label's values at one point of comparison, per (draw, seed) cell: at a matched KL (upper envelope over its
settings, measured brackets only) or at its best point under the KL budget; and every (setting, checkpoint) as a
row of the frontier table. The maths is prefopt.bench.report.frontier's; this module only walks the curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prefopt.bench.report.curves import COLUMNS, Arrays, Label, column
from prefopt.bench.report.frontier import best_under_budget, envelope_at_kl
from prefopt.bench.report.stats import nested_interval


@dataclass
class Point:
    """A label's per-prompt values ([prompts, columns]) per (draw, seed) cell at one point, with how it was found."""

    label: str
    cells: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    kl: dict[tuple[int, int], float] = field(default_factory=dict)
    brackets: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    setting: object = None
    key: int | None = None  # the checkpoint's alignment key (curves.align): its step, or its position from the last
    steps: dict[tuple[int, int], int] = field(default_factory=dict)  # each cell's own step at the point
    missing: list[tuple[int, int]] = field(default_factory=list)  # cells that do not reach the point

    @property
    def complete(self) -> bool:
        return bool(self.cells) and not self.missing

    def array(self, draws: list[int]) -> np.ndarray:
        """[draws, seeds, prompts, columns]: a draw's seeds in sorted order (seed ids may differ between draws),
        NaN where a draw has fewer seeds."""
        some = next(iter(self.cells.values()))
        seeds = {d: sorted(s for dd, s in self.cells if dd == d) for d in draws}
        out = np.full((len(draws), max(1, max(map(len, seeds.values())))) + some.shape, np.nan)
        for (d, s), values in self.cells.items():
            if d in seeds:
                out[draws.index(d), seeds[d].index(s)] = values
        return out

    @property
    def step(self) -> float | None:
        """The cells' step at the point: one number when they agree, else their mean."""
        if not self.steps:
            return None
        steps = set(self.steps.values())
        return int(next(iter(steps))) if len(steps) == 1 else float(np.mean(list(self.steps.values())))

    def mean(self, name: str = "gold") -> float:
        """Mean of a column over every cell and prompt (NaN where no cell has it)."""
        values = np.array([v[:, column(name)] for v in self.cells.values()], dtype=float)
        return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else float("nan")

    def bracket_text(self) -> str:
        """The cells' mean KLs of the two bracketing checkpoints, e.g. "1.8-2.6" (best points: the mean KL)."""
        if not self.brackets:
            return ""
        low, high = (float(np.mean([b[i] for b in self.brackets.values()])) for i in (0, 1))
        return f"{low:.2f}-{high:.2f}" if high > low else f"{low:.2f}"


def at_matched_kl(label: Label, k: float) -> Point:
    """Per cell, the upper envelope over settings at KL k (frontier.envelope_at_kl); cells that never bracket k are
    ``missing``."""
    point = Point(label.name)
    for cell in label.cells:
        curves = [(c.kl, c.values) for c in label.curves if (c.draw, c.seed) == cell]
        found = envelope_at_kl(curves, k)
        if found is None:
            point.missing.append(cell)
            continue
        point.cells[cell] = found.values
        point.kl[cell] = k
        point.brackets[cell] = (found.kl_low, found.kl_high)
    return point


def setting_steps(label: Label) -> pd.DataFrame:
    """One row per (setting, checkpoint key): mean step, mean KL and mean eval gold over the cells."""
    rows = []
    for curve in label.curves:
        for t, key in enumerate(curve.keys):
            rows.append({"value": curve.value, "key": int(key), "step": int(curve.steps[t]), "kl": curve.kl[t],
                         "gold": float(np.nanmean(curve.values[t, :, column("gold")]))})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["value"] = frame["value"].astype(object)
    return frame.groupby(["value", "key"], dropna=False, sort=True).mean().reset_index()


def best_point(label: Label, budget: float, chosen: object = None) -> tuple[Point, str]:
    """A label's best point under the KL budget: the setting ``chosen`` on val prompts by the selection runs
    (manifest ``selection``; no eval prompt is looked at) at its last checkpoint with mean KL <= ``budget``; best-of-n:
    the largest n within the budget; with no choice given, the (setting, checkpoint) of highest mean eval gold within
    the budget (said in the note: optimistic)."""
    table = setting_steps(label)
    point = Point(label.name)
    if table.empty:
        return point, "no checkpoints"
    within = table[table["kl"] <= budget]
    if within.empty:
        return point, f"no checkpoint at mean KL <= {budget:g} (lowest {table['kl'].min():.2f})"
    if label.name.startswith("best_of_n"):
        chosen_row, note = within.iloc[within["key"].argmax()], "the largest n within the budget"
    elif chosen is not None:
        mine = within[[_same(v, chosen) for v in within["value"]]]
        if mine.empty:
            return point, f"the chosen setting {chosen} has no checkpoint at mean KL <= {budget:g}"
        chosen_row, note = mine.iloc[mine["key"].argmax()], f"setting {chosen} chosen on val; last step within budget"
    else:
        index = best_under_budget(within["kl"].to_numpy(), within["gold"].to_numpy(), budget)
        chosen_row, note = within.iloc[index], "highest eval gold within the budget (no val choice: optimistic)"
    point.setting, point.key = chosen_row["value"], int(chosen_row["key"])
    for curve in label.curves:
        where = np.flatnonzero(curve.keys == point.key)
        if _same(curve.value, point.setting) and len(where):
            cell = (curve.draw, curve.seed)
            point.steps[cell] = int(curve.steps[where[0]])
            point.cells[cell] = curve.values[where[0]]
            point.kl[cell] = float(curve.kl[where[0]])
            point.brackets[cell] = (point.kl[cell], point.kl[cell])
    point.missing = [cell for cell in label.cells if cell not in point.cells]
    return point, note


def _same(a: object, b: object) -> bool:
    """Knob values compare equal as numbers when both are (0.1 == 0.1000), else as they are; None / NaN alike."""
    if a is None or (isinstance(a, float) and np.isnan(a)):
        return b is None or (isinstance(b, float) and np.isnan(b))
    try:
        return bool(np.isclose(float(a), float(b), rtol=1e-9, atol=0))
    except (TypeError, ValueError):
        return a == b


def frontier_rows(arrays: Arrays, label: Label) -> list[dict[str, object]]:
    """Every (setting, checkpoint) of a label: cells, mean KL and every column's mean, gold's 95% interval."""
    rows = []
    for value in label.settings:
        curves = [c for c in label.curves if _same(c.value, value)]
        for key in sorted({int(k) for c in curves for k in c.keys}):
            point = Point(label.name)
            for curve in curves:
                where = np.flatnonzero(curve.keys == key)
                if len(where):
                    point.steps[(curve.draw, curve.seed)] = int(curve.steps[where[0]])
                    point.cells[(curve.draw, curve.seed)] = curve.values[where[0]]
                    point.kl[(curve.draw, curve.seed)] = float(curve.kl[where[0]])
            gold = nested_interval(point.array(arrays.draws)[..., column("gold")])
            row = {"label": label.name, "value": value, "step": point.step, "cells": len(point.cells),
                   "kl": float(np.mean(list(point.kl.values())))}
            row.update({name: point.mean(name) for name in COLUMNS})
            row.update(gold_lo=gold.lo, gold_hi=gold.hi)
            rows.append(row)
    return rows
