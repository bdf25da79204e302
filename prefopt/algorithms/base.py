"""Moved: the algorithm contract lives in prefopt.algorithm (below prefopt.rl, which builds on it)."""

from prefopt.algorithm import Algorithm  # noqa: F401
