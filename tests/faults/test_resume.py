"""A resume that knows what it resumes, and logs in which every row appears once.

``prefopt train`` in-process on the realistic GPT-2 fixture (dropout 0.1, pad = eos), 48 HH pairs, DPO, 2-4 steps:

* the checkpoint records the run's identity (``prefopt.identity``); a resume refuses, in one line naming the
  difference, a changed data file (unless ``train.accept_changed_data=true``), a changed start model, a checkpoint
  of another algorithm given by path, and ``max_steps`` below the checkpoint's step;
* a flipped byte in the optimizer state or a hand-edited step counter is found before anything is loaded;
* a run that stopped before its first checkpoint is started over by ``resume=auto`` (its logs too, a torn line
  included), a finished run resumed appends nothing, and TensorBoard shows each step once after a resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_runs import one_line, short_dpo, train
from prefopt.checkpoint import complete_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The logged rows without the timings and memory readings (which differ from run to run)."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
            for line in (out / name).read_text().splitlines()]


def stop_at(stop: int):
    """A ``Trainer._train_step`` that dies (KeyboardInterrupt: no checkpoint is saved) when it reaches step ``stop``."""
    from prefopt.trainer import Trainer

    original = Trainer._train_step

    def train_step(trainer, batches, step, *args):
        if step + 1 == stop:
            raise KeyboardInterrupt
        return original(trainer, batches, step, *args)

    return train_step


@pytest.fixture
def inputs(gpt2_real_dir, hh_small, tmp_path) -> tuple[Path, Path]:
    """Copies of the model and the data that a test may change."""
    model, data = tmp_path / "model", tmp_path / "data.jsonl"
    shutil.copytree(gpt2_real_dir, model)
    shutil.copy(hh_small, data)
    return model, data


def test_resume_refuses_a_checkpoint_that_is_not_this_runs(inputs, tmp_path, capsys):
    model, data = inputs
    out = tmp_path / "run"
    run = short_dpo(model, data, out, "train.save_every=1", "train.keep_checkpoints=3")
    assert train(capsys, *run)[0] == 0

    # max_steps below the checkpoint's step (it once trained past it: "step 8 of 4")
    code, stderr = train(capsys, *run, "train.resume=auto", "train.max_steps=1")
    assert code == 2
    assert one_line(stderr) == (f"prefopt: error: train.max_steps=1: below the step of checkpoint "
                                f"{out / 'checkpoints' / 'step-00000002'} (2); set train.max_steps >= 2 to resume it")

    # another algorithm's checkpoint given by path
    dpo_checkpoint = complete_checkpoints(out)[-1]
    code, stderr = train(capsys, *run, "algorithm.name=orpo", f"train.output_dir={tmp_path / 'orpo'}",
                         f"train.resume={dpo_checkpoint}")
    assert code == 2
    assert one_line(stderr).startswith(f"prefopt: error: train.resume: checkpoint {dpo_checkpoint} is not this "
                                       "run's: it is a checkpoint of algorithm 'dpo', this run is 'orpo'")

    # the start model changed (DPO's reference is read from it again)
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + bytes(8))
    code, stderr = train(capsys, *run, "train.resume=auto", "train.max_steps=3")
    assert code == 2
    assert one_line(stderr).startswith(f"prefopt: error: train.resume: checkpoint {dpo_checkpoint} is not this "
                                       f"run's: model.name_or_path={str(model)!r} changed since the checkpoint "
                                       "(model.safetensors differs)")
    weights.write_bytes(original)

    # the data changed: refused (the saved position would point into other rows), unless accepted knowingly
    data.write_text(data.read_text().replace("Human:", "Human: ", 1))  # one row edited
    code, stderr = train(capsys, *run, "train.resume=auto", "train.max_steps=3")
    assert code == 2
    line = one_line(stderr)
    assert line.startswith(f"prefopt: error: train.resume: data.path file {data} changed since the checkpoint (")
    assert line.endswith("set train.accept_changed_data=true to continue on the changed data knowingly")
    assert json.loads((out / "prefopt_config.json").read_text())["train"]["max_steps"] == 2  # nothing rewritten
    code, stderr = train(capsys, *run, "train.resume=auto", "train.max_steps=3", "train.accept_changed_data=true")
    assert code == 0, stderr
    assert [row["step"] for row in rows(out)] == [1, 2, 2, 3, 3]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_step(path: Path) -> None:
    state = json.loads(path.read_text())
    state["step"] = 1
    path.write_text(json.dumps(state))


def test_altered_checkpoint_files_are_found_before_loading(gpt2_real_dir, hh_small, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    run = short_dpo(gpt2_real_dir, hh_small, out, "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=3",
                    "train.eval_every=0")
    assert train(capsys, *run)[0] == 0
    expected = load_file(str(out / "model" / "model.safetensors"))
    first, second, third = complete_checkpoints(out)
    flip_a_byte(third / "optimizer.bin")  # was resumed from, silently
    edit_step(second / "trainer_state.json")  # a tampered step counter: was resumed from, at the wrong step
    with caplog.at_level("WARNING", logger="prefopt.checkpoint"):
        assert train(capsys, *run, "train.resume=auto")[0] == 0
    assert (f"{third / 'optimizer.bin'}: its content differs from what was written (sha256 mismatch: damaged or "
            "altered)") in caplog.text
    assert f"{second / 'trainer_state.json'}: its content does not match its checksum (edited or damaged)" in caplog.text
    assert caplog.text.count("trying the previous one") == 2
    got = load_file(str(out / "model" / "model.safetensors"))  # steps 2 and 3 trained again from step 1: the same
    assert all((expected[k] == got[k]).all() for k in expected)


def test_a_run_stopped_before_its_first_checkpoint_starts_over(gpt2_real_dir, hh_small, tmp_path, capsys,
                                                                monkeypatch):
    reference, out = tmp_path / "reference", tmp_path / "run"
    run = ("train.max_steps=3", "train.eval_every=1")
    assert train(capsys, *short_dpo(gpt2_real_dir, hh_small, reference, *run))[0] == 0
    with monkeypatch.context() as patch:
        patch.setattr("prefopt.trainer.Trainer._train_step", stop_at(3))
        assert train(capsys, *short_dpo(gpt2_real_dir, hh_small, out, *run))[0] == 130
    assert [row["step"] for row in rows(out)] == [1, 1, 2, 2] and not (out / "checkpoints").exists()
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "train/lo')  # torn by the kill
    code, stderr = train(capsys, *short_dpo(gpt2_real_dir, hh_small, out, *run, "train.resume=auto"))
    assert code == 0, stderr
    assert rows(out) == rows(reference)  # every row once (it once appended: 1, 1, 2, 2, 1, 1, ...)
    finished = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}
    # a finished run resumed appends nothing (it once logged its final evaluation again)
    assert train(capsys, *short_dpo(gpt2_real_dir, hh_small, out, *run, "train.resume=auto"))[0] == 0
    assert (out / "metrics.jsonl").read_bytes() == finished["metrics.jsonl"]
    assert (out / "summary.json").read_bytes() == finished["summary.json"]


def test_tensorboard_shows_each_step_once_after_a_resume(gpt2_real_dir, hh_small, tmp_path, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run = short_dpo(gpt2_real_dir, hh_small, out, "train.report_to=[tensorboard]", "train.max_steps=4",
                    "train.save_every=2", "train.eval_every=0")
    with monkeypatch.context() as patch:
        patch.setattr("prefopt.trainer.Trainer._train_step", stop_at(4))  # steps 3 logged after the checkpoint
        assert train(capsys, *run)[0] == 130
    assert train(capsys, *run, "train.resume=auto")[0] == 0
    steps = []
    for folder in {event.parent for event in out.rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            steps += [event.step for event in accumulator.Scalars("train/loss")]
    assert sorted(steps) == [1, 2, 3, 4]
