"""Turn-taking for side-by-side speed runs: real training loops in threads, one optimizer step each in turn.

Every contestant is a real training loop in its own thread: ``prefopt.trainer.Trainer.fit`` for ours
(``fit_in_turns``), ``trainer.train()`` for TRL (``train_in_turns``). A baton lets exactly one thread run at a
time, one optimizer step each in turn (``run_in_turns``), so all contestants of a run see the same machine load. A
step is timed from its start to the end of its optimizer update (TRL: ``on_step_begin`` to ``on_step_end``; ours:
``Trainer._train_step``) into ``Contestant.times``, and the CPU seconds the contestant's thread spent in it into
``Contestant.cpu_times`` (``time.thread_time``: one torch thread runs every op in the calling thread, so this is
the step's work, less sensitive than the wall clock to what the machine's other jobs take from it); the benchmark
scripts record losses and tokens themselves.
"""

from __future__ import annotations

import argparse
import threading
import time
import traceback
from typing import Any


class Contestant:
    """One training loop in its own thread; ``begin``/``end`` bracket each step and pass the baton."""

    side = ""

    def __init__(self, name: str, algorithm: str, args: argparse.Namespace, shared: dict[str, Any], **options):
        self.name, self.algorithm, self.args, self.shared, self.options = name, algorithm, args, shared, options
        self.dtype = args.dtype
        self.steps = args.warmup + args.steps
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # CPU seconds of this thread per step
        self.losses: list[float] = []
        self.tokens: list[int] = []  # non-pad tokens of each step's batch
        self.setup_s = 0.0
        self.error: str | None = None
        self.go, self.idle = threading.Event(), threading.Event()
        self._t0 = self._c0 = 0.0
        self._created = time.perf_counter()

    # baton
    def begin(self) -> None:
        if not self.times and not self.setup_s:
            self.setup_s = time.perf_counter() - self._created
        self.idle.set()
        self.go.wait()
        self.go.clear()
        self._t0, self._c0 = time.perf_counter(), time.thread_time()

    def end(self) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.thread_time() - self._c0)

    def thread_main(self) -> None:
        self._created = time.perf_counter()
        try:
            self.train()
        except BaseException:  # noqa: BLE001 - reported by the runner
            self.error = traceback.format_exc()
        finally:
            self.idle.set()

    def train(self) -> None:
        raise NotImplementedError


def fit_in_turns(contestant: Contestant, trainer: Any) -> None:
    """Run a prefopt ``Trainer.fit`` with each optimizer step bracketed by the contestant's baton."""
    import torch

    train_step = trainer._train_step

    def timed_step(*a, **k):
        contestant.begin()
        try:
            return train_step(*a, **k)
        finally:
            contestant.end()

    trainer._train_step = timed_step
    with torch.random.fork_rng(devices=[]):
        trainer.fit()


def train_in_turns(contestant: Contestant, trainer: Any) -> None:
    """Run a TRL ``trainer.train()`` with each optimizer step bracketed by the contestant's baton."""
    import torch
    from transformers import TrainerCallback

    class Baton(TrainerCallback):
        def on_step_begin(self, *a, **k):
            contestant.begin()

        def on_step_end(self, *a, **k):
            contestant.end()

    trainer.add_callback(Baton())
    with torch.random.fork_rng(devices=[]):
        trainer.train()


def run_in_turns(contestants: list[Contestant], check: Any = None) -> None:
    """Start every contestant's thread (set-up one at a time), then give each one step in turn until all are done."""
    for c in contestants:  # set up one at a time (model loading, TRL's dataset passes, reference precompute)
        c.thread = threading.Thread(target=c.thread_main, name=c.name, daemon=True)
        c.thread.start()
        c.idle.wait()
        if c.error:
            raise RuntimeError(f"{c.name} failed to start:\n{c.error}")
    if check is not None:
        check()
    for _ in range(max(c.steps for c in contestants)):
        for c in contestants:  # one step each, in turn
            if c.error or len(c.times) >= c.steps:
                continue
            c.idle.clear()
            c.go.set()
            c.idle.wait()
            if c.error:
                raise RuntimeError(f"{c.name} failed:\n{c.error}")
    for c in contestants:
        c.thread.join(timeout=600)
