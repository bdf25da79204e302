"""The ``prefopt train`` recipes the bench writes for each stage and run, from the bench's partial recipes.

Every recipe is ``merge(bench base, partial)`` with the keys the bench owns written last: the start model,
the training data (a pinned part file), output_dir and seed. A partial recipe that sets one of those is an
error (the point of the bench is that they are the same for everyone). Online algorithms (those whose Config
has ``rewards``) get the bench's reward (the proxy RM, or the known task reward) unless their recipe gives
one, and the evaluation's sampler unless their recipe sets ``generation``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from prefopt.bench.config import BenchConfig
from prefopt.config import build_run_config
from prefopt.recipe_file import merge
from prefopt.errors import ConfigError, UnknownNameError
from prefopt.registry import ALGORITHMS

OWNED = {"model": ("name_or_path",), "train": ("output_dir", "seed")}
"""Keys of a partial recipe set by the bench for every run."""


def _owned_keys(partial: dict[str, Any], where: str, data_path_owned: bool) -> None:
    owned = dict(OWNED, data=("path", "format", "subsets", "split")) if data_path_owned else OWNED
    for section, keys in owned.items():
        for key in keys:
            if key in (partial.get(section) or {}):
                raise ConfigError(f"{where}: {section}.{key} is set by the bench for every run; remove it")


def _split_algorithm(partial: dict[str, Any], default_name: str, where: str) -> tuple[str, dict[str, Any]]:
    partial = partial if isinstance(partial, dict) else {}
    algo = partial.pop("algorithm", None) or {}
    if isinstance(algo, str):
        algo = {"name": algo}
    if not isinstance(algo, dict):
        raise ConfigError(f"{where}.algorithm: expected a mapping of the algorithm's settings")
    algo = dict(algo)
    return str(algo.pop("name", default_name)), algo


def _lengths(cfg: BenchConfig) -> dict[str, Any]:
    return {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}


def _data(path: str, cfg: BenchConfig) -> dict[str, Any]:
    """A pinned part file read whole: its own hash split is switched off (eval_fraction 0), and so is length
    bucketing (it yields a partial batch first: every update of every algorithm gets the same rows)."""
    return {"path": path, "format": "auto", "eval_fraction": 0.0, "length_bucketing": False, **_lengths(cfg)}


def stage_recipe(cfg: BenchConfig, stage: str, partial: dict[str, Any], model_path: str, data_path: str,
                 eval_path: str | None, output_dir: str) -> dict[str, Any]:
    """Recipe of a start stage (pt, sft) or a reward model (algorithm ``reward``).

    ``data.path`` may be set by the partial recipe (e.g. pretraining text for a synthetic start); the
    default is the pinned part file. ``eval_path`` (the eval part) gives the stage's held-out metrics.
    """
    where = f"start.{stage}" if stage in ("pt", "sft") else f"reward_models.{stage}"
    partial = copy.deepcopy(partial)
    _owned_keys(partial, where, data_path_owned=False)
    name, algo = _split_algorithm(partial, "reward" if stage in ("proxy", "gold") else stage, where)
    expected = "reward" if stage in ("proxy", "gold") else stage
    if name != expected:
        raise ConfigError(f"{where}.algorithm.name: this stage runs {expected!r}, not {name!r}")
    base = {"model": {"name_or_path": model_path}, "data": _data(data_path, cfg),
            "train": {"progress": False, "resume": "auto"}}
    recipe = merge(base, partial)
    if eval_path is not None:
        data = recipe["data"]
        recipe["eval_data"] = merge(_data(eval_path, cfg), {"max_length": data["max_length"],
                                                            "max_prompt_length": data["max_prompt_length"]})
    recipe["algorithm"] = {"name": name, **algo}
    recipe["model"]["name_or_path"] = model_path
    recipe["train"].update(output_dir=output_dir, seed=cfg.start.init.seed)
    return recipe


def algorithm_recipe(cfg: BenchConfig, label: str, start_path: str, data_paths: dict[str, str],
                     rewards: list[dict[str, Any]], output_dir: str, seed: int,
                     knob: tuple[str, float] | None = None, learning_rate: float | None = None) -> dict[str, Any]:
    """Recipe of one (algorithm, seed) run: ``merge(defaults, algorithms[label])`` over the bench base, with
    ``knob`` (field, value) set in its algorithm section and ``learning_rate`` in train when given.

    ``data_paths`` maps a data kind ("prompts" for online algorithms, "ranks" where the bench has K-wise rankings)
    to its training file, and "pairs" to the file of every other kind (pairs, unpaired, ...).
    UnknownNameError when the algorithm is not registered (the runner skips it with that message).
    """
    where = f"algorithms.{label}"
    partial = merge(copy.deepcopy(cfg.defaults), copy.deepcopy(cfg.algorithms[label]))
    _owned_keys(partial, where, data_path_owned=True)
    name, algo = _split_algorithm(partial, label, where)
    algorithm_cls = ALGORITHMS.get(name)
    fields = {f.name for f in dataclasses.fields(algorithm_cls.Config)}
    if "rewards" in fields and not algo.get("rewards"):
        algo["rewards"] = copy.deepcopy(rewards)
    if "generation" in fields and "generation" not in algo:
        algo["generation"] = dataclasses.asdict(cfg.eval.generation)
    data_path = data_paths.get(algorithm_cls.kind) or data_paths["pairs"]  # prompts / ranks files, else pairs
    base = {"model": {"name_or_path": start_path}, "data": _data(data_path, cfg),
            "train": {"progress": False, "resume": "auto", "log_every": 1, "eval_every": 0, "save_model": True}}
    recipe = merge(base, partial)
    recipe["algorithm"] = {"name": name, **algo}
    if knob is not None:
        recipe["algorithm"][knob[0]] = knob[1]
    if learning_rate is not None:
        recipe["train"]["learning_rate"] = learning_rate
    recipe["train"].update(output_dir=output_dir, seed=seed)
    return recipe


def validate_recipes(cfg: BenchConfig) -> None:
    """Build every stage's and algorithm's recipe with placeholder paths and validate it (ConfigError naming
    the bench key). Algorithms that are not registered are left to the runner, which skips them."""
    checks: list[tuple[str, Any]] = []
    for stage in ("pt", "sft"):
        partial = getattr(cfg.start, stage)
        if partial is not None:
            checks.append((f"start.{stage}", lambda s=stage, p=partial: stage_recipe(
                cfg, s, p, "<start>", "<policy_train>", "<eval>", "<out>")))
    if cfg.task != "synthetic":
        for which in ("proxy", "gold") if cfg.task == "hh" else ("proxy",):
            checks.append((f"reward_models.{which}", lambda w=which: stage_recipe(
                cfg, w, getattr(cfg.reward_models, w), "<start>", f"<{w}_rm_train>", "<eval>", "<out>")))
    rewards = [{"name": "reward_model", "params": {"path": "<proxy_rm>"}}]
    for label in cfg.algorithms:
        checks.append((f"algorithms.{label}", lambda lb=label: algorithm_recipe(
            cfg, lb, "<start>", {"prompts": "<prompts>", "pairs": "<pairs>"}, rewards, "<out>", 0)))
    for where, build in checks:
        try:
            build_run_config(build(), where=where)
        except UnknownNameError:
            if not where.startswith("algorithms."):
                raise
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
