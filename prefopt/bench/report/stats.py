"""Intervals, p-values, Holm's correction and the variance decomposition of the bench's nested data.

The bench's numbers are nested: world draws d (labels + proxy RM, the outer unit), training seeds s within a draw,
and the pinned eval prompts i, the same for every run (common prompts and common sampling seeds). A statistic is a
mean over a table ``y[d, i]`` of seed means (a difference A - B on the same prompt, a win indicator, one run's
gold). The estimand is its expectation over world draws and training seeds ON THE PINNED EVAL PROMPTS (the
benchmark's own prompts; DESIGN.md: seeds and world draws are the units). Its interval is Student's t on the draw
means (Cameron & Miller 2015, few clusters: t with G - 1 degrees of freedom on the cluster means):

    m_d = mean_i y[d, i];   mean = mean_d m_d;   se^2 = var_d(m_d) / D;   mean +- t(0.975, D - 1) se

exact for normal balanced data whatever the shares of draws, seeds and per-sample noise (each draw mean carries
its seeds and its samples), and a t-test p-value consistent with it (p < 0.05 exactly when the interval excludes 0).
With one draw, the seeds are the unit instead (the interval then says it does not cover draws).

Why not a percentile bootstrap over the levels: with 3 draws a bootstrap resamples among 10 multisets of them and
its spread is (D - 1) / D of the plug-in variance with normal quantiles: it under-covers where draws matter. The
coverage of this procedure and of the hierarchical bootstrap is measured on simulated bench-shaped data in
prefopt.bench.report.coverage (tests/test_bench_report_stats.py requires 0.93-0.97 at nominal 0.95).
Holm (1979) adjusts a declared family of p-values.
"""

from __future__ import annotations

import warnings
from statistics import NormalDist
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from prefopt.bench.report.tdist import t_quantile, t_two_sided_p

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval and two-sided p-value; ``unit``: what the interval's units were ("draws" |
    "seeds" | "none" when there was a single unit and no interval)."""

    mean: float
    lo: float
    hi: float
    p: float
    se: float
    units: int
    unit: str


@lru_cache(maxsize=256)
def t_critical(df: float, level: float = LEVEL) -> float:
    """The two-sided critical value t(0.5 + level / 2, df)."""
    return float(t_quantile(0.5 + level / 2, df))


def nanmean(values: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """np.nanmean, NaN (without a warning) where a slice is all NaN (a failed seed, a prompt a run lacks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def interval(table: np.ndarray, unit: str = "draws") -> Interval:
    """Mean, 95% interval and p-value of a [units, prompts] table (rows: draws, or the seeds of one draw)."""
    table = np.asarray(table, dtype=float)
    if table.ndim == 1:
        table = table[:, None]
    unit_means = nanmean(table, axis=1)
    unit_means = unit_means[~np.isnan(unit_means)]
    units = len(unit_means)
    mean = float(unit_means.mean()) if units else float("nan")
    if units < 2:
        return Interval(mean, float("nan"), float("nan"), float("nan"), float("nan"), units, "none")
    se = float(unit_means.std(ddof=1) / np.sqrt(units))
    width = t_critical(units - 1) * se
    p = float(t_two_sided_p(mean / se, units - 1)) if se > 0 else (0.0 if mean != 0 else 1.0)
    return Interval(mean, mean - width, mean + width, p, se, units, unit)


def nested_interval(cells: np.ndarray) -> Interval:
    """Interval of a [draws, seeds, prompts] array: draws as the unit when there are >= 2 (each draw's mean over
    its seeds; NaN cells, e.g. a failed seed, left out), else the seeds of the one draw."""
    cells = np.asarray(cells, dtype=float)
    if cells.shape[0] >= 2:
        return interval(nanmean(cells, axis=1), "draws")
    return interval(cells[0], "seeds")


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): p_(k) * (m - k + 1), running max, capped at 1; NaN kept."""
    p = np.asarray(p_values, dtype=float)
    finite = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(p.shape, np.nan)
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = len(order), 0.0
    for k, index in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def variance_shares(cells: np.ndarray) -> dict[str, float]:
    """Shares of the variance of the grand mean of a balanced [draws, seeds, prompts] array carried by draws, seeds
    and the per-prompt samples, for y = mu + c_i + a_d + b_ds + e_dsi with the prompt effects c_i fixed (the
    estimand of ``interval``): ANOVA (method-of-moments) components, each divided by its count in the mean (draw:
    s2_a / D, seed: s2_b / (D S), prompt: s2_e / (D S P)), negative estimates set to 0 (Searle, Casella & McCulloch
    1992, ch. 3)."""
    cells = np.asarray(cells, dtype=float)
    draws, seeds, prompts = cells.shape
    cell_means = cells.mean(2)
    draw_means, prompt_means = cell_means.mean(1), cells.mean((0, 1))
    residual = cells - cell_means[..., None] - prompt_means + cells.mean()
    ms_residual = (residual ** 2).sum() / max((draws * seeds - 1) * (prompts - 1), 1)
    within = ((cell_means - draw_means[:, None]) ** 2).sum() / max(draws * (seeds - 1), 1) if seeds > 1 else 0.0
    s2_draw = max(draw_means.var(ddof=1) - within / seeds, 0.0) if draws > 1 else 0.0
    s2_seed = max(within - ms_residual / prompts, 0.0)
    parts = {"draw": s2_draw / draws, "seed": s2_seed / (draws * seeds),
             "prompt": ms_residual / (draws * seeds * prompts)}
    total = sum(parts.values())
    return {name: value / total if total > 0 else float("nan") for name, value in parts.items()}


def wilson(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    phat = successes / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    width = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - width), float(centre + width)


def within_slope(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Least-squares slope of y on x within groups (each group's means removed: prompt fixed effects)."""
    frame = np.stack([np.asarray(x, float), np.asarray(y, float)], 1)
    keep = ~np.isnan(frame).any(1)
    frame, groups = frame[keep], np.asarray(groups)[keep]
    _, inverse = np.unique(groups, return_inverse=True)
    counts = np.bincount(inverse)
    centred = frame - np.stack([np.bincount(inverse, frame[:, c]) / counts for c in (0, 1)], 1)[inverse]
    denominator = (centred[:, 0] ** 2).sum()
    return float((centred[:, 0] * centred[:, 1]).sum() / denominator) if denominator > 0 else float("nan")
