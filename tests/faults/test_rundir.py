"""The run directory: overwrite never reaches outside the run's own files; a start that fails leaves nothing behind.

``prefopt train`` in-process (``prefopt.cli.main``) on the realistic GPT-2 fixture (dropout 0.1, pad = eos) and 48
HH pairs, 2 steps, from a working directory that holds a user's file:

* ``train.output_dir`` ``.``, ``..``, ``x/..``, the working directory spelled absolutely, ``''`` and ``'  '`` are
  refused (exit 2, one line) before anything is touched, also with ``train.overwrite=true`` and an earlier run there
  (this deleted the working directory once);
* ``overwrite`` removes exactly the entries ``run_files.json`` lists: a user's folder named like the output
  directory, a ``model/`` the earlier run never wrote, notes, stay; a run into a directory holding such a ``model/``
  is refused rather than writing into it; a run without a ledger is never cleared;
* everything checkable without training is checked before the directory is claimed: a missing data file, a
  misspelled loss (before tokenization), a model folder that does not exist; a start that fails after the claim and
  before its first step removes what it wrote: the fixed re-run is never refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runs import one_line, short_dpo, train

pytestmark = pytest.mark.usefixtures("one_thread")


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory with a user's thesis, an earlier (fake, ledger-holding) run in it and one above it."""
    work = tmp_path / "work" / "project"
    work.mkdir(parents=True)
    (work / "thesis.txt").write_text("three years of work")
    for run_dir in (work, work.parent):
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        (run_dir / "run_files.json").write_text(json.dumps({"files": ["metrics.jsonl"]}))
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("output_dir", [".", "..", "sub/..", "ABSOLUTE", "", "  "],
                         ids=["dot", "dotdot", "sub-dotdot", "cwd-absolute", "empty", "blank"])
def test_output_dir_that_is_the_working_directory_or_above_is_refused(output_dir, workdir, gpt2_real_dir,
                                                                        hh_small, capsys):
    output_dir = str(workdir) if output_dir == "ABSOLUTE" else output_dir
    (workdir / "sub").mkdir()
    before = listing(workdir.parent)
    code, stderr = train(capsys, *short_dpo(gpt2_real_dir, hh_small, workdir / "x", f"train.output_dir={output_dir!r}",
                                            "train.overwrite=true"))
    assert code == 2
    line = one_line(stderr)
    assert line.startswith(f"prefopt: error: train.output_dir={output_dir!r}"), line
    assert "the working directory" in line or "above the working directory" in line or "empty" in line
    assert listing(workdir.parent) == before and (workdir / "thesis.txt").read_text() == "three years of work"


def test_overwrite_removes_exactly_the_files_the_run_wrote(gpt2_real_dir, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, *short_dpo(gpt2_real_dir, hh_small, out, "train.save_model=false"))[0] == 0
    wrote = set(json.loads((out / "run_files.json").read_text())["files"])
    assert {"prefopt_config.json", "metrics.jsonl", "checkpoints", "manifest.json"} <= wrote
    (out / "notes.txt").write_text("what I tried")
    (out / out.name).mkdir()  # a folder named like the output directory (where a tracker would log)
    (out / out.name / "mine.txt").write_text("mine")
    (out / "model").mkdir()  # a model the run never wrote (save_model=false)
    (out / "model" / "weights.bin").write_bytes(b"\x00" * 16)
    code, stderr = train(capsys, *short_dpo(gpt2_real_dir, hh_small, out, "train.save_model=false",
                                            "train.overwrite=true"))
    assert code == 0, stderr
    assert (out / "notes.txt").read_text() == "what I tried"
    assert (out / out.name / "mine.txt").read_text() == "mine"
    assert (out / "model" / "weights.bin").read_bytes() == b"\x00" * 16
    # with save_model on, the run would write into that model/: refused, nothing touched
    before = listing(out)
    code, stderr = train(capsys, *short_dpo(gpt2_real_dir, hh_small, out, "train.overwrite=true"))
    assert code == 2
    assert "holds model/, which no prefopt run wrote there" in one_line(stderr)
    assert listing(out) == before


def test_a_run_without_a_ledger_is_never_cleared(gpt2_real_dir, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # not a run this prefopt wrote
    (out / "results.csv").write_text("a,b\n")
    code, stderr = train(capsys, *short_dpo(gpt2_real_dir, hh_small, out, "train.overwrite=true"))
    assert code == 2
    assert "holds metrics.jsonl but no run_files.json" in one_line(stderr)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "results.csv"]


# ----------------------------------------------------------------------------------------------- start checks
def test_start_errors_come_before_the_output_dir_is_claimed(gpt2_real_dir, hh_small, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    grpo = ["algorithm.name=grpo", "algorithm.generation.max_new_tokens=4"]
    cases = [  # (overrides, what the one line says)
        ([f"data.path={tmp_path / 'missing.jsonl'}"], "missing.jsonl' not found"),
        (["algorithm.loss=sigmod"], "algorithm.loss='sigmod': unknown pairwise loss 'sigmod'. Did you mean 'sigmoid'?"),
        ([f"model.name_or_path={tmp_path / 'models' / 'chat-bse'}"],
         f"model.name_or_path '{tmp_path / 'models' / 'chat-bse'}': the folder does not exist; did you mean "
         f"'{tmp_path / 'models' / 'chat-base'}'?"),
        (["model.name_or_path=models/chat-bse"], "model.name_or_path 'models/chat-bse': the folder does not exist; "
                                                 "did you mean 'models/chat-base'?"),
        ([*grpo, "algorithm.rewards=[{name: length_penalty, params: {targt: 3}}]"],
         "reward component 'length_penalty': got an unexpected keyword argument 'targt'"),
        ([*grpo, "algorithm.rewards=[{name: callable, params: {fn: 'no_such_module:score'}}]"],
         "reward function 'no_such_module:score': cannot import module 'no_such_module'"),
    ]
    (tmp_path / "models" / "chat-base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # models/chat-bse is relative: one slash, so a hub id by its looks
    for override, said in cases:
        code, stderr = train(capsys, *short_dpo(gpt2_real_dir, hh_small, out, *override))
        assert code == 2, override
        assert said in one_line(stderr), (override, stderr)
        assert not out.exists() or listing(out) == [], (override, listing(out))
    assert train(capsys, *short_dpo(gpt2_real_dir, hh_small, out))[0] == 0  # the fixed run is not refused


def test_a_start_failing_before_its_first_step_leaves_nothing(gpt2_real_dir, hh_small, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "run"

    def broken_step(self, *args, **kwargs):
        raise RuntimeError("boom before the first update")

    with monkeypatch.context() as patch:
        patch.setattr("prefopt.trainer.Trainer._train_step", broken_step)
        code, stderr = train(capsys, *short_dpo(gpt2_real_dir, hh_small, out))
    assert code == 1 and "boom before the first update" in stderr
    assert listing(out) == []
    assert train(capsys, *short_dpo(gpt2_real_dir, hh_small, out))[0] == 0


HOLDER = """
import sys, time
from prefopt.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("holding", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["train.overwrite=true", "train.resume=auto"])
def test_a_directory_whose_run_is_still_writing_is_refused(how, gpt2_real_dir, hh_small, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, *short_dpo(gpt2_real_dir, hh_small, out))[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        code, stderr = train(capsys, *short_dpo(gpt2_real_dir, hh_small, out, how, "train.max_steps=3"))
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert f"is in use by another run (pid {holder.pid} on " in one_line(stderr)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
