"""The verdict table: A vs B on the true reward at matched KL and at each one's best point under the KL budget.

The declared family (fixed by the bench config, before any gold is read): every pair of the main labels (every
algorithm run on the proxy, and best-of-n ranked by the proxy), at each KL level of ``frontier.kl_levels`` and at
"best under the KL budget". A pair at a KL level is compared only where BOTH labels have measured checkpoints
bracketing that KL in every (draw, seed) cell (prefopt.bench.report.views.at_matched_kl); otherwise the row says
which label does not reach it and is not tested. Holm's correction runs over the tested rows; a row is ``better`` /
``worse`` when its Holm-adjusted p < 0.05, else ``inconclusive``.

Each row also carries what papers report beside it: the head-to-head win rate P(gold A > gold B) on the same
prompt (ties 1/2; every seed of A against every seed of B in a draw), the mean lengths and the length-adjusted
difference ``diff - slope (length A - length B)`` (slope: gold on length within prompts among the start's
best-of-n samples, so it measures how much length alone buys under the start's distribution), conditional accuracy
own/(own+other) where the world has it, and the variance decomposition of the difference (draw / seed / prompt).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from prefopt.bench.report.curves import Arrays, column
from prefopt.bench.report.stats import holm, nanmean, nested_interval, variance_shares
from prefopt.bench.report.views import Point, at_matched_kl, best_point

ALPHA = 0.05


def difference_cells(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[draws, seeds, prompts] of A - B: paired seed by seed when both have the same seeds, B broadcast when it has
    one (best-of-n), else each draw's seed-mean difference ([draws, 1, prompts])."""
    if a.shape[1] == b.shape[1] or b.shape[1] == 1:
        return a - b
    if a.shape[1] == 1:
        return a - b if a.shape[1] == b.shape[1] else np.broadcast_to(a, b.shape) - b
    return (nanmean(a, 1) - nanmean(b, 1))[:, None]


