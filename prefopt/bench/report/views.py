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
    step: int | None = None
    missing: list[tuple[int, int]] = field(default_factory=list)  # cells that do not reach the point

    @property
    def complete(self) -> bool:
        return bool(self.cells) and not self.missing

    def array(self, draws: list[int], seeds: list[int]) -> np.ndarray:
        """[draws, seeds, prompts, columns], NaN where a cell has no value."""
        some = next(iter(self.cells.values()))
        out = np.full((len(draws), len(seeds)) + some.shape, np.nan)
        for (d, s), values in self.cells.items():
            if d in draws and s in seeds:
                out[draws.index(d), seeds.index(s)] = values
        return out

    def mean(self, name: str = "gold") -> float:
        return float(np.nanmean([np.nanmean(v[:, column(name)]) for v in self.cells.values()])) if self.cells \
            else float("nan")

    def bracket_text(self) -> str:
        """The cells' mean KLs of the two bracketing checkpoints, e.g. "1.8-2.6" (best points: the mean KL)."""
        if not self.brackets:
            return ""
        low, high = (float(np.mean([b[i] for b in self.brackets.values()])) for i in (0, 1))
        return f"{low:.2f}-{high:.2f}" if high > low else f"{low:.2f}"


def seeds_of(label: Label) -> list[int]:
    return sorted({c.seed for c in label.curves})


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
    """One row per (setting, step): mean KL over the cells, mean eval gold, mean val gold (NaN without val rows)."""
    rows = []
    for curve in label.curves:
        for t, step in enumerate(curve.steps):
            rows.append({"value": curve.value, "step": int(step), "kl": curve.kl[t],
                         "gold": float(np.nanmean(curve.values[t, :, column("gold")])), "val_gold": curve.val_gold[t]})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["value"] = frame["value"].astype(object)
    return frame.groupby(["value", "step"], dropna=False, sort=True).mean().reset_index()


def best_point(label: Label, budget: float) -> tuple[Point, str]:
    """The (setting, checkpoint) of highest mean gold among those with mean KL <= ``budget``, scored on val prompts
    when every candidate has val rows (else on eval prompts, said in the returned note)."""
    table = setting_steps(label)
    point = Point(label.name)
    if table.empty:
        return point, "no checkpoints"
    on_val = table["val_gold"].notna().all()
    index = best_under_budget(table["kl"].to_numpy(), table["val_gold" if on_val else "gold"].to_numpy(), budget)
    if index is None:
        return point, f"no checkpoint at mean KL <= {budget:g} (lowest {table['kl'].min():.2f})"
    chosen = table.iloc[index]
    point.setting, point.step = chosen["value"], int(chosen["step"])
    for curve in label.curves:
        same = curve.value == point.setting or (curve.value is None and pd.isna(point.setting))
        where = np.flatnonzero(curve.steps == point.step)
        if same and len(where):
            cell = (curve.draw, curve.seed)
            point.cells[cell] = curve.values[where[0]]
            point.kl[cell] = float(curve.kl[where[0]])
            point.brackets[cell] = (point.kl[cell], point.kl[cell])
    point.missing = [cell for cell in label.cells if cell not in point.cells]
    return point, "chosen on val prompts" if on_val else "chosen on eval prompts (no val rows: optimistic)"


def frontier_rows(arrays: Arrays, label: Label) -> list[dict[str, object]]:
    """Every (setting, checkpoint) of a label: cells, mean KL and every column's mean, gold's 95% interval."""
    rows = []
    seeds = seeds_of(label)
    for value in label.settings:
        curves = [c for c in label.curves if c.value == value]
        for step in sorted({int(s) for c in curves for s in c.steps}):
            point = Point(label.name)
            for curve in curves:
                where = np.flatnonzero(curve.steps == step)
                if len(where):
                    point.cells[(curve.draw, curve.seed)] = curve.values[where[0]]
                    point.kl[(curve.draw, curve.seed)] = float(curve.kl[where[0]])
            gold = nested_interval(point.array(arrays.draws, seeds)[..., column("gold")])
            row = {"label": label.name, "value": value, "step": step, "cells": len(point.cells),
                   "kl": float(np.mean(list(point.kl.values())))}
            row.update({name: point.mean(name) for name in COLUMNS})
            row.update(gold_lo=gold.lo, gold_hi=gold.hi)
            rows.append(row)
    return rows
