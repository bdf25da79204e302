"""A run a researcher can trust: one run per output directory, honest non-finite stops, checkpoints that fall back.

Every test drives ``prefopt train`` as a user does (``prefopt.cli.main``: exit code and the one ``prefopt:`` line),
on the realistic GPT-2 fixture (dropout 0.1, pad = eos) and 48 HH pairs, 2-4 steps each.

* output directory: a second run into a directory holding a run is refused (exit 2) unless ``train.resume=auto``
  continues the SAME run (a different config is refused, naming the keys) or ``train.overwrite=true`` clears it;
  ``output_dir/.lock`` stops a concurrent run (naming its pid); a dead holder's lock is taken over;
* non-finite: ``on_nonfinite=skip`` stops with exit 3 after ``max_skipped_updates`` skips in a row; weights gone
  non-finite are never written as a checkpoint or model; the message names the newest finite checkpoint or says
  there is none;
* resume=auto verifies the newest checkpoint (truncated weights, a key missing in the trainer state, a missing
  optimizer file) and falls back to the previous one, bit-exact; a torn last metrics line is dropped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.algorithms.losses.sigmoid import sigmoid
from prefopt.checkpoint import complete_checkpoints
from cli_runs import one_line as last_line
from cli_runs import short_dpo, train
from prefopt.registry import LOSSES

pytestmark = pytest.mark.usefixtures("one_thread")


args = short_dpo


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a model/ folder, or of a checkpoint (its model/ holds them: stored once)."""
    inner = path / "model" / "model.safetensors"
    return load_file(str(inner if inner.is_file() else path / "model.safetensors"))


# ----------------------------------------------------------------------------------------------- output directory
def test_a_second_run_into_the_same_output_dir_is_refused(gpt2_real_dir, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, *args(gpt2_real_dir, hh_small, out))[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out))
    assert code == 2
    assert last_line(stderr) == (
        f"prefopt: error: train.output_dir='{out}' already holds a run; set train.resume=auto to continue it, "
        "train.overwrite=true to start over, or choose another output_dir")
    assert (out / "metrics.jsonl").read_text() == before  # nothing of the old run touched
    assert not (out / ".lock").exists()


def test_resume_auto_continues_only_the_same_run(gpt2_real_dir, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, *args(gpt2_real_dir, hh_small, out))[0] == 0
    code, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out, "train.resume=auto", "train.learning_rate=0.001",
                                       "algorithm.beta=0.2"))
    assert code == 2
    line = last_line(stderr)
    assert line.startswith(f"prefopt: error: train.output_dir='{out}' holds a different run (config differs in "
                           "algorithm.beta: 0.1 -> 0.2; train.learning_rate: 0.002 -> 0.001)")
    # the same run, with more steps (its directory spelled another way) and another memory budget for the head's
    # logits (the same numbers, kept or recomputed): continues from its last checkpoint
    same = out.parent / ".." / out.parent.name / out.name
    assert train(capsys, *args(gpt2_real_dir, hh_small, same, "train.resume=auto", "train.max_steps=3",
                               "model.logits.keep_mb=0"))[0] == 0
    assert steps(out) == [1, 2, 2, 3, 3]  # train rows 1, 2 (+ eval at 2), then 3 (+ eval at 3)


def test_overwrite_clears_the_old_run_first(gpt2_real_dir, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, *args(gpt2_real_dir, hh_small, out, "train.max_steps=4", "train.save_every=1",
                                "train.keep_checkpoints=4"))[0] == 0
    assert len(complete_checkpoints(out)) == 4
    (out / "notes.txt").write_text("what I was trying")  # not the run's: kept
    code, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out, "train.overwrite=true", "train.save_every=1"))
    assert code == 0, stderr
    assert (out / "notes.txt").read_text() == "what I was trying"
    # the old run's step-3 and step-4 checkpoints would otherwise outrank (and prune) the new ones
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert steps(out) == [1, 2, 2]
    assert json.loads((out / "summary.json").read_text())["step"] == 2


