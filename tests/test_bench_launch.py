"""prefopt.bench.launch: a run's snapshot at step s IS the policy after s updates (it equals the final model of the
same run cut to s steps), and its counters are the updates, rows, samples and tokens the algorithm really processed,
with gradient accumulation and dropout on (the realistic GPT-2: pad = eos)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prefopt.bench.launch import train


def _recipe(model_dir, data, out, algorithm, max_steps, **extra):
    return {"algorithm": algorithm, "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(data), "eval_fraction": 0.0, "max_length": 64, "max_prompt_length": 40,
                     "length_bucketing": False},
            "train": {"output_dir": str(out), "max_steps": max_steps, "batch_size": 4, "gradient_accumulation_steps": 2,
                      "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_steps": 0, "seed": 3, "log_every": 1,
                      "progress": False, **extra}}


def test_a_snapshot_is_the_policy_after_its_steps_and_the_counters_are_exact(realistic_model_dirs, hh_head, tmp_path):
    torch.set_num_threads(1)
    model, data = realistic_model_dirs["gpt2-real"], hh_head(40)
    dpo = {"name": "dpo", "beta": 0.1}
    out = train(_recipe(model, data, tmp_path / "three", dpo, 3), tmp_path / "three", snapshot_steps=[1, 2])
    assert sorted(out["snapshots"]) == [1, 2] and (tmp_path / "three" / "train.log").is_file()
    assert (out["updates"], out["rows"], out["samples"], out["final_step"]) == (3, 3 * 2 * 4, 0, 3)
    assert out["tokens"] > 0 and out["train_rows"] == 40 and out["peak_rss_mb"] > 0
    one = train(_recipe(model, data, tmp_path / "one", dpo, 1), tmp_path / "one")
    assert one["snapshots"] == {}
    snapshot = load_file(out["snapshots"][1] / "model.safetensors")
    final = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert snapshot.keys() == final.keys() and all(torch.equal(snapshot[k], final[k]) for k in final)
    start = load_file(next(model.glob("*.safetensors")))
    assert any(not torch.equal(snapshot[k], start[k]) for k in snapshot if k in start)  # it did train


def test_an_online_run_counts_its_samples_and_snapshots_whole_steps(tiny_model_dir, tmp_path):
    """An online algorithm splits each update into micro-batches itself (one loader batch per step): its snapshots
    still fall between steps (failed before: with gradient_accumulation_steps 2 the step-1 snapshot held 2 steps)."""
    from prefopt.tasks import TASK_REWARD, write_task_prompts

    prompts = write_task_prompts(tmp_path / "prompts.jsonl", 16)
    grpo = {"name": "grpo", "num_samples": 2, "rewards": [TASK_REWARD], "generation": {"max_new_tokens": 4}}
    out = train(_recipe(tiny_model_dir, prompts, tmp_path / "grpo", grpo, 3), tmp_path / "grpo", [1],
                count_flops=True)
    assert (out["updates"], out["rows"], out["samples"]) == (3, 3 * 4, 3 * 4 * 2) and out["flops"] > 0
    train(_recipe(tiny_model_dir, prompts, tmp_path / "one", grpo, 1), tmp_path / "one")
    snapshot = load_file(out["snapshots"][1] / "model.safetensors")
    final = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert all(torch.equal(snapshot[k], final[k]) for k in final)


def test_a_failed_run_says_why(tiny_model_dir, tmp_path):
    from prefopt.errors import PrefoptError

    with pytest.raises(PrefoptError, match="algorithm.bta"):
        train(_recipe(tiny_model_dir, tmp_path / "none.jsonl", tmp_path / "x", {"name": "dpo", "bta": 1}, 1),
              tmp_path / "x")
