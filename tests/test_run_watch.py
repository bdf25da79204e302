"""A run a researcher can watch and use: trackers, the console line, loadable checkpoints, samples, reference progress.

CLI-level (``prefopt.cli.main``) on the realistic GPT-2 fixture (dropout 0.1, pad = eos) and 48 HH pairs, or on
the known-reward prompts for the online algorithms; 2-3 steps each.

* ``train.report_to: [tensorboard]`` writes an event file whose scalars are the numbers of metrics.jsonl
  (read back with tensorboard's EventAccumulator); a tracker whose package is missing is an error at start;
* a console line every ``log_every`` steps with the progress bar off (step, loss, key metrics, lr, tok/s,
  elapsed, ETA); the final JSON on stdout once;
* each ``checkpoints/step-N/model`` loads with plain ``from_pretrained`` (model and tokenizer) and is the model
  of that step; the run config is ``prefopt_config.json`` (``config.json`` is transformers' name);
* online algorithms write sampled completions with their reward parts to samples.jsonl at each evaluation;
* DPO's reference precompute shows progress and covers only the batches a ``max_steps`` run takes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runs import short_dpo
from prefopt.cli import main
from prefopt.tasks import TASK_REWARD, write_task_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


args = short_dpo


def train(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["train", "", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- trackers
def test_tensorboard_event_file_holds_the_metrics(gpt2_real_dir, hh_small, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code, stdout, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out, "train.report_to=[tensorboard]",
                                               "train.max_steps=3", "train.eval_every=2"))
    assert code == 0, stderr
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    logged = metrics(out)
    found = {}
    for event in events:
        accumulator = EventAccumulator(str(event.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    for tag in ("train/loss", "rewards/accuracy", "rewards/margin", "train/lr", "eval/loss", "eval/rewards/accuracy"):
        expected = [(row["step"], row[tag]) for row in logged if tag in row]
        assert [s for s, _ in found[tag]] == [s for s, _ in expected], tag
        assert [v for _, v in found[tag]] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert [s for s, _ in found["eval/loss"]] == [2, 3]


@pytest.mark.parametrize("tracker, message", [
    ("wandb", "train.report_to: tracker 'wandb' needs its package, which is not installed (pip install wandb)"),
    ("tensorbord", "train.report_to: unknown tracker 'tensorbord'; known: aim, comet_ml, mlflow, tensorboard"),
])
def test_a_tracker_that_cannot_run_is_an_error_at_start(tracker, message, gpt2_real_dir, hh_small, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    if tracker == "wandb":
        from accelerate.utils import is_wandb_available

        if is_wandb_available():
            pytest.skip("wandb is installed here")
    code, _, stderr = train(capsys, *args(gpt2_real_dir, hh_small, tmp_path / "run", f"train.report_to=[{tracker}]"))
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("prefopt:")]
    assert len(lines) == 1 and lines[0].startswith(f"prefopt: error: {message}"), stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ----------------------------------------------------------------------------------------------- console
LINE = re.compile(r"^step (\d+)/3 \| loss \d+\.\d{4} \| rewards/accuracy [\d.e+-]+ \| rewards/margin [\d.e+-]+ \| "
                  r"lr 2\.00e-03 \| [\d,]+ tok/s \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$")


def test_console_line_every_log_step_without_the_progress_bar(gpt2_real_dir, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out, "train.max_steps=3"))
    assert code == 0, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("step ")]
    assert [LINE.match(line).group(1) for line in lines] == ["1", "2", "3"], stderr
    losses = [row["train/loss"] for row in metrics(out) if "train/loss" in row]
    assert [float(line.split(" | ")[1].split()[1]) for line in lines] == pytest.approx(losses, abs=5e-5)
    assert lines[-1].endswith("ETA 0:00:00")
    assert any(line.startswith("eval at step 3: ") and " eval/loss " in line for line in stderr.splitlines())
    final = json.loads(stdout)  # stdout holds only the final JSON
    assert final["output_dir"] == str(out) and math.isfinite(final["eval/loss"])


# ----------------------------------------------------------------------------------------------- checkpoints
def test_every_checkpoint_holds_a_model_plain_from_pretrained_loads(gpt2_real_dir, hh_small, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    code, _, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out, "train.save_every=1", "train.keep_checkpoints=2"))
    assert code == 0, stderr
    assert (out / "prefopt_config.json").is_file() and not (out / "config.json").exists()
    assert json.loads((out / "prefopt_config.json").read_text())["algorithm"]["name"] == "dpo"
    final = load_file(str(out / "model" / "model.safetensors"))
    for step in (1, 2):
        model_dir = out / "checkpoints" / f"step-{step:08d}" / "model"
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
        saved = load_file(str(model_dir / "model.safetensors"))
        assert not (model_dir.parent / "model.safetensors").exists()  # the weights are stored once: in model/
        same = all(torch.equal(saved[k], final[k]) for k in saved)
        assert same == (step == 2)  # the last checkpoint's model is the final model; the first is not
        assert model.config.vocab_size == len(tokenizer)


# ----------------------------------------------------------------------------------------------- online samples
def test_online_algorithm_writes_samples_with_reward_parts(tiny_model_dir, tmp_path, capsys):
    prompts = write_task_prompts(tmp_path / "prompts.jsonl", 64, seed=0)
    out = tmp_path / "run"
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(json.dumps({
        "algorithm": {"name": "ppo", "rewards": [TASK_REWARD, {"name": "length_penalty", "weight": 0.5,
                                                               "params": {"target": 4, "coef": 0.1}}],
                      "generation": {"max_new_tokens": 6}, "epochs": 1},
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(prompts), "format": "prompts", "eval_fraction": 0.25},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "eval_batch_size": 4, "eval_every": 1,
                  "max_eval_batches": 1, "log_every": 1, "progress": False, "mixed_precision": "no"}}))
    code = main(["train", str(recipe)])
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1] * 4 + [2] * 4  # eval at step 1, and the final one at step 2
    for row in rows:
        assert row.keys() == {"step", "prompt", "response", "reward", "reward_parts"}
        assert row["prompt"] and isinstance(row["response"], str)
        parts = row["reward_parts"]
        assert parts.keys() == {"target_token", "length_penalty"}
        assert row["reward"] == pytest.approx(parts["target_token"] + 0.5 * parts["length_penalty"], abs=1e-6)
    final = json.loads((out / "summary.json").read_text())
    last = [row["reward"] for row in rows if row["step"] == 2]
    assert final["eval/reward/score"] == pytest.approx(sum(last) / len(last), abs=1e-6)  # the same 4 samples
    assert sum(line.startswith("  sample: ...") for line in stderr.splitlines()) == 4  # 2 per evaluation


# ----------------------------------------------------------------------------------------------- precompute
def test_reference_precompute_shows_progress_and_covers_only_the_batches_used(gpt2_real_dir, hh_small, tmp_path,
                                                                              capsys, monkeypatch):
    from prefopt import trainer as trainer_module

    seen = {}
    fit = trainer_module.Trainer._fit

    def spy(self):
        result = fit(self)
        seen.update({split: len(table) for split, table in self.algorithm.cache.values.items()})
        seen["rows"] = self.data_report["rows"]
        return result

    monkeypatch.setattr(trainer_module.Trainer, "_fit", spy)
    out = tmp_path / "run"
    code, _, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out, "algorithm.precompute_reference=true",
                                          "train.progress=true", "train.max_eval_batches=1", "train.eval_every=0"))
    assert code == 0, stderr
    assert seen["rows"]["train"] == 16 and seen["rows"]["eval"] > 8
    assert seen["train"] == 8  # 2 steps x 4 pairs, not the 16 training pairs
    assert seen["eval"] == 8  # one evaluation batch
    assert "reference log-probs (train): 100%" in stderr and "2/2" in stderr
