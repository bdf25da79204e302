"""Dropout is off by default for every algorithm (``model.disable_dropout``, as TRL's ``disable_dropout``).

On ``gpt2-real`` (GPT-2's default dropout 0.1) with learning rate 0 the policy stays equal to its reference, so
DPO's loss is exactly log 2 at every step and KTO's KL estimate is 0 with loss 0.5; with dropout left on they are
not (the switch is real). Parity with TRL on the dropout model, in train mode: tests/test_parity_trl.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prefopt.config import LoraConfig, ModelConfig, build_run_config
from prefopt.models import load_causal_lm, load_reward_model
from prefopt.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def logged_rows(model_dir: Path, hh_path: Path, out: Path, algorithm: str, disable_dropout: bool) -> list[dict]:
    """Three steps at learning rate 0 (the policy never moves); the train rows of metrics.jsonl."""
    config = build_run_config({
        "algorithm": {"name": algorithm},
        "model": {"name_or_path": str(model_dir), "disable_dropout": disable_dropout},
        "data": {"path": str(hh_path), "eval_fraction": 0.0, "max_examples": 12, "max_length": 96,
                 "max_prompt_length": 48},
        "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 4, "learning_rate": 0.0, "log_every": 1,
                  "progress": False, "save_model": False, "mixed_precision": "no"},
    })
    Trainer(config).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/loss" in row]


def test_dpo_at_learning_rate_0_is_log_2_on_a_dropout_model(gpt2_real_dir, hh_path, tmp_path):
    rows = logged_rows(gpt2_real_dir, hh_path, tmp_path / "off", "dpo", disable_dropout=True)
    assert len(rows) == 3
    for row in rows:
        assert row["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    noisy = logged_rows(gpt2_real_dir, hh_path, tmp_path / "on", "dpo", disable_dropout=False)
    assert max(abs(row["train/loss"] - math.log(2)) for row in noisy) > 1e-3  # dropout 0.1 really was on


def test_kto_kl_estimate_is_0_at_learning_rate_0_on_a_dropout_model(gpt2_real_dir, hh_path, tmp_path):
    rows = logged_rows(gpt2_real_dir, hh_path, tmp_path / "off", "kto", disable_dropout=True)
    assert len(rows) == 3
    for row in rows:
        assert row["kto/kl"] == 0.0
        assert row["train/loss"] == pytest.approx(0.5, abs=1e-6)
    noisy = logged_rows(gpt2_real_dir, hh_path, tmp_path / "on", "kto", disable_dropout=False)
    assert max(row["kto/kl"] for row in noisy) > 1e-3


def test_every_loader_turns_dropout_off(gpt2_real_dir):
    cfg = ModelConfig(name_or_path=str(gpt2_real_dir), lora=LoraConfig(r=4, dropout=0.05))
    loaded = (load_causal_lm(cfg), load_causal_lm(cfg, trainable=False),
              load_reward_model(str(gpt2_real_dir), cfg, trainable=True))  # the reward stage: a new head
    for model in loaded:
        probabilities = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
        assert probabilities, "gpt2-real has dropout modules"
        model_dropouts = {p for name, p in probabilities.items() if "lora_dropout" not in name}
        assert model_dropouts == {0.0}
    adapter = {m.p for name, m in load_causal_lm(cfg).named_modules()
               if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)}
    assert adapter == {0.05}  # the adapter's own dropout is the one the user set
    kept = load_causal_lm(ModelConfig(name_or_path=str(gpt2_real_dir), disable_dropout=False))
    assert {m.p for m in kept.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
