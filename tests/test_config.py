"""Config: recipes, overrides, validation errors that name the key; every shipped recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefopt.config import load_config, parse_overrides
from prefopt.errors import ConfigError, UnknownNameError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_overrides_parse_nested_and_typed():
    assert parse_overrides(["train.max_steps=5", "algorithm.beta=0.2", "data.subsets=[a, b]"]) == {
        "train": {"max_steps": 5}, "algorithm": {"beta": 0.2}, "data": {"subsets": ["a", "b"]}}


def test_exponent_floats_are_numbers(tmp_path):
    cfg = load_config(write(tmp_path, "algorithm: dpo\ntrain: {learning_rate: 5e-5}\n"), ["algorithm.beta=1e-1"])
    assert (cfg.train.learning_rate, cfg.algorithm.beta) == (5e-5, 0.1)


def test_recipe_plus_overrides(tmp_path):
    path = write(tmp_path, "algorithm: {name: dpo, beta: 0.3}\ntrain: {max_steps: 7}\n")
    cfg = load_config(path, ["algorithm.loss=ipo", "train.batch_size=2"])
    assert (cfg.algorithm.beta, cfg.algorithm.loss, cfg.train.max_steps, cfg.train.batch_size) == (0.3, "ipo", 7, 2)
    assert cfg.algorithm_name == "dpo"


@pytest.mark.parametrize("override,message", [
    ("train.max_step=3", "unknown config key 'train.max_step'; did you mean 'max_steps'?"),
    ("algorithm.bta=0.1", "unknown config key 'algorithm.bta'; did you mean 'beta'?"),
    ("train.batch_size=abc", "train.batch_size='abc': expected an integer"),
    ("train.batch_size=0", "train.batch_size=0: must be > 0"),
    ("algorithm.beta=-1", "algorithm.beta=-1.0: must be > 0"),
    ("model.dtype=float64", "model.dtype='float64': must be one of"),
    ("trian.max_steps=1", "unknown section 'trian'; did you mean 'train'?"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    path = write(tmp_path, "algorithm: dpo\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert message in str(info.value)


def test_unknown_algorithm_lists_names(tmp_path):
    with pytest.raises(UnknownNameError, match="Known: .*dpo"):
        load_config(write(tmp_path, "algorithm: dppo\n"))


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="recipe 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"dpo_hh_tiny.yaml", "orpo_hh_tiny.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_validates(recipe):
    if "accelerate" in recipe.parts:
        pytest.skip("accelerate launcher config, not a prefopt recipe")
    if "bench" in recipe.parts:
        from prefopt.bench.recipes import load_bench

        load_bench(recipe)
        return
    cfg = load_config(recipe)
    assert cfg.train.max_steps > 0