def test_a_locked_output_dir_is_refused_and_a_stale_lock_taken_over(gpt2_real_dir, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        code, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out))
        assert code == 2
        assert last_line(stderr) == (
            f"prefopt: error: train.output_dir='{out}' is in use by another run (pid {holder.pid} on "
            f"{socket.gethostname()}, lock {out / '.lock'}); wait for it to finish or choose another output_dir")
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    code, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out))  # its holder died (kill -9): taken over
    assert code == 0, stderr
    assert not (out / ".lock").exists() and steps(out) == [1, 2, 2]


# ----------------------------------------------------------------------------------------------- non-finite
@pytest.fixture
def nan_after():
    """The DPO loss ``nan_after``: sigmoid, but every training call from ``NAN_FROM["call"]`` on is NaN."""
    state = {"call": 1, "calls": 0}

    def nan_after(logps, beta):
        losses = sigmoid(logps, beta)
        if torch.is_grad_enabled():
            state["calls"] += 1
            if state["calls"] >= state["call"]:
                return losses * float("nan")
        return losses

    LOSSES.register("nan_after")(nan_after)
    yield state
    LOSSES.unregister("nan_after")


def test_skip_stops_after_max_skipped_updates_in_a_row(gpt2_real_dir, hh_small, tmp_path, capsys, nan_after):
    nan_after["call"] = 3  # steps 1 and 2 train, every later loss is NaN
    out = tmp_path / "run"
    code, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out, "algorithm.loss=nan_after", "train.max_steps=8",
                                       "train.on_nonfinite=skip", "train.max_skipped_updates=3",
                                       "train.save_every=2"))
    checkpoint = out / "checkpoints" / "step-00000004"
    assert code == 3
    assert last_line(stderr) == (
        "prefopt: error: 3 updates in a row skipped (non-finite loss, last at step 5; train.max_skipped_updates=3); "
        f"stopped. The newest checkpoint with finite weights and optimizer state is {checkpoint}; resumed as it is, "
        f"it repeats the same steps exactly (and meets the same NaN): start a new run from {checkpoint / 'model'} "
        "with a lower train.learning_rate")
    assert not (out / "model").exists() and not (out / "summary.json").exists()


def test_skip_with_no_checkpoint_says_there_is_none(gpt2_real_dir, hh_small, tmp_path, capsys, nan_after):
    out = tmp_path / "run"
    code, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out, "algorithm.loss=nan_after", "train.max_steps=20",
                                       "train.on_nonfinite=skip"))
    assert code == 3
    assert last_line(stderr).endswith("stopped. No checkpoint with finite weights and optimizer state was written, so "
                                      "there is nothing to resume from: start over with a lower train.learning_rate")
    assert "train.max_skipped_updates=10" in stderr and not (out / "checkpoints").exists()


class PoisoningAdamW(torch.optim.AdamW):
    """AdamW whose second step leaves a NaN in the weights (as an fp16 overflow or a bad kernel would)."""

    def step(self, closure=None):
        out = super().step(closure)
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out


