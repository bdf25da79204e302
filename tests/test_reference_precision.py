"""The reference policy is scored the one way (``Algorithm.reference_forward``), in the policy's precision.

At step 0 the policy IS its reference, so under bf16 autocast every log-ratio must be exactly 0: KTO's loss is
exactly 0.5 (sigmoid(0) and a KL reference point of 0) and the KL of PPO and A2C is exactly 0. A reference
scored in float32 next to a bf16-autocast policy gives 0.500040 and KL ~1e-2 instead.
Run on the llama-chat fixture (bf16 weights, chat template, two EOS ids) through the Trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from prefopt.config import build_run_config
from prefopt.tasks import TASK_REWARD, write_task_prompts
from prefopt.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerator_state")


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; these runs need bf16, the others of the session no."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/loss" in row]


def run(algorithm: dict, model_dir: Path, data: dict, out: Path, **train) -> list[dict]:
    Trainer(build_run_config({
        "algorithm": algorithm, "model": {"name_or_path": str(model_dir)}, "data": data,
        "train": {"output_dir": str(out), "max_steps": 1, "batch_size": 4, "learning_rate": 0.0, "log_every": 1,
                  "progress": False, "save_model": False, "mixed_precision": "bf16", **train},
    })).fit()
    return train_rows(out)


def test_kto_loss_is_one_half_under_bf16_autocast(llama_chat_dir, hh_path, tmp_path):
    data = {"path": str(hh_path), "max_examples": 4, "eval_fraction": 0.0, "max_length": 96,
            "max_prompt_length": 64}
    (row,) = run({"name": "kto"}, llama_chat_dir, data, tmp_path / "kto")
    assert row["kto/kl"] == 0.0
    assert row["train/loss"] == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("algorithm", [
    {"name": "ppo", "rewards": [TASK_REWARD], "epochs": 1},
    {"name": "a2c", "trainable_layers": 1, "preference_weight": 0.0, "rules": {}, "rewards": [TASK_REWARD]},
    {"name": "grpo", "rewards": [TASK_REWARD], "num_samples": 2, "kl_coef": 0.05},
    {"name": "rloo", "rewards": [TASK_REWARD], "num_samples": 2},
], ids=["ppo", "a2c", "grpo", "rloo"])
def test_online_kl_is_zero_under_bf16_autocast(algorithm, llama_chat_dir, tmp_path):
    prompts = write_task_prompts(tmp_path / "prompts.jsonl", 8, seed=0)
    data = {"path": str(prompts), "format": "prompts", "eval_fraction": 0.0}
    (row,) = run({**algorithm, "generation": {"max_new_tokens": 6}}, llama_chat_dir, data, tmp_path / "run")
    kl = row["kl"]  # one name for every online algorithm
    assert kl == 0.0
