"""What pins a bench result: the manifest written next to it (versions, commit, host, splits, seeds, draws, the
learning-rate and knob choices, the stages and the time of every phase).

DESIGN.md's invariant: every split, seed and version used by a result is written next to it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "prefopt", "pandas",
            "numpy", "matplotlib")


def manifest(cfg: Any, splits: dict[str, Any], draws: list[dict[str, Any]], selection: dict[str, Any],
             stages: list[dict[str, Any]], times: dict[str, dict[str, float]], skipped: dict[str, str],
             load_at_start: list[float] | None) -> dict[str, Any]:
    """The manifest of a bench run (``cfg``: the BenchConfig; the rest as the runner found them)."""
    import torch

    return {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": sys.argv,
        "versions": {"python": platform.python_version(), **versions()},
        "git": git_info(),
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": cfg.threads,
                 "torch_threads_default": torch.get_num_threads(), "workers": cfg.workers,
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "load_average_start": load_at_start, "load_average_end": load_average()},
        "splits": splits,
        "seeds": {"main": list(cfg.seeds), "train": cfg.train_seeds(), "select": list(cfg.select.seeds)},
        "draws": draws,
        "selection": selection,
        "skipped_labels": skipped,
        "stages": stages,
        "times": times,
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_info() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (timings are noisy on a shared CPU)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
