"""Checkpoints, exact resume, signals and non-finite steps, end to end on a nano GPT-2 (CPU, one thread).

* SIGTERM mid-run, then ``train.resume=auto``: the final weights and every logged loss equal those of an
  uninterrupted run bit for bit. The run crosses epoch boundaries with length bucketing on, resumes mid-epoch,
  logs every 4 steps (so the metrics averager's partial sums travel in the checkpoint), uses DPO's precomputed
  reference cache, and has dropout switched on in the policy, so the restored RNG states matter.
* A NaN loss stops the run with exit code 3 and a message naming the step; the last checkpoint is intact and
  resumable. A NaN gradient with ``on_nonfinite=skip`` leaves that step's weights unchanged.
* Checkpoint files load with ``torch.load(weights_only=True)``; interrupted writes are never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.algorithms.losses.sigmoid import sigmoid
from prefopt.checkpoint import SAFE_RNG_GLOBALS, complete_checkpoints, find_resume
from prefopt.cli import main
from prefopt.distributed import BatchStream
from prefopt.registry import LOSSES

MAX_STEPS = 10
PAUSE_AFTER = 6  # the interrupted run is signalled while it sleeps after this step (mid-epoch: 4 batches/epoch)

# Runs ``prefopt train`` with a pause after every step from PAUSE_AFTER on, and says when it got there, so the
# test can send SIGTERM mid-run. Sleeping changes no number.
DRIVER = """
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from prefopt import trainer
from prefopt.cli import main
ready, after = Path(os.environ["READY_FILE"]), int(os.environ["PAUSE_AFTER"])
train_step = trainer.Trainer._train_step
def slow_step(self, batches, step, *args):
    tokens = train_step(self, batches, step, *args)
    if step + 1 >= after:
        ready.touch()
        time.sleep(1.0)
    return tokens
trainer.Trainer._train_step = slow_step
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def dropout_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The nano GPT-2 with dropout 0.1, so that training consumes the torch RNG."""
    out = tmp_path_factory.mktemp("nano-dropout") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    (out / "config.json").write_text(json.dumps(config))
    return out


def overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["algorithm.name=dpo", "algorithm.precompute_reference=true", f"model.name_or_path={model}",
            f"data.path={data}", "data.max_examples=16", "data.eval_fraction=0.25", "data.max_length=128",
            "data.max_prompt_length=64", f"train.output_dir={out}", f"train.max_steps={MAX_STEPS}",
            "train.batch_size=4", "train.eval_batch_size=8", "train.learning_rate=0.002", "train.log_every=4",
            "train.eval_every=4", "train.progress=false", "train.mixed_precision=no", *extra]


def train(args: list[str]) -> int:
    return main(["train", "", *args])


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a model/ folder, or of a checkpoint (its model/ holds them: stored once)."""
    inner = path / "model" / "model.safetensors"
    return load_file(str(inner if inner.is_file() else path / "model.safetensors"))


