"""Reading a bench recipe, and the ``prefopt train`` recipe of every stage and run it implies (one function).

``load_bench(path, overrides)`` reads the YAML, applies ``key=value`` overrides and validates every section and
every partial recipe against its algorithm's own Config, so a typo fails before any training.

``train_recipe(...)`` builds the recipe of a start stage (pt, sft), a reward model (proxy, gold) or a run: it is
``merge(bench base, partial)`` with the keys the bench owns written last: the start model, the training data (a
pinned part file), output_dir and seed. A partial recipe that sets one of those is an error (the point of the
bench is that they are the same for everyone). Online algorithms (whose Config has ``rewards``) get the bench's
reward (the draw's proxy RM, or the true reward for an oracle) and the evaluation's sampler unless their recipe
sets ``generation``.

``knob_field(algorithm class)`` is the Config field the bench sweeps as an algorithm's KL knob: its declared
``kl_knob``, else ``beta`` or ``kl_coef`` when its Config has exactly one of them.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from prefopt.bench.config import BenchConfig
from prefopt.bench.world import gold_spec
from prefopt.config import build_run_config, from_dict
from prefopt.errors import ConfigError, UnknownNameError
from prefopt.recipe_file import merge, parse_overrides, read_yaml
from prefopt.registry import ALGORITHMS

OWNED = {"model": ("name_or_path",), "train": ("output_dir", "seed")}
"""Keys of a partial recipe set by the bench for every stage and run."""
RUN_DATA = ("path", "format", "subsets", "split")
"""The training data of a run is the bench's (a stage's partial recipe may name its own text)."""
OFFLINE = ("pairs", "unpaired", "ranks")
"""Data kinds trained on labelled rows: their steps come from ``budget.epochs`` (prefopt.bench.plan)."""


def gold_judge(cfg: BenchConfig, gold_rm: str | None = None) -> dict[str, Any]:
    """What judges every policy, as a RewardSpec mapping: the world's true reward, or (hh) the gold RM at
    ``gold_rm``; an oracle run optimises the same true reward."""
    if cfg.task == "world":
        return gold_spec(cfg.world.max_new_tokens, cfg.world.penalty)
    return {"name": "reward_model", "weight": 1.0, "params": {"path": str(gold_rm), "max_length": cfg.data.max_length}}


def proxy_reward(cfg: BenchConfig, proxy_rm: str) -> dict[str, Any]:
    """A draw's proxy RM as a RewardSpec mapping (the online algorithms' reward and the ``proxy`` judge)."""
    return {"name": "reward_model", "weight": 1.0, "params": {"path": str(proxy_rm), "max_length": cfg.data.max_length}}


def load_bench(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    """Read a bench recipe, apply ``key=value`` overrides (``defaults.train.max_steps=5``, ``seeds=[0]``),
    validate every section and every partial recipe (ConfigError naming the bench key)."""
    data = read_yaml(path) if path else {}
    for label, partial in (data.get("algorithms") or {}).items():
        if partial is None:
            data["algorithms"][label] = {}
    data = merge(data, parse_overrides(list(overrides)))
    if "name" not in data and path:
        data["name"] = Path(path).stem
    cfg = from_dict(BenchConfig, data, "")
    validate(cfg)
    return cfg


def knob_field(algorithm_cls: Any) -> str | None:
    """The Config field that is an algorithm's KL knob (module docstring); None: it runs at one setting."""
    declared = getattr(algorithm_cls, "kl_knob", None)
    fields = {f.name for f in dataclasses.fields(algorithm_cls.Config)}
    if declared:
        return declared if declared in fields else None
    found = [name for name in ("beta", "kl_coef") if name in fields]
    return found[0] if len(found) == 1 else None


def partial_recipe(cfg: BenchConfig, label: str) -> dict[str, Any]:
    """``merge(defaults, algorithms[label])`` (a copy)."""
    return merge(copy.deepcopy(cfg.defaults), copy.deepcopy(cfg.algorithms[label]))


def algorithm_name(cfg: BenchConfig, label: str) -> str:
    algo = cfg.algorithms[label].get("algorithm") or {}
    return str(algo.get("name", label)) if isinstance(algo, dict) else str(algo)


def algorithm_class(cfg: BenchConfig, label: str) -> Any:
    """The registered class of a label's algorithm (UnknownNameError when it is not registered)."""
    return ALGORITHMS.get(algorithm_name(cfg, label))


def knob_values(cfg: BenchConfig, label: str) -> tuple[str | None, list[float | None]]:
    """A label's KL knob and its frontier values (the recipe's value, or the Config default, when none are given)."""
    algorithm_cls = algorithm_class(cfg, label)
    knob = knob_field(algorithm_cls)
    if knob is None:
        return None, [None]
    values = cfg.frontier.knob_values.get(label)
    if not values:
        partial = partial_recipe(cfg, label).get("algorithm") or {}
        default = next(f.default for f in dataclasses.fields(algorithm_cls.Config) if f.name == knob)
        values = [partial.get(knob, default) if isinstance(partial, dict) else default]
    return knob, sorted(float(v) for v in values)


def _owned_keys(partial: dict[str, Any], where: str, run: bool) -> None:
    owned = dict(OWNED, data=RUN_DATA) if run else OWNED
    for section, keys in owned.items():
        for key in keys:
            if key in (partial.get(section) or {}):
                raise ConfigError(f"{where}: {section}.{key} is set by the bench for every run; remove it")


