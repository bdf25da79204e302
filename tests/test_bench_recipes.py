"""prefopt.bench.recipes (and the dataclasses of prefopt.bench.config): every shipped bench recipe validates, the
default profile is the whole zoo with its oracle, replicates and selection, errors name the bench key, the KL knob is
dispatched on what an algorithm declares, and the keys the bench owns cannot be set by a partial recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prefopt.bench.recipes import knob_field, knob_values, load_bench, train_recipe
from prefopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "recipes" / "bench"
WORLD_TINY = BENCH / "world_tiny_test.yaml"
ZOO = {"ppo", "a2c", "grpo", "rloo", "reinforce_pp", "dpo", "orpo", "kto"}


def test_every_bench_recipe_validates_and_the_default_is_the_whole_zoo():
    for recipe in sorted(BENCH.glob("*.yaml")):
        cfg = load_bench(recipe)
        assert cfg.labels and cfg.seeds and cfg.name == recipe.stem
    default = load_bench(BENCH / "world_default.yaml")
    assert default.task == "world" and set(default.labels) == ZOO and default.oracles == ["ppo"]
    assert default.draws >= 3 and default.draws * len(default.seeds) >= 10 and default.workers == 2
    assert all(len(default.frontier.knob_values[label]) >= 3 for label in default.labels)
    assert default.frontier.checkpoints >= 8 and max(default.frontier.best_of_n) == 256
    assert len(default.select.learning_rates) >= 3 and not set(default.select.seeds) & set(default.train_seeds())
    assert default.budget.epochs >= 1
    assert "world_default.yaml" in (REPO / "Makefile").read_text()
    hh = load_bench(BENCH / "hh_default.yaml")
    assert hh.task == "hh" and set(hh.labels) == ZOO and hh.splits.fractions["eval"] * 2000 >= 500


@pytest.mark.parametrize("override, message", [
    ("algorithms.dpo.algorithm.bta=0.1", "algorithms.dpo: unknown config key 'algorithm.bta'"),
    ("algorithms.dpo.train.seed=3", "train.seed is set by the bench"),
    ("algorithms.dpo.data.path=x.jsonl", "data.path is set by the bench"),
    ("defaults.model.name_or_path=gpt2", "model.name_or_path is set by the bench"),
    ("algorithms.dpo.train.max_steps=3", "algorithms.dpo.train.max_steps: an offline algorithm's steps"),
    ("eval.num_prompts=0", "eval.num_prompts=0: must be > 0"),
    ("splits.fractions.eval=0.5", "splits.fractions"),
    ("only=[nope]", "only=['nope']: unknown labels"),
    ("oracles=[dpo]", "oracles: 'dpo' is not an online algorithm"),
    ("colour=red", "unknown config key 'colour'"),
    ("frontier.knob_values={nope: [0.1]}", "frontier.knob_values"),
    ("select.seeds=[1000]", "select.seeds=[1000]: [1000] also train main runs"),
    ("select.draw=5", "select.draw=5: must be < draws"),
    ("budget.epochs=0.5", "budget.epochs=0.5: offline algorithms see every labelled pair"),
    ("start.pt.data.path=", "start.pt.data.path: the world's parts are prompts"),
    ("world.demonstrations=0", "start.sft.data.path: the world's parts are prompts"),
    ("eval.generation.max_new_tokens=6", "eval.generation.max_new_tokens=6: the world's true reward is per budget T"),
])
def test_bench_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.").replace("'", ".")):
        load_bench(WORLD_TINY, [override])


def test_knob_dispatch_uses_the_declared_field_and_falls_back_by_config():
    from prefopt.registry import ALGORITHMS

    assert {name: knob_field(ALGORITHMS.get(name)) for name in sorted(ZOO)} == {
        "a2c": "kl_coef", "dpo": "beta", "grpo": "kl_coef", "kto": "beta", "orpo": "beta", "ppo": "kl_coef",
        "reinforce_pp": "kl_coef", "rloo": "kl_coef"}

    @dataclass
    class Both:
        beta: float = 0.1
        kl_coef: float = 0.1
        rewards: list = field(default_factory=list)

    @dataclass
    class Tau:
        tau: float = 0.1

    class Declared:  # a plugin registered later that declares its knob
        kind, Config, kl_knob = "prompts", Tau, "tau"

    class Ambiguous:  # beta and kl_coef: no guess
        kind, Config = "prompts", Both

    class Undeclared:  # a declared name that is not a field is ignored
        kind, Config, kl_knob = "pairs", Tau, "beta"

    assert knob_field(Declared) == "tau" and knob_field(Ambiguous) is None and knob_field(Undeclared) is None


def test_knob_values_are_the_grid_or_the_recipes_value():
    cfg = load_bench(WORLD_TINY, ["frontier.knob_values={dpo: [0.5, 0.1]}",
                                  "algorithms.ppo2={algorithm: {name: ppo, kl_coef: 0.3}}"])
    assert knob_values(cfg, "dpo") == ("beta", [0.1, 0.5])
    assert knob_values(cfg, "ppo2") == ("kl_coef", [0.3])  # no grid: the recipe's value, one point


def test_a_run_recipe_gets_the_bench_keys_last_and_an_online_one_the_bench_reward():
    cfg = load_bench(WORLD_TINY)
    rewards = [{"name": "reward_model", "params": {"path": "/proxy"}}]
    recipe = train_recipe(cfg, {"algorithm": {"epochs": 1}, "train": {"learning_rate": 0.1}}, "algorithms.ppo",
                          algorithm="ppo", model="/start", data_path="/prompts.jsonl", output_dir="/out", seed=7,
                          run=True, rewards=rewards, settings={"kl_coef": 0.2}, train={"learning_rate": 0.01})
    assert recipe["algorithm"] == {"name": "ppo", "epochs": 1, "rewards": rewards, "kl_coef": 0.2,
                                   "generation": recipe["algorithm"]["generation"]}
    assert recipe["algorithm"]["generation"]["max_new_tokens"] == cfg.eval.generation.max_new_tokens
    assert recipe["model"] == {"name_or_path": "/start"} and recipe["data"]["path"] == "/prompts.jsonl"
    assert recipe["data"]["eval_fraction"] == 0.0 and not recipe["data"]["length_bucketing"]
    train = recipe["train"]
    assert (train["output_dir"], train["seed"], train["learning_rate"]) == ("/out", 7, 0.01)
    with pytest.raises(ConfigError, match="start.sft.algorithm.name: this stage runs 'sft', not 'dpo'"):
        train_recipe(cfg, {"algorithm": "dpo"}, "start.sft", algorithm="sft", model="/m", data_path="/d",
                     output_dir="/o", seed=0, run=False)