def logged(out: Path) -> list[dict]:
    """metrics.jsonl rows without the timing and memory readings (which differ from run to run)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


# ----------------------------------------------------------------------------------------------- exact resume
@pytest.mark.slow
def test_sigterm_then_resume_is_bit_exact(dropout_model, hh_small, tmp_path, one_thread):
    reference = tmp_path / "uninterrupted"
    assert train(overrides(dropout_model, hh_small, reference)) == 0

    resumed = tmp_path / "interrupted"
    ready = tmp_path / "ready"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    command = [sys.executable, str(driver), "train", "", *overrides(dropout_model, hh_small, resumed)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=subprocess_env(READY_FILE=str(ready), PAUSE_AFTER=str(PAUSE_AFTER)))
    deadline = time.monotonic() + 300
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the signalled run did not stop: {process.communicate()[1][-3000:]}")
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert f"prefopt: stopped: stopped by SIGTERM at step {PAUSE_AFTER}; checkpoint saved" in stderr
    assert "Traceback" not in stderr
    assert [p.name for p in complete_checkpoints(resumed)][-1] == f"step-{PAUSE_AFTER:08d}"
    assert not (resumed / "model").exists()

    assert train(overrides(dropout_model, hh_small, resumed, "train.resume=auto")) == 0
    expected, got = weights(reference / "model"), weights(resumed / "model")
    assert expected.keys() == got.keys()
    diff = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert all(torch.equal(expected[k], got[k]) for k in expected), f"resumed weights differ by up to {diff:.3g}"
    assert logged(resumed) == logged(reference)  # every logged loss, reward, grad norm and eval metric
    final = logged(reference)[-1]
    assert final["step"] == MAX_STEPS and "eval/loss" in final

    # everything in a checkpoint loads without unpickling code
    checkpoint = complete_checkpoints(resumed)[-1]
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "model" in names and not any(n.startswith(("model.safetensors", "pytorch_model")) for n in names)
    assert (checkpoint / "model" / "model.safetensors").is_file()  # the weights, once: in model/
    for name in names:
        if name.endswith((".bin", ".pkl", ".pt")):
            with torch.serialization.safe_globals(SAFE_RNG_GLOBALS):
                torch.load(checkpoint / name, weights_only=True)


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-00000002").mkdir(parents=True)
    (root / "step-00000002" / "trainer_state.json").write_text('{"step": 2}')
    (root / "step-00000004.tmp").mkdir()  # killed while writing
    (root / "step-00000004.tmp" / "trainer_state.json").write_text('{"step": 4}')
    (root / "step-00000006").mkdir()  # no trainer state: not complete
    assert find_resume(tmp_path, "auto") == root / "step-00000002"
    assert find_resume(tmp_path, "no") is None
    assert find_resume(tmp_path / "empty", "auto") is None


def test_checkpoint_save_load_round_trip(tmp_path):
    """Objects registered for checkpointing are written as weights-only state dicts (accelerate would unpickle
    them with weights_only=False); a same-step re-save never leaves a gap; an unreadable RNG file is an error
    (accelerate would only log it at INFO level and resume inexactly)."""
    from accelerate import Accelerator

    from prefopt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    class Controller:  # like PPO's adaptive KL controller
        value = 0.1

        def state_dict(self):
            return {"value": self.value}

        def load_state_dict(self, state):
            self.value = float(state["value"])

    accelerator = Accelerator(mixed_precision="no")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    controller = Controller()
    accelerator.register_for_checkpointing(controller)
    (tmp_path / "checkpoints" / "step-00000002.tmp").mkdir(parents=True)  # a write killed earlier
    controller.value = 0.7
    path = save_checkpoint(accelerator, tmp_path, 3, {"batches_consumed": 3}, keep=2)
    assert (path / "custom_state_0.pt").is_file() and not list(path.glob("custom_checkpoint_*"))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert save_checkpoint(accelerator, tmp_path, 3, {"batches_consumed": 3}, keep=2) == path  # same step again
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000003"]

    controller.value, expected = 0.0, torch.get_rng_state()
    torch.rand(5)  # move the RNG on
    state = load_checkpoint(accelerator, path)
    assert state == {"step": 3, "batches_consumed": 3} and controller.value == 0.7
    assert torch.equal(torch.get_rng_state(), expected)

    (path / "random_states_0.pkl").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="random_states_0.pkl: cannot restore the RNG states"):
        load_checkpoint(accelerator, path)
    accelerator._custom_objects.clear()


# ----------------------------------------------------------------------------------------------- non-finite
INJECT = {"at_call": 0, "what": "loss", "calls": 0}


@pytest.fixture
def nan_loss():
    """Registers the DPO loss ``test_nan``: sigmoid, but the ``at_call``-th training call is non-finite."""

    def test_nan(logps, beta):
        losses = sigmoid(logps, beta)
        if not torch.is_grad_enabled():  # evaluation
            return losses
        INJECT["calls"] += 1
        if INJECT["calls"] != INJECT["at_call"]:
            return losses
        if INJECT["what"] == "loss":
            return losses * float("nan")
        return losses + torch.sqrt(logps.chosen - logps.chosen.detach())  # value unchanged, gradient NaN

    LOSSES.register("test_nan")(test_nan)
    yield INJECT
    LOSSES.unregister("test_nan")
    INJECT.update(at_call=0, calls=0)


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_checkpoint(tiny_model_dir, hh_small, tmp_path, nan_loss,
                                                                   capsys, one_thread):
    nan_loss.update(at_call=5, what="loss")
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, hh_small, out, "algorithm.loss=test_nan", "train.save_every=2",
                     "train.max_steps=6", "train.eval_every=0", "algorithm.precompute_reference=false")
    assert train(args) == 3
    stderr = capsys.readouterr().err
    checkpoint = out / "checkpoints" / "step-00000004"
    assert stderr.strip().splitlines()[-1] == (
        "prefopt: error: non-finite loss at step 5; stopped. The newest checkpoint with finite weights and optimizer "
        f"state is {checkpoint}; resumed as it is, it repeats the same steps exactly (and meets the same NaN): resume "
        f"with train.resume={checkpoint} train.on_nonfinite=skip to skip such updates, or start a new run from "
        f"{checkpoint / 'model'} with a lower train.learning_rate")
    assert "Traceback" not in stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] and not list((out / "checkpoints").glob("*.tmp"))
    last = complete_checkpoints(out)[-1]
    assert last.name == "step-00000004"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 4
    assert all(torch.isfinite(t).all() for t in weights(last).values())
    assert not (out / "model").exists()

    # the kept checkpoint is a working one: the run resumes from it and finishes
    nan_loss.update(at_call=0)
    assert train([*args, "train.resume=auto"]) == 0
    assert json.loads((out / "summary.json").read_text())["step"] == 6


def test_nan_gradient_with_skip_leaves_the_weights_unchanged(tiny_model_dir, hh_small, tmp_path, nan_loss,
                                                             caplog, one_thread):
    nan_loss.update(at_call=3, what="gradient")
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, hh_small, out, "algorithm.loss=test_nan", "train.on_nonfinite=skip",
                     "train.save_every=1", "train.keep_checkpoints=4", "train.max_steps=4", "train.log_every=1",
                     "train.eval_every=0", "train.save_model=false")
    with caplog.at_level("WARNING", logger="prefopt.trainer"):
        assert train(args) == 0
    assert "non-finite gradient norm at step 3; update skipped" in caplog.text
    rows = [row for row in logged(out) if "train/loss" in row]
    assert [row["train/skipped_updates"] for row in rows] == [0, 0, 1, 1]
    step = {p.name: weights(p) for p in complete_checkpoints(out)}
    before, skipped, after = (step[f"step-0000000{i}"] for i in (2, 3, 4))
    assert all(torch.equal(before[k], skipped[k]) for k in before)
    assert not all(torch.equal(skipped[k], after[k]) for k in skipped)
    assert all(torch.isfinite(t).all() for t in after.values())


def test_batch_stream_resumes_at_every_position():
    """A stream restored from its state after k batches gives the batches an unbroken stream gives after k, at
    epoch boundaries too, and neither draws from the global RNG."""
    loader = torch.utils.data.DataLoader(list(range(5)), batch_size=2,
                                         sampler=torch.utils.data.RandomSampler(range(5),
                                                                                generator=torch.Generator()))
    torch.manual_seed(0)
    untouched = torch.rand(2)
    torch.manual_seed(0)
    stream = BatchStream(loader, seed=3)
    states, batches = [], []
    for _ in range(8):  # 3 batches per epoch: crosses two epoch ends
        states.append(stream.state_dict())
        batches.append(next(stream).tolist())
    assert torch.equal(torch.rand(2), untouched)
    assert batches[:3] != batches[3:6] and sorted(sum(batches[:3], [])) == list(range(5))
    for k, state in enumerate(states):
        resumed = BatchStream(loader, seed=3)
        resumed.load_state_dict(state)
        assert [next(resumed).tolist() for _ in range(8 - k)] == batches[k:], k
