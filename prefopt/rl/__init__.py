"""The online (RL) core every online algorithm builds on: the engine (``engine``: G samples per prompt with group
ids), reward components and their composition (``rewards``), advantage estimators by name (``advantages``), policy losses by name (``losses``) and the
collect -> score -> advantages -> update skeleton (``algorithm.OnlineAlgorithm``). Below prefopt.algorithms:
nothing here imports it."""

from prefopt.rl import advantages, losses  # noqa: F401  (registers the estimators and losses)