def test_non_finite_weights_are_never_written(gpt2_real_dir, hh_small, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("prefopt.trainer.torch.optim.AdamW", PoisoningAdamW)
    out = tmp_path / "run"
    code, stderr = train(capsys, *args(gpt2_real_dir, hh_small, out, "train.max_steps=3", "train.save_every=1",
                                       "train.on_nonfinite=skip"))
    assert code == 3
    checkpoint = out / "checkpoints" / "step-00000001"
    assert last_line(stderr) == (
        "prefopt: error: the weights are non-finite at step 2; checkpoint not written; stopped. The newest checkpoint "
        f"with finite weights and optimizer state is {checkpoint}; resumed as it is, it repeats the same steps exactly "
        f"(and meets the same NaN): start a new run from {checkpoint / 'model'} with a lower train.learning_rate")
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000001"] and not (out / "model").exists()
    assert all(torch.isfinite(t).all() for t in weights(complete_checkpoints(out)[0]).values())


# ----------------------------------------------------------------------------------------------- checkpoints
def truncate_weights(path: Path) -> Path:
    file = path / "model" / "model.safetensors"  # a checkpoint's weights: in its model/
    file.write_bytes(file.read_bytes()[:1000])
    return file


def drop_state_key(path: Path) -> Path:
    file = path / "trainer_state.json"
    state = json.loads(file.read_text())
    del state["batches_consumed"]
    file.write_text(json.dumps(state))
    return file


def remove_optimizer(path: Path) -> Path:
    (path / "optimizer.bin").unlink()
    return path


def truncate_optimizer(path: Path) -> Path:
    file = path / "optimizer.bin"
    file.write_bytes(file.read_bytes()[:100])
    return file


@pytest.mark.parametrize("damage, named", [(truncate_weights, "model.safetensors"),
                                           (drop_state_key, "trainer_state.json: missing batches_consumed"),
                                           (remove_optimizer, "optimizer.bin: missing"),
                                           (truncate_optimizer, "optimizer.bin: 100 bytes, written with")],
                         ids=["truncated-weights", "state-key-missing", "optimizer-missing", "optimizer-truncated"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(damage, named, gpt2_real_dir, hh_small, tmp_path,
                                                            capsys, caplog):
    out = tmp_path / "run"
    run = args(gpt2_real_dir, hh_small, out, "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=3",
               "train.eval_every=0")
    assert train(capsys, *run)[0] == 0
    expected = weights(out / "model")
    newest = complete_checkpoints(out)[-1]
    damage(newest)
    with caplog.at_level("WARNING", logger="prefopt.checkpoint"):
        code, stderr = train(capsys, *run, "train.resume=auto")
    assert code == 0, stderr
    warning = next(r.getMessage() for r in caplog.records if "is unusable" in r.getMessage())
    assert str(newest) in warning and named in warning and "trying the previous one" in warning
    assert (newest.parent / f"{newest.name}.corrupt").is_dir()  # kept for inspection, never resumed again
    got = weights(out / "model")  # resumed at step 2, re-ran step 3: the same weights, bit for bit
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_torn_last_metrics_line_is_dropped_on_resume(gpt2_real_dir, hh_small, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    run = args(gpt2_real_dir, hh_small, out, "train.save_every=1", "train.eval_every=0")
    assert train(capsys, *run)[0] == 0
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "train/lo')  # the process died mid-write
    with caplog.at_level("INFO", logger="prefopt.history"):
        code, stderr = train(capsys, *run, "train.resume=auto", "train.max_steps=3")
    assert code == 0, stderr
    assert f"{out / 'metrics.jsonl'}: dropped 1 row(s) written after the checkpoint (1 torn)" in caplog.text
    assert steps(out) == [1, 2, 2, 3, 3]


def test_resume_with_every_checkpoint_damaged_names_them(gpt2_real_dir, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    run = args(gpt2_real_dir, hh_small, out, "train.max_steps=1", "train.eval_every=0")
    assert train(capsys, *run)[0] == 0
    only = complete_checkpoints(out)[0]
    truncate_weights(only)
    code, stderr = train(capsys, *run, "train.resume=auto")
    assert code == 2
    line = last_line(stderr)
    assert line.startswith(f"prefopt: error: no usable checkpoint in {out / 'checkpoints'} "
                           f"({only / 'model' / 'model.safetensors'}: 1000 bytes, written with ")
    assert line.endswith("this run cannot be continued: set train.overwrite=true to start it over")
    code, stderr = train(capsys, *run, "train.resume=auto")  # it stays refused (once it silently started over)
    assert code == 2
    assert last_line(stderr).startswith(f"prefopt: error: no usable checkpoint in {out / 'checkpoints'} "
                                        f"(set aside earlier: {only.name}.corrupt)")
    assert train(capsys, *run, "train.overwrite=true")[0] == 0
