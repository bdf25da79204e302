"""The one Trainer: every algorithm runs through ``Trainer(config).fit()``.

It never names an algorithm. It asks the registry for the algorithm class, reads the algorithm's declared data
``kind``, loads and splits rows of that kind, builds typed batches, and drives ``algorithm.step(batch)``: every
yielded loss is one micro-batch under ``accelerator.accumulate`` (accelerate owns devices, mixed precision,
gradient accumulation, distribution and checkpoint state), and ``gradient_accumulation_steps`` micro-batches
make one update. One training step consumes ``gradient_accumulation_steps`` batches of the loader, or one batch
when the algorithm ``accumulates_in_step`` (it splits each of its updates into micro-batches itself; see
``prefopt.algorithm``).

Reliability contract (tests/test_reliability.py, tests/test_distributed.py):

* exact resume: a checkpoint holds weights, optimizer, scheduler, RNG states and the data position; the batch
  order of epoch ``e`` is a function of ``(train.seed, e)`` only (``prefopt.distributed.seed_epoch``), and neither
  opening a data iterator nor evaluating draws from the training RNG, so a resumed run continues bit for bit on CPU;
* the output directory belongs to one run (``prefopt.rundir``: refused unless resumed or overwritten; a lock);
  resume=auto verifies the newest checkpoint and falls back to the previous one, setting the bad one aside;
* SIGTERM / SIGINT: the step in flight finishes, a checkpoint is saved, ``Interrupted`` (exit 128 + signal);
  a second signal stops at once without saving (``prefopt.stopping``);
* a non-finite loss or gradient norm skips the update or stops (``train.on_nonfinite``), naming the step; the
  decision is agreed by all processes, so none waits forever in a collective; ``train.max_skipped_updates``
  skips in a row stop the run; no checkpoint or model with non-finite weights is ever written (exit 3 instead);
* every checkpoint holds ``model/``, loadable with plain ``from_pretrained``; online algorithms' sampled
  completions go to ``samples.jsonl`` at each evaluation (``prefopt.samples``); a console line every log step;
* multi-process: logged train metrics are averaged over all processes' micro-batches, and evaluation counts
  every held-out row exactly once (``prefopt.distributed.exact_eval_batches``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from prefopt import console, preflight, rundir
from prefopt.checkpoint import load_resume, save_checkpoint
from prefopt.config import RunConfig
from prefopt.data import build_dataloader, load_rows
from prefopt.distributed import (any_process, check_backend, end_training, exact_eval_batches, make_accelerator,
                                 mean_over_processes, seed_epoch, sharded_weights, sum_over_processes)
from prefopt.errors import ConfigError, DataError, PrefoptError
from prefopt.metrics import MetricAverager, MetricsWriter, peak_memory_mb, tracker_config
from prefopt.models import load_tokenizer
from prefopt.registry import ALGORITHMS
from prefopt.samples import format_sample, recording, write_samples
from prefopt.stopping import Interrupted, NonFiniteError, SignalCatcher, last_finite_checkpoint, signal_name

log = logging.getLogger("prefopt.trainer")

RESUME_KEYS = ("seed", "batch_size", "gradient_accumulation_steps", "num_processes")
__all__ = ["Trainer", "NonFiniteError", "Interrupted"]


class Trainer:
    """fit / evaluate / save for any registered algorithm."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.accelerator = make_accelerator(config)
        set_seed(config.train.seed)
        algorithm_cls = ALGORITHMS.get(config.algorithm_name)
        preflight.check_run(config, algorithm_cls.kind)
        self.tokenizer = load_tokenizer(config.model)
        self.algorithm = algorithm_cls(config.algorithm, config, self.tokenizer)
        self.output_dir = Path(config.train.output_dir)
        self.loaders: dict[str, Any] = {}
        self.data_report: dict[str, Any] = {}
        self.skipped_updates = 0
        self.skipped_in_a_row = 0
        self.data_position = (0, 0)  # (epoch, batches of it taken so far), per process
        self.signals = SignalCatcher()
        self.lock = rundir.RunLock(self.output_dir)
        self.main = self.accelerator.is_main_process

    # ------------------------------------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        """Load, split and tokenize rows of the algorithm's kind; write the split manifest."""
        cfg, kind = self.config, self.algorithm.kind
        loaded = _read(cfg.data, kind)
        eval_rows = loaded.eval
        manifests = {"train": loaded.manifest}
        if cfg.eval_data is not None:
            eval_loaded = _read(cfg.eval_data, kind)
            eval_rows = eval_loaded.eval or eval_loaded.train
            manifests["eval_data"] = eval_loaded.manifest
        t = cfg.train
        train_loader, train_skipped = self._build_loader(loaded.train, cfg.data.path, "train", t.batch_size,
                                                         shuffle=True, length_bucketing=cfg.data.length_bucketing)
        self.loaders = {"train": train_loader}
        skipped = {"train": {**loaded.skipped, **train_skipped}}
        if eval_rows:
            eval_path = cfg.eval_data.path if cfg.eval_data is not None else cfg.data.path
            eval_loader, eval_skipped = self._build_loader(eval_rows, eval_path, "eval", t.eval_batch_size,
                                                           shuffle=False, length_bucketing=False)
            self.loaders["eval"] = eval_loader
            skipped["eval"] = eval_skipped
        self.data_report = {"manifests": manifests, "tokenization_skipped": skipped,
                            "rows": {"train": len(loaded.train), "eval": len(eval_rows)}}
        log.info("data: %s", loaded.report())

    def _build_loader(self, rows, path: str, split: str, batch_size: int, shuffle: bool, length_bucketing: bool):
        try:
            return build_dataloader(rows, self.algorithm.kind, self.tokenizer, self.config.data, batch_size,
                                    shuffle=shuffle, seed=self.config.train.seed, length_bucketing=length_bucketing)
        except DataError as exc:  # name the file: the loader only sees records
            raise DataError(f"{path} ({split} rows): {exc}") from None

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self) -> dict[str, float]:
        """Train for ``train.max_steps`` steps; returns the final evaluation metrics."""
        check_backend(self.accelerator, self.config.train)
        try:
            self._claim_output_dir()
            self.signals.install()
            return self._fit()
        finally:
            self.signals.restore()
            self.lock.release()

    def _claim_output_dir(self) -> None:
        """The output-directory policy and lock (prefopt.rundir), on the main process; all processes agree."""
        t, error = self.config.train, [None]
        if self.main:
            try:
                rundir.check_writable(self.output_dir)
                self.lock.acquire()
                rundir.claim(self.output_dir, self.config.to_dict(), t.resume, t.overwrite)
            except ConfigError as exc:
                error = [str(exc)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(error)
        if error[0] is not None:
            raise ConfigError(error[0])

    def _fit(self) -> dict[str, float]:
        t, acc = self.config.train, self.accelerator
        if not self.loaders:
            self.prepare_data()
        if self.main:
            (self.output_dir / "manifest.json").write_text(json.dumps(self.data_report, indent=2, default=str))
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
        params = [p for p in self.algorithm.model.parameters() if p.requires_grad]  # FSDP replaces them
        self.algorithm.setup(acc, self.loaders)
        if t.report_to:
            acc.init_trackers(self.output_dir.name, config=tracker_config(self.config.to_dict()))

        writer = MetricsWriter(self.output_dir, acc, enabled=self.main)
        averager = MetricAverager()
        step, consumed = 0, 0
        state = self._resume()
        if state is not None:
            step, consumed = state["step"], state["batches_consumed"]
            self.data_position = self._restored_position(state)
            self.skipped_updates = state.get("skipped_updates", 0)
            self.skipped_in_a_row = state.get("skipped_in_a_row", 0)
            averager.restore(state.get("averagers"), acc.process_index, acc.num_processes)
            writer.truncate_after(step)
        if signum := self.signals.agreed(acc):
            raise self._interrupted(signum, step, saved=False)

        batches = self._batches(*self.data_position)
        progress = tqdm(total=t.max_steps, initial=step, disable=not (t.progress and self.main),
                        desc=f"{self.config.algorithm_name}", dynamic_ncols=True)
        train_start, first_step = time.perf_counter(), step
        try:
            while step < t.max_steps:
                step_start = time.perf_counter()
                tokens = self._train_step(batches, step, params, optimizer, scheduler, averager)
                consumed += self.batches_per_step
                step += 1
                elapsed = time.perf_counter() - step_start
                averager.add({"perf/step_s": elapsed, "perf/tokens_per_s": tokens / max(elapsed, 1e-9),
                              "train/lr": scheduler.get_last_lr()[0]})
                progress.update(1)
                if step % t.log_every == 0 or step == t.max_steps:
                    row = mean_over_processes(acc, averager)
                    row["train/skipped_updates"] = self.skipped_updates
                    row["perf/peak_mem_mb"] = peak_memory_mb(acc.device)
                    writer.log(step, row)
                    console.say(console.format_line(step, t.max_steps, row, time.perf_counter() - train_start,
                                                    step - first_step), self.main)
                if t.eval_every and step % t.eval_every == 0 and step < t.max_steps and "eval" in self.loaders:
                    writer.log(step, self._evaluate_and_sample(step))
                if signum := self.signals.agreed(acc):
                    self._checkpoint(step, consumed, averager)
                    raise self._interrupted(signum, step, saved=True)
                if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                    self._checkpoint(step, consumed, averager)
        finally:
            progress.close()
            writer.to_csv()
        final = self._evaluate_and_sample(step) if "eval" in self.loaders else {}
        final["perf/train_s"] = time.perf_counter() - train_start
        final["perf/peak_mem_mb"] = peak_memory_mb(acc.device)
        writer.log(step, final)
        writer.to_csv()
        self._checkpoint(step, consumed, averager)
        if t.save_model:
            self.save(self.output_dir / "model")
        if self.main:
            (self.output_dir / "summary.json").write_text(json.dumps({"step": step, **final}, indent=2))
        signum = self.signals.agreed(acc)  # before end_training, which destroys the process group
        end_training(acc)
        if signum:  # came during the final evaluation or save: all is saved; still exit non-zero
            raise self._interrupted(signum, step, saved=True)
        return final

    # ------------------------------------------------------------------------------------------------ data order
    def _batches(self, epoch: int, offset: int) -> Iterator[Any]:
        """Endless batches, epoch after epoch, from batch ``offset`` of epoch ``epoch`` on (exact resume).

        ``self.data_position`` is (epoch, batches of it taken) after each batch. It is counted, not derived from
        ``len(loader)``: accelerate's BatchSamplerShard can yield fewer batches than its length says.
        """
        loader = self.loaders["train"]
        while True:
            seed_epoch(loader, epoch, self.config.train.seed)
            source = self.accelerator.skip_first_batches(loader, offset) if offset else loader
            iterator = iter(source)
            with torch.random.fork_rng(devices=[]):  # opening a DataLoader iterator draws from the global RNG
                first = next(iterator, None)
            if first is None and offset == 0:
                raise PrefoptError("the training data gives no batch (fewer rows than train.batch_size?)")
            for batch in itertools.chain([first], iterator) if first is not None else ():
                offset += 1
                self.data_position = (epoch, offset)
                yield batch
            epoch, offset = epoch + 1, 0

    # ------------------------------------------------------------------------------------------------ step
    @property
    def batches_per_step(self) -> int:
        """Batches one training step takes: G, or 1 when the algorithm makes the G micro-batches itself."""
        return 1 if self.algorithm.accumulates_in_step else self.config.train.gradient_accumulation_steps

    def _train_step(self, batches, step: int, params, optimizer, scheduler, averager: MetricAverager) -> int:
        """One step: ``batches_per_step`` batches; each yielded loss is one micro-batch; one lr step.

        A non-finite loss anywhere spoils the update it belongs to: its backward is skipped on every process and,
        at the update, the optimizer does not step (``skip``) or the run stops (``stop``).
        """
        t, acc, model = self.config.train, self.accelerator, self.algorithm.model
        tokens = micro_batches = 0
        spoiled: str | None = None
        for _ in range(self.batches_per_step):
            batch = next(batches)
            for out in self.algorithm.step(batch):
                tokens += out.num_tokens
                micro_batches += 1
                with acc.accumulate(model):
                    finite = bool(torch.isfinite(out.loss.detach()))
                    if spoiled is None and any_process(acc, not finite):
                        spoiled = "loss"
                        self._nonfinite(step, spoiled)
                    if spoiled is None:
                        acc.backward(out.loss)
                    if acc.sync_gradients:
                        if spoiled is None:
                            spoiled = self._clip(params, averager)
                            if spoiled is not None:
                                self._nonfinite(step, spoiled)
                        if spoiled is None:
                            optimizer.step()
                            self.skipped_in_a_row = 0
                        else:
                            self._skipped(step, spoiled)
                        optimizer.zero_grad(set_to_none=True)
                        spoiled = None
                averager.add({"train/loss": float(out.loss.detach()), **out.metrics})
        if micro_batches % t.gradient_accumulation_steps:
            raise PrefoptError(f"{self.config.algorithm_name} yielded {micro_batches} micro-batches in step "
                               f"{step + 1}, not a multiple of train.gradient_accumulation_steps "
                               f"({t.gradient_accumulation_steps})")
        # once per step, also after skipped updates: the lr is a function of the step, whether the algorithm makes
        # one update per step (offline) or several (PPO: epochs x minibatches of one rollout)
        scheduler.step()
        return tokens

    def _clip(self, params, averager: MetricAverager) -> str | None:
        """Clip the gradients (``max_grad_norm`` 0: only measure); "gradient norm" when it is not finite."""
        acc, max_norm = self.accelerator, self.config.train.max_grad_norm
        norm = acc.clip_grad_norm_(params, max_norm or float("inf"))
        if norm is None:  # DeepSpeed clips inside its own step
            return None
        norm = float(norm)
        if acc.scaler is not None:  # fp16: an overflow is the loss scaler's business (it skips the step)
            finite = True
        else:
            finite = not any_process(acc, not math.isfinite(norm))
        if not finite:
            return "gradient norm"
        if math.isfinite(norm):
            averager.add({"train/grad_norm": norm})
        return None

    def _nonfinite(self, step: int, what: str) -> None:
        message = f"non-finite {what} at step {step + 1}"
        if self.config.train.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}; stopped, {last_finite_checkpoint(self.output_dir)}. "
                                 "Set train.on_nonfinite=skip to skip such updates.")
        log.warning("%s; update skipped", message)

    def _skipped(self, step: int, what: str) -> None:
        """Count a skipped update; ``train.max_skipped_updates`` in a row stop the run."""
        self.skipped_updates += 1
        self.skipped_in_a_row += 1
        limit = self.config.train.max_skipped_updates
        if self.skipped_in_a_row >= limit:
            raise NonFiniteError(f"{self.skipped_in_a_row} updates in a row skipped (non-finite {what}, last at step "
                                 f"{step + 1}; train.max_skipped_updates={limit}); stopped, "
                                 f"{last_finite_checkpoint(self.output_dir)}")

    def _check_weights(self, step: int, what: str) -> None:
        """Refuse to write ``what`` from non-finite weights (agreed by all processes): stop with exit code 3."""
        finite = all(bool(torch.isfinite(p).all()) for p in self.algorithm.model.parameters() if p.is_floating_point())
        if any_process(self.accelerator, not finite):
            raise NonFiniteError(f"the weights are non-finite at step {step}; {what} not written; stopped, "
                                 f"{last_finite_checkpoint(self.output_dir)}")

    # ------------------------------------------------------------------------------------------------ eval/save
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Average the algorithm's evaluation metrics over the held-out split, each row counted once."""
        acc = self.accelerator
        loader = self.loaders.get("eval")
        if loader is None:
            return {}
        model = self.algorithm.model
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        devices = [acc.device.index or 0] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # evaluating must not change the training run
            for batch, real in exact_eval_batches(acc, loader, self.config.train.max_eval_batches):
                metrics = self.algorithm.evaluate(batch)
                if real:
                    for key, value in metrics.items():
                        totals[key] = totals.get(key, 0.0) + float(value)
        model.train(was_training)
        totals = sum_over_processes(acc, totals)
        if not totals:
            return {}
        count = max(totals.pop("count", 1.0), 1.0)
        metrics = {f"eval/{key}": value / count for key, value in totals.items() if math.isfinite(value)}
        return self.algorithm.finalize_eval(metrics)

    def _evaluate_and_sample(self, step: int) -> dict[str, float]:
        """``evaluate``, recording the completions online algorithms sample: a few go to samples.jsonl and the
        console (prefopt.samples)."""
        with recording() as recorder:
            metrics = self.evaluate()
        rows = recorder.rows()
        if self.main:
            console.say(console.format_eval(step, metrics))
            if rows:
                write_samples(self.output_dir / "samples.jsonl", step, rows)
                for row in rows[:2]:
                    console.say(format_sample(row))
        return metrics

    def save(self, out_dir: str | Path) -> None:
        self._check_weights(self.config.train.max_steps, f"the model {out_dir}")
        self.accelerator.wait_for_everyone()
        if self.main:
            self.algorithm.save(out_dir)
        self.accelerator.wait_for_everyone()

    def _checkpoint(self, step: int, consumed: int, averager: MetricAverager) -> None:
        t = self.config.train
        self._check_weights(step, "checkpoint")
        state = {"batches_consumed": consumed, "data_positions": gather_object([list(self.data_position)]),
                 "skipped_updates": self.skipped_updates, "skipped_in_a_row": self.skipped_in_a_row,
                 "averagers": gather_object([averager.state()]),
                 "seed": t.seed, "batch_size": t.batch_size,
                 "gradient_accumulation_steps": t.gradient_accumulation_steps,
                 "num_processes": self.accelerator.num_processes}
        export = None if sharded_weights(self.accelerator) else self.algorithm.save  # model/: plain from_pretrained
        save_checkpoint(self.accelerator, self.output_dir, step, state, keep=t.keep_checkpoints, export=export)

    def _resume(self) -> dict[str, Any] | None:
        """The trainer state of the checkpoint ``train.resume`` names (None: a fresh start); see load_resume."""
        found = load_resume(self.accelerator, self.output_dir, self.config.train.resume)
        if found is None:
            return None
        path, state = found
        self._check_resume_state(state, path)
        log.info("resumed from %s at step %d", path, state["step"])
        return state

    def _restored_position(self, state: dict[str, Any]) -> tuple[int, int]:
        """This process's (epoch, batches taken) from the checkpoint; derived from the step with another count."""
        positions, acc = state.get("data_positions"), self.accelerator
        if positions and len(positions) == acc.num_processes:
            return tuple(positions[acc.process_index])
        return divmod(state["batches_consumed"], len(self.loaders["train"]))

    def _check_resume_state(self, state: dict[str, Any], path: Path) -> None:
        current = {"num_processes": self.accelerator.num_processes,
                   **{k: getattr(self.config.train, k) for k in RESUME_KEYS if k != "num_processes"}}
        changed = [f"{k} {state[k]} -> {current[k]}" for k in RESUME_KEYS if k in state and state[k] != current[k]]
        if changed:
            log.warning("resuming from %s with a different %s: the data position is kept in batches, so this is "
                        "not an exact continuation", path, ", ".join(changed))

    # ------------------------------------------------------------------------------------------------ stop
    def _interrupted(self, signum: int, step: int, saved: bool) -> Interrupted:
        where = (f"checkpoint saved in {self.output_dir / 'checkpoints'}; resume with train.resume=auto" if saved
                 else "no step was run, so there is nothing new to save")
        log.warning("%s received: stopping at step %d", signal_name(signum), step)
        error = Interrupted(f"stopped by {signal_name(signum)} at step {step}; {where}")
        error.exit_code = 128 + signum
        return error


def _read(data_config: Any, kind: str) -> Any:
    """``load_rows``; a file the OS will not let us read is a DataError naming it (not an unexpected error)."""
    try:
        return load_rows(data_config, kind)
    except OSError as exc:
        raise DataError(f"{exc.filename or data_config.path}: cannot read it: {exc.strerror or exc}") from None
