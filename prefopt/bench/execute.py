"""One training run of the bench, in this process (``isolation: inprocess``) or in a ``prefopt train`` subprocess.

In-process, the run is ``Trainer(build_run_config(recipe)).fit()`` with the algorithm's ``step`` observed
through its public contract (prefopt.algorithms.base): every yielded loss is one optimizer update (divided by
gradient_accumulation_steps), its ``num_tokens`` the tokens it processed; before the batch that starts step s
(s in ``snapshot_steps``) the policy is written with ``algorithm.save`` to ``snapshots/step-<s>``, the policy
after s steps, which the bench evaluates as a point along training. Its cost is the run's wall time and this
process's CPU time (``time.process_time``: user + system of every thread). With ``count_flops`` the whole run
is under ``torch.utils.flop_counter.FlopCounterMode`` (matmul / attention FLOPs of every forward and backward:
sampling, reference, reward model, updates), which is slow, so the bench counts one run per algorithm and
estimates the others per token.

A subprocess run gives the same files except the snapshots and counters (isolation costs the imports, seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from prefopt.bench.start import run_prefopt, write_recipe


class Observer:
    """Wraps ``algorithm.step``: counts updates, tokens, rows and saves snapshots at step boundaries."""

    def __init__(self, algorithm: Any, accumulation: int, snapshot_steps: list[int], directory: Path):
        self.algorithm = algorithm
        self.accumulation = accumulation
        self.snapshot_steps = set(snapshot_steps)
        self.directory = directory
        self.batches = self.losses = self.tokens = self.rows = 0
        self.snapshots: dict[int, str] = {}
        self.samples_per_row = _samples_per_row(algorithm.config) if algorithm.kind == "prompts" else 0
        self._step = algorithm.step
        algorithm.step = self.step

    def step(self, batch: Any):
        if self.batches % self.accumulation == 0:
            done = self.batches // self.accumulation
            if done in self.snapshot_steps:
                path = self.directory / f"step-{done}"
                self.algorithm.save(path)
                self.snapshots[done] = str(path)
        self.batches += 1
        ids = getattr(batch, "input_ids", None)
        self.rows += int(ids.shape[0]) if ids is not None else 0
        for out in self._step(batch):
            self.losses += 1
            self.tokens += int(out.num_tokens)
            yield out

    def counts(self) -> dict[str, float]:
        return {"updates": self.losses / self.accumulation, "tokens": self.tokens, "rows": self.rows,
                "samples_generated": self.rows * self.samples_per_row}


def _samples_per_row(config: Any) -> int:
    """Responses an online algorithm samples per prompt row (a ``num_samples`` / ``num_generations`` field)."""
    for owner in (config, getattr(config, "generation", None)):
        for name in ("num_samples", "num_generations"):
            if owner is not None and isinstance(getattr(owner, name, None), int):
                return int(getattr(owner, name))
    return 1


def train_run(recipe: dict[str, Any], directory: Path, snapshot_steps: list[int], inprocess: bool,
              count_flops: bool = False) -> dict[str, Any]:
    """Train one run; returns its cost and counters (``run.json``). Raises PrefoptError when it fails."""
    path = write_recipe(directory / "recipe.yaml", recipe)
    if not inprocess:
        cost = run_prefopt(["train", str(path)], directory / "train.log")
        return {**cost, "snapshots": {}}
    from prefopt.config import build_run_config
    from prefopt.trainer import Trainer

    config = build_run_config(recipe)
    handler = logging.FileHandler(directory / "train.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("prefopt")
    root.addHandler(handler)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        trainer = Trainer(config)
        observer = Observer(trainer.algorithm, config.train.gradient_accumulation_steps, snapshot_steps,
                            directory / "snapshots")
        counter = _flop_counter() if count_flops else contextlib.nullcontext()
        with counter:
            trainer.fit()
    finally:
        root.removeHandler(handler)
        handler.close()
    out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, **observer.counts(),
           "snapshots": observer.snapshots, "trainable_params": _trainable(trainer.algorithm.model)}
    if count_flops:
        out["flops_counted"] = float(counter.get_total_flops())
    return out


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


def _trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def knob_field(algorithm_cls: Any) -> str | None:
    """The Config field that is an algorithm's KL knob: its declared ``kl_knob``, else ``beta`` or ``kl_coef``
    when its Config has exactly one of them (None: no knob, the algorithm runs at one setting)."""
    declared = getattr(algorithm_cls, "kl_knob", None)
    fields = {f.name for f in dataclasses.fields(algorithm_cls.Config)}
    if declared:
        return declared if declared in fields else None
    found = [name for name in ("beta", "kl_coef") if name in fields]
    return found[0] if len(found) == 1 else None
