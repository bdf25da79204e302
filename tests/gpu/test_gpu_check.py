"""GPU checks (``make gpu-check``; skipped without CUDA by the conftest hook): every registered algorithm trains a
few steps in bf16 on a ~91M-parameter Llama built from a config (``prefopt.tiny`` size ``base``), and sft and dpo
run under ``accelerate launch`` with the FSDP and DeepSpeed ZeRO-2 configs shipped in ``recipes/accelerate/``.

Numbers checked: every logged loss is finite and no update is skipped; at step 1 the policy equals its reference,
so DPO's loss is log 2 and KTO's 0.5 with a KL estimate of 0 (bf16 autocast on both forwards: to 1e-4), also under
FSDP, where the reference is a full copy next to the sharded policy. CI never needs this module.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefopt.config import build_run_config
from prefopt.registry import ALGORITHMS
from prefopt.tiny import init_model
from prefopt.trainer import Trainer

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = ROOT / "recipes" / "accelerate"
ONLINE_REWARD = [{"name": "length_penalty", "params": {"target": 16}}]
SETTINGS = {
    "ppo": {"rewards": ONLINE_REWARD, "generation": {"max_new_tokens": 16}, "epochs": 2, "num_minibatches": 2},
    "a2c": {"trainable_layers": 2, "preference_weight": 0.0, "rules": {}, "rewards": ONLINE_REWARD,
            "generation": {"max_new_tokens": 16}},
}
STEP_ONE = {"dpo": {"train/loss": math.log(2)}, "kto": {"train/loss": 0.5, "kto/kl": 0.0}}


@pytest.fixture(scope="module")
def base_model_dir(hh_path, tmp_path_factory) -> Path:
    """Llama, 12 layers of width 768, an 8192-token BPE vocabulary trained on HH: ~91M parameters."""
    return init_model(tmp_path_factory.mktemp("base-llama"), [str(hh_path)], arch="llama", size="base",
                      vocab_size=8192, max_texts=2000)


@pytest.fixture(scope="module")
def pairs_path(hh_head) -> Path:
    return hh_head(256)


def overrides(algorithm: str, model_dir: Path, data: Path, out: Path, max_steps: int = 5) -> dict:
    return {
        "algorithm": {"name": algorithm, **SETTINGS.get(algorithm, {})},
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data), "eval_fraction": 0.05, "max_length": 512, "max_prompt_length": 256},
        "train": {"output_dir": str(out), "max_steps": max_steps, "batch_size": 8, "eval_batch_size": 8,
                  "max_eval_batches": 2, "learning_rate": 1e-5, "log_every": 1, "progress": False,
                  "mixed_precision": "bf16", "save_model": False},
    }


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/loss" in row]


def assert_trained(rows: list[dict], algorithm: str, steps: int) -> None:
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    for row in rows:
        assert math.isfinite(row["train/loss"]) and row["train/skipped_updates"] == 0, row
    for key, value in STEP_ONE.get(algorithm, {}).items():
        assert rows[0][key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.parametrize("algorithm", ALGORITHMS.available())
def test_every_algorithm_trains_in_bf16_on_a_100m_model(algorithm, base_model_dir, pairs_path, tmp_path):
    trainer = Trainer(build_run_config(overrides(algorithm, base_model_dir, pairs_path, tmp_path)))
    assert trainer.accelerator.device.type == "cuda" and trainer.accelerator.mixed_precision == "bf16"
    final = trainer.fit()
    assert_trained(train_rows(tmp_path), algorithm, 5)
    assert final["perf/peak_mem_mb"] > 0
    print(algorithm, {k: round(v, 4) for k, v in train_rows(tmp_path)[-1].items() if isinstance(v, float)})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flat(data: dict) -> list[str]:
    """A recipe dict as ``section.key=value`` overrides (values as JSON, which is YAML)."""
    return [f"{section}.{key}={json.dumps(value)}" for section, values in data.items() for key, value in values.items()]


@pytest.mark.parametrize("launch_config", ["fsdp", "deepspeed_zero2"])
@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_sft_and_dpo_under_accelerate_launch(launch_config, algorithm, base_model_dir, pairs_path, tmp_path):
    if launch_config.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ACCELERATE / f"{launch_config}.yaml"),
               "--num_processes", str(torch.cuda.device_count()), "--main_process_port", str(free_port()),
               "-m", "prefopt.cli", "train", "", *flat(overrides(algorithm, base_model_dir, pairs_path, out, 4))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    print(done.stdout[-2000:], done.stderr[-4000:])
    assert done.returncode == 0, done.stderr[-4000:]
    assert_trained(train_rows(out), algorithm, 4)
