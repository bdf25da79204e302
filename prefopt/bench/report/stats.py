"""Intervals, p-values, Holm's correction and the variance decomposition of the bench's nested data.

The bench's numbers are nested: world draws d (labels + proxy RM, the outer unit), training seeds s within a draw,
eval prompts i crossed with both (every run is judged on the same prompts). A statistic is a mean over a table
``y[d, i]`` of seed means (a difference A - B on the same prompt, a win indicator, one run's gold). Its interval
treats the draws as the unit (Cameron & Miller 2015, few clusters: t with G - 1 degrees of freedom on cluster
means) and adds the prompt component that is common to every draw (prompts are crossed, so the spread of the draw
means cannot show it):

    v_draw   = var_d(mean_i y[d, i]) / D                                 (D - 1 degrees of freedom)
    v_prompt = max(var_i(mean_d y[d, i]) - MS_res / D, 0) / P             (P - 1 degrees of freedom)
    half width at level 1 - a:  sqrt(t(1 - a/2, D - 1)^2 v_draw + t(1 - a/2, P - 1)^2 v_prompt)

with MS_res the mean square of the draw x prompt residual (its share is already in v_draw). Each component is
inflated by its own t quantile (the "separate quantiles" combination, conservative where the prompt share is
large); Welch-Satterthwaite's pooled degrees of freedom under-cover here (0.93: when v_draw comes out small by
chance the pooled df grows, exactly when it should not). With one draw the seeds are the unit instead (and the
interval says it does not cover draws). The coverage of this procedure is measured on simulated bench-shaped data
in prefopt.bench.report.coverage (tests/test_bench_report_stats.py requires 0.93-0.97 at nominal 0.95).

The two-sided p-value is the smallest a whose interval excludes 0 (so p < 0.05 exactly when the 95% interval
excludes 0); Holm (1979) adjusts a declared family of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from prefopt.bench.report.tdist import t_quantile

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its interval; ``unit``: what the outer resampling unit was ("draws" | "seeds" | "none")."""

    mean: float
    lo: float
    hi: float
    p: float
    v_draw: float
    v_prompt: float
    units: int
    unit: str


def components(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(v_draw, v_prompt) of a [..., units, prompts] table (module docstring; leading axes are a batch, as in the
    coverage study); v_draw is NaN for fewer than 2 units, v_prompt 0 for one prompt."""
    table = np.asarray(table, dtype=float)
    units, prompts = table.shape[-2:]
    unit_means, prompt_means = table.mean(-1), table.mean(-2)
    v_draw = unit_means.var(axis=-1, ddof=1) / units if units >= 2 else np.full(table.shape[:-2], np.nan)
    if prompts < 2:
        return v_draw, np.zeros(table.shape[:-2])
    ms_residual = 0.0
    if units >= 2:
        residual = table - unit_means[..., None] - prompt_means[..., None, :] + table.mean((-2, -1))[..., None, None]
        ms_residual = (residual ** 2).sum((-2, -1)) / ((units - 1) * (prompts - 1))
    return v_draw, np.maximum(prompt_means.var(axis=-1, ddof=1) - ms_residual / units, 0.0) / prompts


@lru_cache(maxsize=256)
def _quantiles(units: int, prompts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, t(1 - a/2, units - 1), t(1 - a/2, prompts - 1)) on a log grid of a from 1e-10 to 1 (cached per shape)."""
    alpha = np.concatenate([np.logspace(-10, -0.01, 800), [1.0]])
    t_draw = t_quantile(1 - alpha / 2, units - 1)
    t_prompt = t_quantile(1 - alpha / 2, prompts - 1) if prompts >= 2 else np.zeros_like(alpha)
    return alpha, t_draw, t_prompt


@lru_cache(maxsize=256)
def _t(q: float, df: float) -> float:
    return float(t_quantile(q, df)) if df >= 1 else 0.0


def half_width(v_draw: float, v_prompt: float, units: int, prompts: int, level: float = LEVEL) -> float:
    """sqrt(t_draw^2 v_draw + t_prompt^2 v_prompt) at ``level`` (module docstring)."""
    q = 0.5 + level / 2
    return float(np.sqrt(_t(q, units - 1) ** 2 * v_draw + _t(q, prompts - 1) ** 2 * v_prompt))


def p_value(mean: float, v_draw: float, v_prompt: float, units: int, prompts: int) -> float:
    """The smallest a whose (1 - a) interval excludes 0: the half width falls as a grows, so the crossing of
    half_width(a) = |mean| is found on a log grid of a and interpolated in log a; below 1e-10 it is 1e-10."""
    if v_draw + v_prompt <= 0:
        return 1e-10 if mean != 0 else 1.0
    alpha, t_draw, t_prompt = _quantiles(units, prompts)
    width = np.sqrt(t_draw ** 2 * v_draw + t_prompt ** 2 * v_prompt)  # decreasing in alpha, 0 at alpha = 1
    inside = np.flatnonzero(width < abs(mean))
    if len(inside) == 0:
        return 1.0
    k = inside[0]
    if k == 0:
        return float(alpha[0])
    w = (width[k - 1] - abs(mean)) / (width[k - 1] - width[k])
    return float(np.exp((1 - w) * np.log(alpha[k - 1]) + w * np.log(alpha[k])))


def interval(table: np.ndarray, unit: str = "draws") -> Interval:
    """Mean, 95% interval and p-value of a [units, prompts] table (rows: draws, or seeds of one draw)."""
    table = np.asarray(table, dtype=float)
    if table.ndim == 1:
        table = table[:, None]
    units, prompts = table.shape
    mean = float(table.mean())
    if units < 2:
        return Interval(mean, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), units, "none")
    v_draw, v_prompt = (float(v) for v in components(table))
    width = half_width(v_draw, v_prompt, units, prompts)
    return Interval(mean, mean - width, mean + width, p_value(mean, v_draw, v_prompt, units, prompts), v_draw,
                    v_prompt, units, unit)


