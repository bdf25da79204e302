"""Train ONE ``prefopt train`` recipe into a directory, in this process, and count what it cost.

The run is ``Trainer(build_run_config(recipe)).fit()`` (the same code as ``prefopt train``; the bench's worker
processes call it, so a run never pays a subprocess's imports) with the algorithm's ``step`` observed through its
public contract (prefopt.algorithm): every yielded loss is one micro-batch (``gradient_accumulation_steps`` of them
one optimizer update), its ``num_tokens`` the tokens it processed; a step takes ``Trainer.batches_per_step`` loader
batches (one for an algorithm that splits its update into micro-batches itself); before the batch that starts step s
(s in ``snapshot_steps``) the policy is written with ``algorithm.save`` to ``snapshots/step-<s>``: the policy after s
steps, which the bench evaluates as a point along training.

Cost: wall time, this process's CPU time (``time.process_time``: user + system of every thread), the process's
peak resident memory so far (a worker's high-water mark), updates, rows, sampled responses and tokens; with
``count_flops`` the whole run is under ``torch.utils.flop_counter.FlopCounterMode`` (matmul / attention FLOPs of
every forward and backward: sampling, reference, reward model, updates), which is slow, so the bench counts one
short probe per algorithm and estimates the others per token.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import yaml


class Observer:
    """Wraps ``algorithm.step``: counts updates, tokens, rows and saves snapshots at step boundaries."""

    def __init__(self, algorithm: Any, accumulation: int, batches_per_step: int, snapshot_steps: list[int],
                 directory: Path):
        self.algorithm = algorithm
        self.accumulation, self.batches_per_step = accumulation, batches_per_step
        self.snapshot_steps = set(snapshot_steps)
        self.directory = directory
        self.batches = self.losses = self.tokens = self.rows = 0
        self.snapshots: dict[int, Path] = {}
        self.samples_per_row = _samples_per_row(algorithm.config) if algorithm.kind == "prompts" else 0
        self._step = algorithm.step
        algorithm.step = self.step

    def step(self, batch: Any):
        if self.batches % self.batches_per_step == 0:
            done = self.batches // self.batches_per_step
            if done in self.snapshot_steps:
                path = self.directory / f"step-{done}"
                self.algorithm.save(path)
                self.snapshots[done] = path
        self.batches += 1
        ids = getattr(batch, "input_ids", None)
        rows = int(ids.shape[0]) if ids is not None else 0
        self.rows += rows // 2 if self.algorithm.kind == "pairs" else rows  # a pair batch stacks chosen, rejected
        for out in self._step(batch):
            self.losses += 1
            self.tokens += int(out.num_tokens)
            yield out

    def counts(self) -> dict[str, float]:
        return {"updates": self.losses // self.accumulation, "tokens": self.tokens, "rows": self.rows,
                "samples": self.rows * self.samples_per_row}


def _samples_per_row(config: Any) -> int:
    """Responses an online algorithm samples per prompt row (a ``num_samples`` / ``num_generations`` field)."""
    for owner in (config, getattr(config, "generation", None)):
        for name in ("num_samples", "num_generations"):
            if owner is not None and isinstance(getattr(owner, name, None), int):
                return int(getattr(owner, name))
    return 1


def train(recipe: dict[str, Any], directory: Path, snapshot_steps: list[int] = (),
          count_flops: bool = False) -> dict[str, Any]:
    """Train ``recipe`` into ``directory`` (its ``train.output_dir``); returns its cost, counters and the paths of
    its snapshots (``snapshots``: step -> directory). Raises PrefoptError when the run fails."""
    from prefopt.config import build_run_config
    from prefopt.trainer import Trainer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    config = build_run_config(recipe)
    handler = logging.FileHandler(directory / "train.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("prefopt")
    root.addHandler(handler)
    wall, cpu = time.perf_counter(), time.process_time()
    try:  # the run's console lines go to its train.log, not between the bench's bars
        stack = contextlib.ExitStack()
        log = stack.enter_context((directory / "train.log").open("a"))
        stack.enter_context(contextlib.redirect_stderr(log))
        stack.enter_context(contextlib.redirect_stdout(log))
        trainer = Trainer(config)
        trainer.prepare_data()
        observer = Observer(trainer.algorithm, config.train.gradient_accumulation_steps, trainer.batches_per_step,
                            list(snapshot_steps), directory / "snapshots")
        counter = _flop_counter() if count_flops else contextlib.nullcontext()
        with counter:
            final = trainer.fit()
    finally:
        stack.close()
        root.removeHandler(handler)
        handler.close()
    out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "peak_rss_mb": peak_rss_mb(),
           **observer.counts(), "train_rows": _train_rows(trainer), "final_step": config.train.max_steps,
           "snapshots": observer.snapshots, "final": final}
    if count_flops:
        out["flops"] = float(counter.get_total_flops())
    return out


def _train_rows(trainer: Any) -> int | None:
    """Rows of the training set after loading (the denominator of epochs over the data)."""
    try:
        return int(trainer.data_report["rows"]["train"])
    except (KeyError, TypeError, ValueError):
        return None


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB; ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)
