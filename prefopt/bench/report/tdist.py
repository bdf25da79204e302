"""Student's t distribution for the report's intervals (numpy only: the project does not depend on scipy).

CDF through the regularized incomplete beta function (Numerical Recipes, 3rd ed., section 6.4):
P(T <= t) = 1 - I_x(df / 2, 1 / 2) / 2 with x = df / (df + t^2), for t >= 0; I_x by Lentz's continued fraction.
The quantile inverts the tail by Newton's method in log t. Every function takes arrays (df may be fractional:
Satterthwaite).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

_TINY = 1e-300


def _beta_continued_fraction(a: np.ndarray, b: np.ndarray, x: np.ndarray, iterations: int = 400) -> np.ndarray:
    """The continued fraction of I_x(a, b) (NR eq. 6.4.5), modified Lentz; converges fast for x < (a+1)/(a+b+2)."""
    def clamp(v: np.ndarray) -> np.ndarray:
        return np.where(np.abs(v) < _TINY, _TINY, v)

    c = np.ones_like(x)
    d = 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d.copy()
    for m in range(1, iterations + 1):
        for numerator in (m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))):
            d = 1.0 / clamp(1.0 + numerator * d)
            c = clamp(1.0 + numerator / c)
            h = h * d * c
        if np.all(np.abs(d * c - 1.0) < 1e-13):
            break
    return h


def incomplete_beta(a, b, x) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b) for x in [0, 1] (NR eq. 6.4.9 symmetry for fast convergence)."""
    a, b, x = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (a, b, x)))
    lbeta = _lgamma(a + b) - _lgamma(a) - _lgamma(b)
    inner = (x > 0) & (x < 1)
    safe = np.where(inner, x, 0.5)
    front = np.exp(lbeta + a * np.log(safe) + b * np.log1p(-safe))
    direct = safe < (a + 1.0) / (a + b + 2.0)  # else the symmetry I_x(a, b) = 1 - I_(1-x)(b, a) converges faster
    first, second = np.where(direct, a, b), np.where(direct, b, a)
    fraction = front * _beta_continued_fraction(first, second, np.where(direct, safe, 1.0 - safe)) / first
    value = np.where(direct, fraction, 1.0 - fraction)
    return np.where(x <= 0, 0.0, np.where(x >= 1, 1.0, value))


def t_cdf(t, df) -> np.ndarray:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    t, df = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(df, dtype=float))
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return np.where(t >= 0, 1.0 - tail, tail)


def t_density(t, df) -> np.ndarray:
    """The density of Student's t."""
    t, df = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(df, dtype=float))
    log_norm = _lgamma((df + 1) / 2) - _lgamma(df / 2) - 0.5 * np.log(df * math.pi)
    return np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df))


def t_quantile(q, df) -> np.ndarray:
    """The q-quantile of Student's t: Newton's method on log P(T > t) against log t (nearly linear in the heavy
    tail, so a few steps from the normal quantile suffice), to a relative 1e-10."""
    q, df = np.broadcast_arrays(np.asarray(q, dtype=float), np.asarray(df, dtype=float))
    tail = np.minimum(q, 1 - q)  # solve P(T > t) = tail for t >= 0, then mirror
    inner = tail < 0.5
    target = np.log(np.where(inner, tail, 0.25))
    normal = np.vectorize(NormalDist().inv_cdf, otypes=[float])(1 - np.where(inner, tail, 0.25))
    log_t = np.log(np.maximum(normal, 1e-8))
    for _ in range(100):
        t = np.exp(log_t)
        upper = t_two_sided_p(t, df) / 2
        step = (np.log(upper) - target) / (t * t_density(t, df) / upper)
        log_t = log_t + step
        if np.all(np.abs(step) < 1e-10):
            break
    value = np.where(inner, np.exp(log_t), 0.0)
    return np.where(q >= 0.5, value, -value)


def _lgamma(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.lgamma, otypes=[float])(x)


def t_two_sided_p(t, df) -> np.ndarray:
    """Two-sided p-value 2 P(T >= |t|)."""
    t, df = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(df, dtype=float))
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
