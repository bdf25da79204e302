"""A run's logs stay exact through any interruption: every row appears once, and only rows of the run's history.

``metrics.jsonl`` and ``samples.jsonl`` are only ever appended to. A checkpoint records their sizes in bytes
(``log_sizes``); a resume cuts each back to that size (``rewind``) before anything reads them, so the rows written
after the checkpoint (they will be written again), a torn last line of a killed write included, are gone, and the
rows before it are kept byte for byte. A resume that finds no checkpoint ever written starts the run over:
everything the run wrote except its config and ledger is removed (``start_over``), so nothing is appended to the
logs of an attempt that left no checkpoint. TensorBoard's event files are rewound the way TensorBoard does it
itself: the resumed writer opens with ``purge_step`` (events from that step on are dropped by every reader).
Other trackers (wandb, mlflow) keep their own history: a resumed run logs its steps after the checkpoint again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from prefopt.errors import CheckpointError
from prefopt.rundir import CONFIG_FILE, LEDGER_FILE, RunFiles, read_ledger, remove_entry, write_config

LOGS = ("metrics.jsonl", "samples.jsonl")
ENDS = ("metrics.csv", "summary.json", "model")  # written from the logs, or at the end of the run
log = logging.getLogger("prefopt.history")


def log_sizes(output_dir: Path) -> dict[str, int]:
    """The size in bytes of each log now (a log not written yet: 0)."""
    return {name: (output_dir / name).stat().st_size if (output_dir / name).exists() else 0 for name in LOGS}


def rewind(output_dir: Path, sizes: dict[str, int], finished: bool) -> None:
    """Cut every log back to its size at the checkpoint; remove what the end of the run writes unless the
    checkpoint is the final one (``finished``). CheckpointError when a log is shorter than it was then."""
    for name in LOGS:
        path, size = output_dir / name, int(sizes.get(name, 0))
        have = path.stat().st_size if path.exists() else 0
        if have < size:
            raise CheckpointError(f"{path}: {have} bytes, {size} when the checkpoint was written: rows logged "
                                  "before it are lost, so the resumed history would not be exact; restore the file, "
                                  "or set train.overwrite=true to start the run over")
        if have > size:
            with path.open("r+b") as handle:
                handle.seek(size)
                tail = handle.read()
                handle.truncate(size)
                handle.flush()
                os.fsync(handle.fileno())
            torn = not tail.endswith(b"\n")
            log.info("%s: dropped %d row(s) written after the checkpoint%s", path, tail.count(b"\n") + torn,
                     " (1 torn)" if torn else "")
        if size and not _ends_with_newline(path):
            raise CheckpointError(f"{path}: the row before byte {size} is not complete; restore the file, or set "
                                  "train.overwrite=true to start the run over")
    if not finished:
        for name in ENDS:
            remove_entry(output_dir / name)


def start_over(output_dir: Path) -> list[str]:
    """Remove what an earlier attempt wrote (the ledger's entries but the config and the ledger itself)."""
    removed = sorted((read_ledger(output_dir) or set()) - {CONFIG_FILE, LEDGER_FILE})
    present = [name for name in removed if (output_dir / name).exists() or (output_dir / name).is_symlink()]
    if present:
        log.warning("no checkpoint was written before the run stopped: starting it over (removed %s)",
                    ", ".join(present))
    for name in present:
        remove_entry(output_dir / name)
    return present


def begin(output_dir: Path, writes: tuple[str, ...], state: dict[str, Any] | None, finished: bool,
          config: dict[str, Any], data_report: dict[str, Any]) -> None:
    """Once a run's resume is decided: record what it writes in its ledger, cut its logs back to the checkpoint
    ``state`` (or start them over without one), then write its config and data manifest."""
    RunFiles(output_dir).add(*writes)
    if state is None:
        start_over(output_dir)
    else:
        rewind(output_dir, state.get("logs") or {}, finished=finished)
    write_config(output_dir, config)
    (output_dir / "manifest.json").write_text(json.dumps(data_report, indent=2, default=str))


def tracker_kwargs(report_to: list[str], step: int) -> dict[str, Any]:
    """``init_kwargs`` for ``accelerator.init_trackers`` at a resume from ``step``."""
    if step and "tensorboard" in report_to:
        return {"tensorboard": {"purge_step": step + 1}}
    return {}


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