def _split_algorithm(partial: dict[str, Any], default_name: str, where: str) -> tuple[str, dict[str, Any]]:
    algo = partial.pop("algorithm", None) or {}
    if isinstance(algo, str):
        algo = {"name": algo}
    if not isinstance(algo, dict):
        raise ConfigError(f"{where}.algorithm: expected a mapping of the algorithm's settings")
    algo = dict(algo)
    return str(algo.pop("name", default_name)), algo


def train_recipe(cfg: BenchConfig, partial: dict[str, Any], where: str, *, algorithm: str, model: str,
                 data_path: str, output_dir: str, seed: int, run: bool, eval_path: str | None = None,
                 rewards: list[dict[str, Any]] | None = None, settings: dict[str, Any] | None = None,
                 train: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``prefopt train`` recipe of a stage (``run=False``: pt, sft, reward models) or of a run (``run=True``).

    ``algorithm``: the name the partial recipe defaults to (a stage must keep it); ``data_path``: the pinned file it
    trains on (a stage's partial may name its own); ``eval_path``: held-out rows of the stage (its eval metrics);
    ``rewards``: an online algorithm's reward unless its partial gives one; ``settings``: algorithm fields the
    bench sets (the KL knob's value); ``train``: train fields the bench sets (learning rate, derived max_steps).
    """
    partial = copy.deepcopy(partial)
    _owned_keys(partial, where, run)
    name, algo = _split_algorithm(partial, algorithm, where)
    if not run and name != algorithm:
        raise ConfigError(f"{where}.algorithm.name: this stage runs {algorithm!r}, not {name!r}")
    fields = {f.name for f in dataclasses.fields(ALGORITHMS.get(name).Config)}
    if "rewards" in fields and not algo.get("rewards") and rewards is not None:
        algo["rewards"] = copy.deepcopy(rewards)
    if "generation" in fields and "generation" not in algo:
        algo["generation"] = dataclasses.asdict(cfg.eval.generation)
    lengths = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    # a pinned part file is read whole (eval_fraction 0) and without length bucketing (it yields a partial batch
    # first): every update of every algorithm gets the same rows
    data = {"path": data_path, "format": "auto", "eval_fraction": 0.0, "length_bucketing": False, **lengths}
    base = {"model": {"name_or_path": model}, "data": data,
            "train": {"progress": False, "resume": "auto", "log_every": 1 if run else 10, "eval_every": 0,
                      "save_model": True}}
    recipe = merge(base, partial)
    if eval_path is not None:
        held_out = {key: recipe["data"][key] for key in lengths}
        recipe["eval_data"] = merge({**data, "path": eval_path}, held_out)
    recipe["algorithm"] = {"name": name, **algo, **(settings or {})}
    recipe["model"]["name_or_path"] = model
    recipe["train"].update(train or {})
    recipe["train"].update(output_dir=output_dir, seed=seed)
    return recipe


def validate(cfg: BenchConfig) -> None:
    """Build every stage's and algorithm's recipe with placeholder paths and validate it (ConfigError naming the
    bench key). Labels whose algorithm is not registered are left to the runner, which skips them."""
    checks: list[tuple[str, Any]] = []
    for stage in ("pt", "sft"):
        partial = getattr(cfg.start, stage)
        if partial is not None:
            demonstrated = stage == "sft" and cfg.world.demonstrations > 0
            if cfg.task == "world" and not demonstrated and not (partial.get("data") or {}).get("path"):
                raise ConfigError(f"start.{stage}.data.path: the world's parts are prompts; give the text this stage "
                                  "learns from (e.g. the HH dialogues)" + ("" if stage == "pt" else
                                                                             ", or set world.demonstrations > 0"))
            checks.append((f"start.{stage}", lambda s=stage, p=partial: train_recipe(
                cfg, p, f"start.{s}", algorithm=s, model="<start>", data_path="<policy_train>", output_dir="<out>",
                seed=0, run=False)))
    for which in ("proxy", "gold") if cfg.task == "hh" else ("proxy",):
        checks.append((f"reward_models.{which}", lambda w=which: train_recipe(
            cfg, getattr(cfg.reward_models, w), f"reward_models.{w}", algorithm="reward", model="<start>",
            data_path=f"<{w}_rm_train>", eval_path="<eval>", output_dir="<out>", seed=0, run=False)))
    rewards = [{"name": "reward_model", "params": {"path": "<proxy_rm>"}}]
    for label in cfg.algorithms:
        checks.append((f"algorithms.{label}", lambda lb=label: _checked_run(cfg, lb, rewards)))
    for where, build in checks:
        try:
            build_run_config(build(), where=where)
        except UnknownNameError:
            if not where.startswith("algorithms.") or where[len("algorithms."):] in cfg.oracles:
                raise
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


def _checked_run(cfg: BenchConfig, label: str, rewards: list[dict[str, Any]]) -> dict[str, Any]:
    where = f"algorithms.{label}"
    algorithm_cls = algorithm_class(cfg, label)
    partial = partial_recipe(cfg, label)
    if algorithm_cls.kind in OFFLINE and "max_steps" in (cfg.algorithms[label].get("train") or {}):
        raise ConfigError(f"{where}.train.max_steps: an offline algorithm's steps are budget.epochs over all "
                          "labelled rows; set budget.epochs instead")
    if label in cfg.oracles and "rewards" not in {f.name for f in dataclasses.fields(algorithm_cls.Config)}:
        raise ConfigError(f"oracles: {label!r} is not an online algorithm (its Config has no rewards)")
    return train_recipe(cfg, partial, where, algorithm=label, model="<start>", data_path="<data>",
                        output_dir="<out>", seed=0, run=True, rewards=rewards)
