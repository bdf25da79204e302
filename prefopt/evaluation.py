"""Held-out evaluation during training: the algorithm's metrics averaged over the eval split.

Every held-out row is counted exactly once, also over several processes (``prefopt.distributed.exact_eval_batches``);
the global RNG is forked, so evaluating never changes the training run (exact resume); the completions online
algorithms sample while evaluating are recorded, a few written to ``samples.jsonl`` and the console
(``prefopt.samples``). The algorithm gives metric sums per batch (``Algorithm.evaluate``, with a ``count`` of its
rows) and may finish the averages (``Algorithm.finalize_eval``); nothing here names an algorithm. A metric that is
NaN or infinite is kept as such, with a warning: a diverged model must show in the logs, not vanish from them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from prefopt import console
from prefopt.distributed import exact_eval_batches, sum_over_processes
from prefopt.samples import format_sample, recording, write_samples

log = logging.getLogger("prefopt.evaluation")


@torch.no_grad()
def evaluate(accelerator: Any, algorithm: Any, loader: Any, max_batches: int | None) -> dict[str, float]:
    """``eval/<name>``: the algorithm's metric sums over ``loader``, each row counted once, divided by the rows."""
    model = algorithm.model
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # evaluating must not change the training run
        for batch, real in exact_eval_batches(accelerator, loader, max_batches):
            metrics = algorithm.evaluate(batch)
            if real:
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
    model.train(was_training)
    totals = sum_over_processes(accelerator, totals)
    if not totals:
        return {}
    count = max(totals.pop("count", 1.0), 1.0)
    metrics = algorithm.finalize_eval({f"eval/{key}": value / count for key, value in totals.items()})
    nonfinite = [key for key, value in metrics.items() if not math.isfinite(value)]
    if nonfinite:  # reported as NaN/inf (never dropped): a diverged policy shows in metrics.jsonl and summary.json
        log.warning("evaluation: %s non-finite (NaN/inf in some held-out batch)", ", ".join(nonfinite))
    return metrics


def evaluate_and_sample(run_evaluation: Any, step: int, output_dir: Path, main: bool) -> dict[str, float]:
    """``run_evaluation()``, recording the completions online algorithms sample: on the main process a few go to
    ``output_dir/samples.jsonl`` and the console, with the metrics."""
    with recording() as recorder:
        metrics = run_evaluation()
    rows = recorder.rows()
    if main:
        console.say(console.format_eval(step, metrics))
        if rows:
            write_samples(output_dir / "samples.jsonl", step, rows)
            for row in rows[:2]:
                console.say(format_sample(row))
    return metrics
