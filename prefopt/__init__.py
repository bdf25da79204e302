"""prefopt: a preference-optimization algorithm zoo (PPO, Sparrow-style A2C, DPO and its losses, ORPO, ...)."""

__version__ = "0.1.0"

from prefopt.registry import ALGORITHMS, LOSSES, REWARDS, available, get  # noqa: E402

__all__ = ["ALGORITHMS", "LOSSES", "REWARDS", "available", "get", "__version__"]
