"""Atomic checkpoints: write into ``<name>.tmp``, then rename; only renamed directories count as complete.

A checkpoint holds what ``accelerator.save_state`` writes (model, optimizer, scheduler, RNG states of every
process) plus ``trainer_state.json`` (the step, the data position and the metrics averager's progress).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Save accelerate state + trainer state atomically; prune to the ``keep`` newest complete checkpoints."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed, with a trainer state), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` -> newest complete one (or None), ``no`` -> None, else a path."""
    if resume == "no":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        from prefopt.errors import ConfigError

        raise ConfigError(f"train.resume={resume!r}: not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, Any]:
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