def win_cells(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[draws, seeds of A, prompts]: P(A's gold > B's) against every seed of B in the same draw (ties 1/2)."""
    wins = (a[:, :, None] > b[:, None, :]) + 0.5 * (a[:, :, None] == b[:, None, :])
    wins = np.where(np.isnan(a[:, :, None]) | np.isnan(b[:, None, :]), np.nan, wins)
    return nanmean(wins, axis=2)


def compare(arrays: Arrays, a: Point, b: Point, slope: float) -> dict[str, object]:
    """Every number of one row (module docstring) for two complete points."""
    draws = arrays.draws
    ga, gb = a.array(draws), b.array(draws)
    gold = column("gold")
    diff = difference_cells(ga[..., gold], gb[..., gold])
    result = nested_interval(diff)
    win = nested_interval(win_cells(ga[..., gold], gb[..., gold]))
    row = {"A KL": a.bracket_text(), "B KL": b.bracket_text(), "gold A": a.mean(), "gold B": b.mean(),
           "diff": result.mean, "lo": result.lo, "hi": result.hi, "p": result.p, "unit": result.unit,
           "win A over B": win.mean, "win lo": max(win.lo, 0.0), "win hi": min(win.hi, 1.0),
           "length A": a.mean("length"), "length B": b.mean("length"),
           "cond_acc A": a.mean("cond_acc"), "cond_acc B": b.mean("cond_acc")}
    row["diff length-adjusted"] = result.mean - slope * (row["length A"] - row["length B"]) \
        if np.isfinite(slope) else float("nan")
    if not np.isnan(diff).any() and diff.shape[1] > 1:
        row.update({f"share {k}": v for k, v in variance_shares(diff).items()})
    return row


def verdict_table(arrays: Arrays, labels: list[str], kl_levels: list[float], budget: float, slope: float,
                  chosen: dict[str, object]) -> pd.DataFrame:
    """The family's rows (module docstring), Holm-adjusted, in the declared order; best points per
    prefopt.bench.report.views.best_point with the settings ``chosen`` on val."""
    present = [label for label in labels if label in arrays.labels]
    best = {label: best_point(arrays.labels[label], budget, chosen.get(label))[0] for label in present}
    matched = {(label, k): at_matched_kl(arrays.labels[label], k) for label in present for k in kl_levels}
    rows = []
    for index, a in enumerate(present):
        for b in present[index + 1:]:
            targets = [(f"KL {k:g}", matched[a, k], matched[b, k]) for k in kl_levels]
            targets.append((f"best, KL <= {budget:g}", best[a], best[b]))
            for at, pa, pb in targets:
                row = {"A": a, "B": b, "at": at}
                missing = [f"{p.label} ({len(p.missing)}/{len(p.missing) + len(p.cells)} cells)"
                           for p in (pa, pb) if not p.complete]
                if missing:
                    reach = "not reached by" if at.startswith("KL") else "no point under the budget for"
                    rows.append({**row, "verdict": f"n/a: {reach} {' and '.join(missing)}"})
                    continue
                rows.append({**row, **compare(arrays, pa, pb, slope)})
    table = pd.DataFrame(rows)
    if table.empty or "p" not in table:
        return table
    single = table["diff"].notna() & table["p"].isna()  # one (draw, seed) cell: a difference but no interval
    table.loc[single, "verdict"] = "n/a: no interval from a single replicate (one draw, one seed)"
    table["p holm"] = holm(table["p"].tolist())
    tested = table["p holm"].notna()
    table.loc[tested, "verdict"] = np.where(table.loc[tested, "p holm"] >= ALPHA, "inconclusive",
                                            np.where(table.loc[tested, "diff"] > 0, "better", "worse"))
    return table


def summary_table(arrays: Arrays, kl_levels: list[float], budget: float, chosen: dict[str, object]) -> pd.DataFrame:
    """Every label (oracles included, as references) at each matched KL (upper envelope per cell) and at its best
    point under the budget: mean gold with its 95% interval over draws, and how many cells reach the point."""
    rows = []
    for label in arrays.labels.values():
        points = [(f"KL {k:g}", at_matched_kl(label, k)) for k in kl_levels]
        points.append((f"best, KL <= {budget:g}", best_point(label, budget, chosen.get(label.name))[0]))
        for at, point in points:
            row = {"label": label.name, "phase": label.phase, "at": at,
                   "cells": f"{len(point.cells)}/{len(point.cells) + len(point.missing)}"}
            if point.complete:
                gold = nested_interval(point.array(arrays.draws)[..., column("gold")])
                row.update(kl=float(np.mean(list(point.kl.values()))), gold=gold.mean, lo=gold.lo, hi=gold.hi)
            rows.append(row)
    return pd.DataFrame(rows)


def decided_text(table: pd.DataFrame) -> str:
    """One line per row decided after Holm (better / worse), or how many were tested and none decided."""
    if table.empty or "p holm" not in table:
        return "No row of the family could be tested."
    tested = table[table["p holm"].notna()]
    decided = tested[tested["verdict"].isin(["better", "worse"])]
    head = f"{len(decided)} of {len(tested)} tested rows decided after Holm ({len(table) - len(tested)} n/a)"
    return head + (":" if len(decided) else ".") + "".join(
        f"\n- **{r['A']} {r['verdict']} than {r['B']}** at {r['at']}: {r['diff']:+.4f} [{r['lo']:+.4f}, "
        f"{r['hi']:+.4f}], p (Holm) {r['p holm']:.3g}" for r in decided.to_dict("records"))


def length_slope(arrays: Arrays, data_best_of_n: pd.DataFrame) -> float:
    """Gold on length within prompts (and draws) among the start's best-of-n samples; NaN without them."""
    from prefopt.bench.report.stats import within_slope

    samples = data_best_of_n
    if samples.empty or not {"gold", "length"} <= set(samples):
        return float("nan")
    return within_slope(samples["length"].to_numpy(), samples["gold"].to_numpy(),
                        (samples["draw"].astype(str) + "/" + samples["i"].astype(str)).to_numpy())


def seeds_note(arrays: Arrays, labels: list[str]) -> str:
    """"3 draws x 4 seeds x 128 prompts" of the family's trained labels (the units the intervals rest on)."""
    per_draw = sorted({len(arrays.labels[label].cells) / max(1, len(arrays.draws)) for label in labels
                       if label in arrays.labels and arrays.labels[label].algorithm != "best_of_n"})
    seeds = " to ".join(f"{s:g}" for s in (per_draw[0], per_draw[-1])) if len(per_draw) > 1 else \
        f"{per_draw[0]:g}" if per_draw else "0"
    return f"{len(arrays.draws)} draws x {seeds} seeds per draw x {len(arrays.prompts)} eval prompts"
