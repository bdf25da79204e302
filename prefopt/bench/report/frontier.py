"""Frontiers of true reward against KL from measured points only: per-setting curves, the per-seed upper envelope,
the best point under a KL budget, best-of-n with its analytic KL, and Gao et al.'s functional forms.

* A **curve** is one run's checkpoints in training order (one setting: label and knob value, one draw and seed):
  the mean KL to the start over the eval prompts ``kl[t]`` and the per-prompt values ``gold[t, i]``.
* **Gold at KL k** on a curve: for every segment of consecutive checkpoints t, t+1 whose KLs bracket k
  (kl[t] <= k <= kl[t+1], or the other way round when KL falls), the per-prompt values interpolated linearly in KL,
  ``(1 - w) gold[t] + w gold[t+1]`` with ``w = (k - kl[t]) / (kl[t+1] - kl[t])``. The start (KL 0) is NOT a point
  of a trained curve: no chord from the start to a far first checkpoint. Where KL never brackets k there is no value.
* The **upper envelope** at KL k of one (draw, seed) over a label's settings: the bracketing segment (of any
  setting) with the highest mean gold. It is an upper envelope: a max over settings, so it favours labels with more
  settings a little (the same knob grid size for every label keeps that fair).
* **Best under a KL budget**: the (setting, checkpoint) with the highest score among those whose mean KL is <= the
  budget (the score: mean gold on val prompts when the runs have them, so eval prompts do not choose it).
* **Best-of-n** (Stiennon et al. 2020, appendix; Gao et al. 2022 section 2): n samples from the start, the one with
  the highest key (proxy, or the true reward for the oracle) kept; KL = log n - (n - 1) / n. From N >= n samples per
  prompt the expected value over the C(N, n) subsets is exact (Nakano et al. 2021, WebGPT appendix): with the N keys
  sorted, the subset's maximum is the j-th smallest with probability C(j - 1, n - 1) / C(N, n); tied keys share
  their tie group's probability, each member equally.
* **Gao et al. 2022** (arXiv 2210.10760, eq. 1-2), d = sqrt(KL), R = gold - gold(start): best-of-n
  R = d (alpha - beta d), RL R = d (alpha - beta log d); least squares over a curve's mean points with KL > 0. Peaks:
  best-of-n at d* = alpha / (2 beta); RL at d* = exp(alpha / beta - 1), R* = beta d*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def bon_kl(n: int) -> float:
    """KL(best-of-n || start) = log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def best_of_n_expected(keys: np.ndarray, values: np.ndarray, ns: list[int]) -> np.ndarray:
    """Expected ``values`` ([N] or [N, m]) of the sample with the highest key among n drawn without replacement from
    the N samples, for every n in ``ns`` (module docstring): [len(ns)] or [len(ns), m]."""
    keys = np.asarray(keys, dtype=float)
    values = np.asarray(values, dtype=float)
    total = len(keys)
    if any(not 1 <= n <= total for n in ns):
        raise ValueError(f"best-of-n needs 1 <= n <= {total} samples, got {list(ns)}")
    groups, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    flat = values.reshape(total, -1)
    means = np.stack([np.bincount(inverse, weights=flat[:, c], minlength=len(groups)) for c in range(flat.shape[1])],
                     axis=1) / counts[:, None]  # [groups, m]
    above = np.cumsum(counts)  # samples with a key <= the group's
    below = above - counts
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, total + 1)))])
    n = np.asarray(ns)[:, None]

    def ratio(a: np.ndarray) -> np.ndarray:  # C(a, n) / C(total, n), 0 where a < n
        safe = np.maximum(a - n, 0)
        log = (log_factorial[a] - log_factorial[safe] - log_factorial[total] + log_factorial[total - n])
        return np.where(a >= n, np.exp(log), 0.0)

    weights = ratio(above[None, :]) - ratio(below[None, :])  # [ns, groups]: P(the subset's max is in the group)
    return (weights @ means).reshape((len(ns),) + values.shape[1:])


