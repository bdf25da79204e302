"""Registry: decorator registration, duplicate and unknown names, and a plugin from outside prefopt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefopt.errors import PrefoptError, UnknownNameError
from prefopt.registry import ALGORITHMS, LOSSES, Registry, available, get

REPO = Path(__file__).resolve().parents[1]


def test_builtins_are_registered():
    assert {"dpo", "orpo"} <= set(available())
    assert {"sigmoid", "ipo", "hinge", "cdpo"} <= set(LOSSES.available())
    assert get("dpo").kind == "pairs"


def test_duplicate_name_is_an_error():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(PrefoptError, match="'a' is already registered"):
        reg.register("a")(lambda: 2)


def test_unknown_name_lists_known_names_and_closest():
    with pytest.raises(UnknownNameError) as info:
        ALGORITHMS.get("dpoo")
    message = str(info.value)
    assert "unknown algorithm 'dpoo'" in message
    assert "Did you mean 'dpo'?" in message
    assert "orpo" in message  # the known names are listed
    with pytest.raises(UnknownNameError, match="Did you mean 'sigmoid'"):
        LOSSES.get("sigmod")


def write_plugin(root: Path) -> None:
    """A third-party package 'my_prefopt_plugin' with an entry point in group prefopt.algorithms."""
    package = root / "my_prefopt_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent('''
        """A loss that lives outside prefopt: DPO's sigmoid loss with the margin scaled by 2 (for the test)."""
        import torch.nn.functional as F
        from prefopt.registry import LOSSES

        @LOSSES.register("double_sigmoid")
        def double_sigmoid(logps, beta, scale: float = 2.0):
            return -F.logsigmoid(scale * beta * (logps.chosen_logratios - logps.rejected_logratios))
    '''))
    dist = root / "my_prefopt_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-prefopt-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[prefopt.algorithms]\ndouble_sigmoid = my_prefopt_plugin\n")


@pytest.mark.slow
def test_plugin_from_another_package_registers_a_loss_that_trains_by_name(tmp_path, tiny_model_dir, hh_path):
    write_plugin(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    listed = subprocess.run([sys.executable, "-m", "prefopt.cli", "list", "--json"], env=env, capture_output=True,
                            text=True, check=True)
    assert "double_sigmoid" in json.loads(listed.stdout)["losses"]
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "train", str(REPO / "recipes" / "dpo_hh_tiny.yaml"),
         f"model.name_or_path={tiny_model_dir}", f"data.path={hh_path}", "data.max_examples=16",
         "algorithm.loss=double_sigmoid", "algorithm.loss_params={scale: 3.0}", "train.max_steps=2",
         "train.batch_size=4", "train.eval_batch_size=8", "train.max_eval_batches=1", "train.log_every=1",
         f"train.output_dir={out}", "train.progress=false", "train.save_model=false"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert json.loads((out / "prefopt_config.json").read_text())["algorithm"]["loss"] == "double_sigmoid"
    # at step 1 policy == reference, so the loss is exactly log 2 whatever the scale
    assert rows[0]["train/loss"] == pytest.approx(0.693147, abs=1e-4)
