"""The numbers of an evaluation, as pure maths on scores: paired wins, pass@k, and a mean with its interval.

* ``paired_wins(scores, baseline)``: 1 where a reply scores above the baseline's reply to the same prompt drawn
  with the same seed, 1/2 on a tie, 0 below (AlpacaEval / MT-Bench count ties as half a win);
* ``pass_at_k(n, c, k)``: the unbiased estimator of Chen et al. 2021 (Codex, eq. 1) of the chance that at least
  one of k samples is correct, from n >= k samples of which c are correct::

      pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

  (the product form is theirs too: no large binomials);
* ``mean_interval(values)``: the mean over the units (prompts) and its normal-approximation interval
  mean +- z_{(1 + level) / 2} * sd / sqrt(n), sd with n - 1 in the denominator, clipped to ``bounds``. The units
  are prompts: the samples of one prompt are averaged first, so they are not counted as independent. NaN values
  (unscorable) are left out. For a share in [0, 1] that is 1 (or 0) on every unit the normal interval has no
  width; there the exact (Clopper-Pearson) interval of n successes in n trials is given: [(a / 2)^(1/n), 1] for
  a = 1 - level (and its mirror at 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist


def paired_wins(scores: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """1.0 / 0.5 / 0.0 per pair: ``scores[i]`` above / equal to / below ``baseline[i]``; NaN where either is NaN
    (an unscorable reply: left out of the means, not counted as a loss)."""
    if len(scores) != len(baseline):
        raise ValueError(f"paired_wins: {len(scores)} scores against {len(baseline)} baseline scores")
    return [math.nan if math.isnan(s) or math.isnan(b) else 1.0 if s > b else 0.5 if s == b else 0.0
            for s, b in zip(scores, baseline)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased pass@k from ``n`` samples with ``c`` correct (``k <= n``)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(n: int) -> list[int]:
    """The k reported for n samples per prompt: 1, 2, 4, ... up to n, and n itself."""
    ks = [k for k in (2 ** p for p in range(n.bit_length())) if k <= n]
    return ks if ks[-1] == n else ks + [n]


def mean_interval(values: Sequence[float], level: float = 0.95,
                  bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float, float]:
    """``(mean, low, high)`` over ``values`` (one per unit); low and high are NaN for one value (no spread known)."""
    values = [v for v in values if not math.isnan(v)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, math.nan
    if bounds == (0.0, 1.0) and all(v == values[0] for v in values) and mean in (0.0, 1.0):
        edge = ((1 - level) / 2) ** (1 / n)  # Clopper-Pearson for n of n (or 0 of n)
        return (mean, edge, 1.0) if mean == 1.0 else (mean, 0.0, 1.0 - edge)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = NormalDist().inv_cdf((1 + level) / 2) * sd / math.sqrt(n)
    return mean, max(mean - half, bounds[0]), min(mean + half, bounds[1])
