"""Metrics: JSONL always (one line per log step), CSV written from it with pandas, plus accelerate trackers.

Also the memory and speed readings every run reports: peak memory (CUDA max allocated on a GPU, peak RSS of the
process on CPU) and tokens/s.
"""

from __future__ import annotations

import io
import json
import logging
import math
import resource
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch

log = logging.getLogger("prefopt.metrics")

def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process so far: CUDA max allocated on a GPU, else peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricAverager:
    """Averages metric dicts between two log steps."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                self.sums[key] += value
                self.counts[key] += 1

    def state(self) -> dict[str, Any]:
        """The partial sums, for a checkpoint."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def restore(self, states: list[dict[str, Any]] | None, process_index: int, num_processes: int) -> None:
        """This process's partial sums from the states of every process (a different process count: all of them
        go to process 0)."""
        if not states:
            return
        if len(states) == num_processes:
            mine = [states[process_index]]
        else:
            mine = states if process_index == 0 else []
        for state in mine:
            for key, value in state["sums"].items():
                self.sums[key] += value
                self.counts[key] += state["counts"][key]

    def pop(self) -> dict[str, float]:
        out = {key: self.sums[key] / self.counts[key] for key in self.sums if self.counts[key]}
        self.sums.clear()
        self.counts.clear()
        return out


class MetricsWriter:
    """Appends ``{"step": n, ...}`` rows to metrics.jsonl; ``to_csv`` rewrites metrics.csv from it."""

    def __init__(self, output_dir: str | Path, accelerator: Any = None, enabled: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(metrics, step=step)
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def to_csv(self) -> Path | None:
        if not (self.enabled and self.path.exists()):
            return None
        frame = read_metrics(self.path)
        out = self.path.with_suffix(".csv")
        frame.to_csv(out, index=False)
        return out


def read_metrics(path: str | Path) -> pd.DataFrame:
    """metrics.jsonl -> DataFrame (one row per logged step). A last line without its newline (the process was killed
    while writing it; a resume cuts it off, ``prefopt.history``) is left out with a warning."""
    text = Path(path).read_text()
    if text and not text.endswith("\n"):
        kept, _, torn = text.rpartition("\n")
        log.warning("%s: left out a torn last line (%r)", path, torn[:60])
        text = kept + "\n" if kept else ""
    if not text.strip():
        return pd.DataFrame()
    return pd.read_json(io.StringIO(text), lines=True)


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config for accelerate's trackers: flat ``section.key`` names and values every tracker takes (numbers,
    bools, strings; lists and None as JSON text) -- tensorboard's hparams refuse nested dicts and lists."""
    from prefopt.rundir import flatten

    return {key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value, default=str)
            for key, value in flatten(config).items()}
