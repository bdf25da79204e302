"""What pins a bench result: the manifest written next to it (config, splits, seeds, versions, commit, host).

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


def manifest(bench: Any, total_s: float) -> dict[str, Any]:
    """The manifest of a bench run (``bench``: prefopt.bench.plan.Bench)."""
    cfg = bench.cfg
    return {
        "bench": cfg.name,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": sys.argv,
        "config": cfg.to_dict(),
        "splits": bench.data.manifest,
        "eval_set": bench.data.eval_manifest(),
        "seeds": list(cfg.seeds),
        "start": [stage.record() for stage in bench.start.stages],
        "start_policy": str(bench.start.policy),
        "proxy_rm": str(bench.start.proxy_rm) if bench.start.proxy_rm else None,
        "gold_rm": str(bench.start.gold_rm) if bench.start.gold_rm else None,
        "runs": [{"algorithm": r.label, "name": r.name, "phase": r.phase, "knob": r.knob, "value": r.value,
                  "learning_rate": r.learning_rate, "seed": r.seed, "status": r.status, "dir": str(r.directory),
                  "key": r.key, "error": r.error or None} for r in bench.sweep_runs + bench.runs + bench.probes],
        "learning_rates": bench.learning_rates,
        "labels": {"world": {stage.name: stage.record().get("summary") for stage in bench.start.stages
                             if stage.name in ("labels", "proxy_rm")}},
        "skipped_algorithms": bench.skipped,
        "times_s": {**bench.times, "total": {"wall_s": total_s}},
        "versions": versions(),
        "git": git_info(),
        "host": {"python": platform.python_version(), "platform": platform.platform(),
                 "cpu_count": cpu_count(), "torch_threads": torch_threads(), "device": device(),
                 "load_average_at_start": bench.load_at_start, "load_average_at_end": load_average()},
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

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "root": str(root)}


def cpu_count() -> int | None:
    return os.cpu_count()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages when the report is written (timings are noisy on a shared CPU)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
