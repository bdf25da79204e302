"""What a run prints on the console: a banner at its start (``banner``) and a line every ``train.log_every`` steps,
with or without the progress bar.

``step 20/100 | loss 0.6412 | rewards/accuracy 0.625 | rewards/margin 0.183 | lr 5.00e-05 | 2,310 tok/s |
elapsed 0:00:41 | ETA 0:02:44``: the step, the loss, the algorithm's key metrics (every logged metric whose
name ends in one of ``KEY_METRICS``: reward totals and scores, KL, accuracy, margin), the learning rate,
training tokens/s, the time since this process started training and the time left at the average step time so
far. Only the main process prints (``tqdm.write`` on stderr, so the bar is kept intact and stdout holds only the
final JSON).
"""

from __future__ import annotations

import datetime
import sys
from typing import Any

from tqdm.auto import tqdm

KEY_METRICS = ("reward/total", "reward/score", "rm/score", "kl", "accuracy", "margin")
MAX_KEY_METRICS = 5


def key_metrics(row: dict[str, float]) -> list[str]:
    """The names of ``row`` the console shows after the loss, in ``KEY_METRICS`` order."""
    names = [k for k in row if not k.startswith(("perf/", "train/", "eval/"))]
    chosen: list[str] = []
    for pattern in KEY_METRICS:
        for name in names:
            last = name.split("/")[-1]
            if name not in chosen and (name.endswith(pattern) if "/" in pattern else last == pattern):
                chosen.append(name)
    return chosen[:MAX_KEY_METRICS]


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def format_line(step: int, max_steps: int, row: dict[str, float], elapsed: float, steps_done: int) -> str:
    """One console line from a logged metrics row (``steps_done``: steps run by this process so far)."""
    parts = [f"step {step}/{max_steps}"]
    if "train/loss" in row:
        parts.append(f"loss {row['train/loss']:.4f}")
    parts += [f"{name} {row[name]:.4g}" for name in key_metrics(row)]
    if "train/lr" in row:
        parts.append(f"lr {row['train/lr']:.2e}")
    if "perf/tokens_per_s" in row:
        parts.append(f"{row['perf/tokens_per_s']:,.0f} tok/s")
    parts.append(f"elapsed {_clock(elapsed)}")
    if steps_done > 0:
        parts.append(f"ETA {_clock(elapsed / steps_done * (max_steps - step))}")
    return " | ".join(parts)


def format_eval(step: int, metrics: dict[str, Any]) -> str:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                      if k.startswith("eval/") and isinstance(v, (int, float)))
    return f"eval at step {step}: {shown}"


def say(line: str, enabled: bool = True) -> None:
    """Print ``line`` on stderr without breaking a progress bar (main process only: pass ``enabled``)."""
    if enabled:
        tqdm.write(line, file=sys.stderr)


def _count(n: float) -> str:
    return (f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3
            else f"{n:,}")


def banner(run: Any, model: Any, report: dict[str, Any], steps_per_epoch: int, processes: int, batches_per_step: int,
           mixed_precision: str) -> str:
    """What a run is about to do, printed once at its start: parameters (trainable share), precision, optimizer, rows,
    the global batch, steps per epoch and the steps it will run."""
    from prefopt.models import count_parameters

    t, rows = run.train, report.get("rows", {})  # {} when the caller set the Trainer's loaders itself
    sequences = report.get("sequences", {}).get("train", rows.get("train", 0))
    packed = f" ({sequences:,} packed sequences)" if report.get("packed") else ""
    unit = "packed sequences" if packed else "rows"
    kept = {split: rows.get(split, 0) - sum(report.get("tokenization_skipped", {}).get(split, {}).values())
            for split in ("train", "eval")}
    said = {split: f"{kept[split]:,} {split} rows" + (f" (of {rows[split]:,}: {rows[split] - kept[split]:,} skipped "
                                                      "at tokenization)" if kept[split] != rows.get(split, 0) else "")
            for split in kept}
    trainable, total = count_parameters(model)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    rows_per_step = processes * t.batch_size * batches_per_step
    epochs = t.max_steps / max(steps_per_epoch, 1)
    return (f"{run.algorithm_name}: {_count(total)} parameters, {_count(trainable)} trainable "
            f"({100 * trainable / max(total, 1):.1f}%); weights {'/'.join(dtypes)}, mixed precision {mixed_precision}; "
            f"optimizer {t.optimizer}, lr {t.learning_rate:g} ({t.lr_scheduler})\n"
            f"data: {said['train']}{packed}, {said['eval']}; global batch "
            f"{rows_per_step:,} {unit} ({processes} process{'es' if processes > 1 else ''} x {t.batch_size} {unit} x "
            f"{batches_per_step} batch{'es' if batches_per_step > 1 else ''}); {steps_per_epoch:,} steps per epoch; "
            f"{t.max_steps:,} steps ({epochs:.2f} epochs) -> {t.output_dir}")
