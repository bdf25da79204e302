"""A short DPO run's ``prefopt train`` overrides, shared by the CLI-level run tests (test_run_policy, test_run_watch,
tests/faults), and ``train`` / ``one_line``: a run through ``prefopt.cli.main`` and the one ``prefopt:`` line it printed.

16 training pairs of ``hh_small`` (about 12 held out), 128 tokens, batches of 4, 2 steps, a metrics row every step,
no progress bar; ``extra`` overrides come last and win.
"""

from __future__ import annotations

from pathlib import Path

from prefopt.cli import main


def train(capsys, *argv: str) -> tuple[int, str]:
    """``prefopt train`` with overrides ``argv``, in-process: (exit code, stderr)."""
    code = main(["train", "", *argv])
    return code, capsys.readouterr().err


def one_line(stderr: str) -> str:
    """The one ``prefopt:`` line of ``stderr`` (asserting there is one, and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("prefopt:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def short_dpo(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["algorithm.name=dpo", f"model.name_or_path={model}", f"data.path={data}", "data.max_examples=16",
            "data.eval_fraction=0.25", "data.max_length=128", "data.max_prompt_length=64", f"train.output_dir={out}",
            "train.max_steps=2", "train.batch_size=4", "train.eval_batch_size=8", "train.learning_rate=0.002",
            "train.log_every=1", "train.progress=false", "train.mixed_precision=no", *extra]
