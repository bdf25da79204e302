"""The one Trainer: every algorithm runs through ``Trainer(config).fit()``.

It never names an algorithm. It asks the registry for the algorithm class, reads the algorithm's declared data
``kind``, loads and splits rows of that kind, builds typed batches, and drives ``algorithm.step(batch)``: every
yielded loss is one micro-batch under ``accelerator.accumulate`` (accelerate owns devices, mixed precision,
gradient accumulation, distribution and checkpoint state). One training step consumes
``gradient_accumulation_steps`` batches of the loader.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from prefopt.checkpoint import find_resume, load_checkpoint, save_checkpoint
from prefopt.config import RunConfig
from prefopt.data import build_dataloader, load_rows
from prefopt.errors import PrefoptError
from prefopt.metrics import MetricAverager, MetricsWriter, peak_memory_mb
from prefopt.models import load_tokenizer
from prefopt.registry import ALGORITHMS

log = logging.getLogger("prefopt.trainer")


class NonFiniteError(PrefoptError):
    """The loss or gradient was NaN/inf and ``train.on_nonfinite`` is ``stop``."""

    exit_code = 3


class Interrupted(PrefoptError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved."""

    exit_code = 128 + 15  # set to 128 + the signal number when raised


def make_accelerator(config: RunConfig) -> Accelerator:
    t = config.train
    precision = t.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        step_scheduler_with_optimizer=False,
        log_with=t.report_to or None,
        project_dir=t.output_dir,
    )