def nested_interval(cells: np.ndarray) -> Interval:
    """Interval of a [draws, seeds, prompts] array: draws as the unit when there are >= 2, else the seeds of the
    one draw (NaN entries, e.g. a failed seed, are left out of that draw's seed mean)."""
    cells = np.asarray(cells, dtype=float)
    if cells.shape[0] >= 2:
        return interval(np.nanmean(cells, axis=1), "draws")
    return interval(cells[0][~np.isnan(cells[0]).all(1)], "seeds")


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
    """Shares of the variance of the grand mean of a balanced [draws, seeds, prompts] array carried by draws,
    seeds and prompts: ANOVA (method-of-moments) components of y = mu + a_d + b_ds + c_i + e_dsi, each divided by
    the number of its units in the mean (draw: s2_a / D; seed: s2_b / (D S); prompt: s2_c / P + s2_e / (D S P)),
    negative estimates set to 0 (Searle, Casella & McCulloch 1992, ch. 3)."""
    cells = np.asarray(cells, dtype=float)
    draws, seeds, prompts = cells.shape
    cell_means = cells.mean(2)
    draw_means, prompt_means = cell_means.mean(1), cells.mean((0, 1))
    residual = cells - cell_means[..., None] - prompt_means + cells.mean()
    ms_residual = (residual ** 2).sum() / max((draws * seeds - 1) * (prompts - 1), 1)
    within = ((cell_means - draw_means[:, None]) ** 2).sum() / max(draws * (seeds - 1), 1) if seeds > 1 else 0.0
    s2_draw = max(draw_means.var(ddof=1) - within / seeds, 0.0) if draws > 1 else 0.0
    s2_seed = max(within - ms_residual / prompts, 0.0)
    s2_prompt = max(prompt_means.var(ddof=1) - ms_residual / (draws * seeds), 0.0) if prompts > 1 else 0.0
    parts = {"draw": s2_draw / draws, "seed": s2_seed / (draws * seeds),
             "prompt": s2_prompt / prompts + ms_residual / (draws * seeds * prompts)}
    total = sum(parts.values())
    return {name: value / total if total > 0 else float("nan") for name, value in parts.items()}


def wilson(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = float(t_quantile(0.5 + level / 2, 1e9))
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
