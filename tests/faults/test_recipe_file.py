"""Recipes that cannot hurt: hostile YAML refused fast, merge keys supported, ${VAR} errors naming variable and key.

Through ``prefopt.cli.main`` (exit code 2 and one ``prefopt:`` line) where a user would meet it; no training runs
(every case is refused, or only parsed, before a model is loaded).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.config import load_config
from prefopt.errors import ConfigError
from prefopt.recipe_file import MAX_NODES, read_yaml

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
algorithm: {name: dpo}
"""


def one_line(code: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("prefopt:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, (code, stderr)
    return lines[0]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_billion_laughs_recipe_is_refused_in_well_under_a_second(tmp_path, capsys):
    recipe = write(tmp_path, BILLION_LAUGHS)
    start = time.perf_counter()
    code = main(["train", str(recipe)])
    elapsed = time.perf_counter() - start
    line = one_line(code, capsys.readouterr().err)
    assert line == (f"prefopt: error: {recipe}: its aliases (*name) expand to more than {MAX_NODES} values (a "
                    "'billion laughs' recipe?); refused")
    assert elapsed < 0.5, elapsed  # it hung the CLI before


def test_a_huge_recipe_is_refused_unread(tmp_path, capsys):
    recipe = write(tmp_path, "algorithm: {name: dpo}\n" + "# padding\n" * 200_000)
    line = one_line(main(["train", str(recipe)]), capsys.readouterr().err)
    assert "more than a recipe may hold (1048576)" in line


def test_merge_keys_are_supported_and_a_written_key_overrides_a_merged_one(tmp_path):
    recipe = write(tmp_path, """\
defaults: &defaults {max_steps: 7, batch_size: 2, learning_rate: 1.0e-4}
algorithm: {name: dpo}
model: {name_or_path: gpt2}
train:
  <<: *defaults
  batch_size: 4
  output_dir: runs/x
""")
    data = read_yaml(recipe)
    assert data["train"] == {"max_steps": 7, "batch_size": 4, "learning_rate": 1.0e-4, "output_dir": "runs/x"}
    twice = write(tmp_path, "train:\n  <<: {seed: 1}\n  seed: 2\n  seed: 3\n")
    with pytest.raises(ConfigError, match="recipe.yaml:4: key 'seed' is given twice \\(first on line 3\\)"):
        read_yaml(twice)


@pytest.mark.parametrize("value", ["''", "'   '"], ids=["empty", "blank"])
def test_an_empty_output_dir_is_refused(value, tmp_path, capsys):
    recipe = write(tmp_path, f"algorithm: {{name: dpo}}\ntrain: {{output_dir: {value}}}\n")
    line = one_line(main(["train", str(recipe)]), capsys.readouterr().err)
    assert line.startswith(f"prefopt: error: train.output_dir={value[1:-1]!r}: empty")


def test_every_variable_error_names_the_variable_and_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STEPS", "12")
    monkeypatch.setenv("RATE", "fast")
    monkeypatch.delenv("UNSET_DIR", raising=False)
    base = "algorithm: {name: dpo}\nmodel: {name_or_path: gpt2}\n"
    # a whole ${VAR} is read as a YAML scalar: a number where a number is expected
    ok = load_config(write(tmp_path, base + "train: {max_steps: '${STEPS}', output_dir: 'runs/${STEPS}'}\n"))
    assert ok.train.max_steps == 12 and ok.train.output_dir == "runs/12"
    cases = {
        "train: {learning_rate: '${RATE}'}": "train.learning_rate='fast': expected a number (the value of "
                                              "train.learning_rate comes from ${RATE} = 'fast')",
        "train: {output_dir: '${UNSET_DIR}'}": "train.output_dir: environment variable UNSET_DIR is not set",
        "train: {output_dir: 'runs/${UNSET_DIR'}": "train.output_dir='runs/${UNSET_DIR': a malformed ${...}",
    }
    for text, said in cases.items():
        line = one_line(main(["train", str(write(tmp_path, base + text + "\n"))]), capsys.readouterr().err)
        assert said in line, (text, line)
    # an override of the key: the variable is no longer where the value came from
    line = one_line(main(["train", str(write(tmp_path, base + "train: {learning_rate: '${RATE}'}\n")),
                          "train.learning_rate=slow"]), capsys.readouterr().err)
    assert line.endswith("train.learning_rate='slow': expected a number")