class Trainer:
    """fit / evaluate / save for any registered algorithm."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.accelerator = make_accelerator(config)
        set_seed(config.train.seed)
        algorithm_cls = ALGORITHMS.get(config.algorithm_name)
        self.tokenizer = load_tokenizer(config.model)
        self.algorithm = algorithm_cls(config.algorithm, config, self.tokenizer)
        self.output_dir = Path(config.train.output_dir)
        self.loaders: dict[str, Any] = {}
        self.data_report: dict[str, Any] = {}
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        """Load, split and tokenize rows of the algorithm's kind; write the split manifest."""
        cfg, kind = self.config, self.algorithm.kind
        loaded = load_rows(cfg.data, kind)
        eval_rows = loaded.eval
        manifests = {"train": loaded.manifest}
        if cfg.eval_data is not None:
            eval_loaded = load_rows(cfg.eval_data, kind)
            eval_rows = eval_loaded.eval or eval_loaded.train
            manifests["eval_data"] = eval_loaded.manifest
        t = cfg.train
        train_loader, train_skipped = build_dataloader(
            loaded.train, kind, self.tokenizer, cfg.data, t.batch_size, shuffle=True, seed=t.seed,
            length_bucketing=cfg.data.length_bucketing)
        self.loaders = {"train": train_loader}
        skipped = {"train": {**loaded.skipped, **train_skipped}}
        if eval_rows:
            eval_loader, eval_skipped = build_dataloader(
                eval_rows, kind, self.tokenizer, cfg.data, t.eval_batch_size, shuffle=False, seed=t.seed)
            self.loaders["eval"] = eval_loader
            skipped["eval"] = eval_skipped
        self.data_report = {"manifests": manifests, "tokenization_skipped": skipped,
                            "rows": {"train": len(loaded.train), "eval": len(eval_rows)}}
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "manifest.json").write_text(json.dumps(self.data_report, indent=2, default=str))
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        log.info("data: %s", loaded.report())

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self) -> dict[str, float]:
        """Train for ``train.max_steps`` steps; returns the final evaluation metrics."""
        t, acc = self.config.train, self.accelerator
        if not self.loaders:
            self.prepare_data()
        self.algorithm.build()
        params = [p for p in self.algorithm.model.parameters() if p.requires_grad]
        if not params:
            raise PrefoptError(f"algorithm {self.config.algorithm_name!r} has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                                  num_training_steps=t.max_steps)
        names = list(self.loaders)
        prepared = acc.prepare(self.algorithm.model, optimizer, scheduler, *self.loaders.values())
        self.algorithm.model, optimizer, scheduler = prepared[:3]
        self.loaders = dict(zip(names, prepared[3:]))
        self.algorithm.setup(acc, self.loaders)
        if t.report_to:
            acc.init_trackers(self.output_dir.name, config=self.config.to_dict())

        writer = MetricsWriter(self.output_dir, acc, enabled=acc.is_main_process)
        step, consumed = 0, 0
        resume_from = find_resume(self.output_dir, t.resume)
        if resume_from is not None:
            state = load_checkpoint(acc, resume_from)
            step, consumed = state["step"], state["batches_consumed"]
            writer.truncate_after(step)
            log.info("resumed from %s at step %d", resume_from, step)

        batches = self._batches(consumed)
        averager = MetricAverager()
        progress = tqdm(total=t.max_steps, initial=step, disable=not (t.progress and acc.is_main_process),
                        desc=f"{self.config.algorithm_name}", dynamic_ncols=True)
        self._install_signal_handlers()
        train_start = time.perf_counter()
        try:
            while step < t.max_steps:
                step_start = time.perf_counter()
                tokens = self._train_step(batches, step, params, optimizer, scheduler, averager)
                consumed += t.gradient_accumulation_steps
                step += 1
                elapsed = time.perf_counter() - step_start
                averager.add({"perf/step_s": elapsed, "perf/tokens_per_s": tokens / max(elapsed, 1e-9),
                              "train/lr": scheduler.get_last_lr()[0]})
                progress.update(1)
                if step % t.log_every == 0 or step == t.max_steps:
                    row = averager.pop()
                    row["perf/peak_mem_mb"] = peak_memory_mb(acc.device)
                    writer.log(step, row)
                    progress.set_postfix(loss=f"{row.get('train/loss', float('nan')):.4f}")
                if t.eval_every and step % t.eval_every == 0 and step < t.max_steps and "eval" in self.loaders:
                    writer.log(step, self.evaluate())
                if self._stop_signal is not None:
                    self._checkpoint(step, consumed)
                    error = Interrupted(f"stopped by signal {self._stop_signal} at step {step}; "
                                        f"checkpoint saved, resume with train.resume=auto")
                    error.exit_code = 128 + self._stop_signal
                    raise error
                if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                    self._checkpoint(step, consumed)
        finally:
            progress.close()
            self._restore_signal_handlers()
            writer.to_csv()
        final = self.evaluate() if "eval" in self.loaders else {}
        final["perf/train_s"] = time.perf_counter() - train_start
        final["perf/peak_mem_mb"] = peak_memory_mb(acc.device)
        writer.log(step, final)
        writer.to_csv()
        self._checkpoint(step, consumed)
        if t.save_model:
            self.save(self.output_dir / "model")
        if acc.is_main_process:
            (self.output_dir / "summary.json").write_text(json.dumps({"step": step, **final}, indent=2))
        acc.end_training()
        return final

    def _batches(self, consumed: int):
        """Endless batches, epoch after epoch, starting ``consumed`` batches in (exact resume)."""
        loader = self.loaders["train"]
        if len(loader) == 0:
            raise PrefoptError("the training data gives no batch (fewer rows than train.batch_size?)")
        epoch, offset = divmod(consumed, len(loader))
        while True:
            loader.set_epoch(epoch)
            source = self.accelerator.skip_first_batches(loader, offset) if offset else loader
            yield from source
            epoch, offset = epoch + 1, 0

    def _train_step(self, batches, step: int, params, optimizer, scheduler, averager: MetricAverager) -> int:
        """One step: ``gradient_accumulation_steps`` batches; each yielded loss is one micro-batch."""
        t, acc, model = self.config.train, self.accelerator, self.algorithm.model
        tokens = 0
        for _ in range(t.gradient_accumulation_steps):
            batch = next(batches)
            for out in self.algorithm.step(batch):
                tokens += out.num_tokens
                with acc.accumulate(model):
                    if not torch.isfinite(out.loss.detach()):
                        self._nonfinite(step, "loss", optimizer)
                        continue
                    acc.backward(out.loss)
                    if acc.sync_gradients:
                        norm = acc.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
                        if not torch.isfinite(norm):
                            self._nonfinite(step, "gradient norm", optimizer)
                            continue
                        averager.add({"train/grad_norm": float(norm)})
                    optimizer.step()
                    if acc.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                averager.add({"train/loss": float(out.loss.detach()), **out.metrics})
        return tokens

    def _nonfinite(self, step: int, what: str, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        message = f"non-finite {what} at step {step + 1}"
        if self.config.train.on_nonfinite == "stop":
            raise NonFiniteError(message + "; stopped (the last checkpoint is intact). "
                                 "Set train.on_nonfinite=skip to skip such updates.")
        log.warning("%s; update skipped", message)

    # ------------------------------------------------------------------------------------------------ eval/save
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Average the algorithm's evaluation metrics over the held-out split (all processes)."""
        loader = self.loaders.get("eval")
        if loader is None:
            return {}
        model = self.algorithm.model
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        for i, batch in enumerate(loader):
            if self.config.train.max_eval_batches is not None and i >= self.config.train.max_eval_batches:
                break
            for key, value in self.algorithm.evaluate(batch).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        model.train(was_training)
        if not totals:
            return {}
        keys = sorted(totals)
        reduced = self.accelerator.reduce(torch.tensor([totals[k] for k in keys], device=self.accelerator.device),
                                          reduction="sum").tolist()
        totals = dict(zip(keys, reduced))
        count = max(totals.pop("count", 1.0), 1.0)
        metrics = {f"eval/{key}": value / count for key, value in totals.items() if math.isfinite(value)}
        return self.algorithm.finalize_eval(metrics)

    def save(self, out_dir: str | Path) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.algorithm.save(out_dir)
        self.accelerator.wait_for_everyone()

    def _checkpoint(self, step: int, consumed: int) -> None:
        save_checkpoint(self.accelerator, self.output_dir, step, {"batches_consumed": consumed},
                        keep=self.config.train.keep_checkpoints)

    # ------------------------------------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        self._previous_handlers = {}

        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, previous in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, previous)