def segments_at(kl: np.ndarray, k: float) -> list[tuple[int, float]]:
    """(t, w) of every segment t -> t+1 of consecutive checkpoints whose KLs bracket k (module docstring)."""
    kl = np.asarray(kl, dtype=float)
    out = []
    for t in range(len(kl) - 1):
        low, high = kl[t], kl[t + 1]
        if min(low, high) <= k <= max(low, high):
            out.append((t, 0.0 if high == low else (k - low) / (high - low)))
    if len(kl) == 1 and kl[0] == k:
        out.append((0, 0.0))
    return out


@dataclass(frozen=True)
class AtKL:
    """Per-prompt values at a KL level, the setting they came from and the KLs of the bracketing checkpoints."""

    values: np.ndarray  # [prompts] (or [prompts, columns])
    setting: int
    kl_low: float
    kl_high: float


def at_kl(kl: np.ndarray, values: np.ndarray, k: float, setting: int = 0) -> list[AtKL]:
    """Every bracketing segment's interpolated values ([T, prompts, ...] -> [prompts, ...]) at KL k on one curve."""
    out = []
    for t, w in segments_at(kl, k):
        upper = values[min(t + 1, len(values) - 1)]
        out.append(AtKL((1 - w) * values[t] + w * upper, setting, float(min(kl[t], kl[min(t + 1, len(kl) - 1)])),
                        float(max(kl[t], kl[min(t + 1, len(kl) - 1)]))))
    return out


def envelope_at_kl(curves: list[tuple[np.ndarray, np.ndarray]], k: float) -> AtKL | None:
    """The upper envelope at KL k over one (draw, seed)'s settings: ``curves`` is [(kl [T], gold [T, prompts, ...]),
    ...] one per setting; the bracketing segment with the highest mean of column 0 wins; None where none brackets k."""
    candidates = [point for index, (kl, values) in enumerate(curves) for point in at_kl(kl, values, k, index)]
    if not candidates:
        return None
    return max(candidates, key=lambda point: float(np.mean(np.reshape(point.values, (len(point.values), -1))[:, 0])))


def best_under_budget(kl: np.ndarray, score: np.ndarray, budget: float) -> int | None:
    """Index of the highest ``score`` among points with ``kl`` <= ``budget`` (first on ties); None if none is."""
    kl, score = np.asarray(kl, dtype=float), np.asarray(score, dtype=float)
    allowed = np.flatnonzero((kl <= budget) & ~np.isnan(score))
    return None if len(allowed) == 0 else int(allowed[np.argmax(score[allowed])])


def gao_fit(kl: np.ndarray, reward: np.ndarray, form: str) -> dict[str, float]:
    """Least-squares alpha, beta of R = d (alpha - beta d) (``bon``) or d (alpha - beta log d) (``rl``) over points
    with KL > 0, with R^2, the number of points and the fitted peak (KL*, R*) when beta > 0."""
    kl, reward = np.asarray(kl, dtype=float), np.asarray(reward, dtype=float)
    keep = (kl > 1e-9) & ~np.isnan(reward)
    d, r = np.sqrt(kl[keep]), reward[keep]
    out = {"alpha": float("nan"), "beta": float("nan"), "r2": float("nan"), "points": int(keep.sum()),
           "peak_kl": float("nan"), "peak_reward": float("nan")}
    if len(d) < 3:
        return out
    design = np.stack([d, -d * d if form == "bon" else -d * np.log(d)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - design @ np.array([alpha, beta])
    total = ((r - r.mean()) ** 2).sum()
    out.update(alpha=float(alpha), beta=float(beta), r2=float(1 - (residual ** 2).sum() / total) if total > 0
               else float("nan"))
    if beta > 0:
        peak = alpha / (2 * beta) if form == "bon" else math.exp(min(alpha / beta - 1, 50.0))
        out.update(peak_kl=float(peak ** 2), peak_reward=float(gao_curve(alpha, beta, form, np.array([peak]))[0]))
    return out


def gao_curve(alpha: float, beta: float, form: str, d: np.ndarray) -> np.ndarray:
    """R(d) of Gao et al.'s form ``bon`` or ``rl``."""
    d = np.asarray(d, dtype=float)
    return d * (alpha - beta * d) if form == "bon" else d * (alpha - beta * np.log(np.maximum(d, 1e-12)))
