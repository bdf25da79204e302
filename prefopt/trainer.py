"""The one Trainer: every algorithm runs through ``Trainer(config).fit()``.

It never names an algorithm. It asks the registry for the algorithm class, reads the algorithm's declared data
``kind``, loads and splits rows of that kind into typed batches (``prefopt.data.run_loaders``), and drives ``algorithm.step(batch)``: every
yielded loss is one micro-batch under ``accelerator.accumulate`` (accelerate owns devices, mixed precision,
gradient accumulation, distribution and checkpoint state), and ``gradient_accumulation_steps`` micro-batches
make one update. One training step consumes ``gradient_accumulation_steps`` batches of the loader, or one batch
when the algorithm ``accumulates_in_step`` (it splits each of its updates into micro-batches itself; see
``prefopt.algorithm``).

Reliability contract (tests/test_reliability.py, tests/test_distributed.py, tests/faults/):

* exact resume: a checkpoint holds weights, optimizer, scheduler, RNG states and the data position; the batch
  order of epoch ``e`` is a function of ``(train.seed, e)`` only (``prefopt.distributed.seed_epoch``), and neither
  opening a data iterator nor evaluating draws from the training RNG, so a resumed run continues bit for bit on CPU;
* the output directory belongs to one run (``prefopt.rundir``: refused unless resumed or overwritten, a lock, a
  ledger of the files the run wrote); everything checkable without training (preflight, names, the data) is
  checked before it is claimed, and a start that fails before its first step leaves nothing behind;
* a resume knows what it resumes: the checkpoint's identity (algorithm, config, data, models:
  ``prefopt.identity``) and every file's checksum are verified first; resume=auto falls back from a damaged newest
  checkpoint to the previous one, setting the bad one aside; the logs are cut back to the checkpoint, so every
  row appears once (``prefopt.history``);
* SIGTERM / SIGINT: the step in flight finishes, a checkpoint is saved, ``Interrupted`` (exit 128 + signal);
  a second signal stops at once without saving (``prefopt.stopping``);
* a non-finite loss or gradient norm skips the update or stops (``train.on_nonfinite``), naming the step; the
  decision is agreed by all processes, so none waits forever in a collective; ``train.max_skipped_updates``
  skips in a row stop the run; no checkpoint or model with non-finite weights is ever written (exit 3 instead;
  ``prefopt.stopping.NonFiniteGuard``);
* every checkpoint holds ``model/``, loadable with plain ``from_pretrained``; online algorithms' sampled
  completions go to ``samples.jsonl`` at each evaluation (``prefopt.samples``); a console line every log step;
* multi-process: logged train metrics are averaged over all processes' micro-batches, and evaluation counts
  every held-out row exactly once (``prefopt.evaluation``).
"""

from __future__ import annotations

import itertools
import json
import math
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from prefopt import console, history, identity, preflight, rundir
from prefopt.checkpoint import load_resume, save_checkpoint
from prefopt.config import RunConfig
from prefopt.data import run_loaders, run_tokenizer
from prefopt.distributed import (batches_per_process, check_backend, end_training, make_accelerator,
                                 mean_over_processes, seed_epoch, sharded_weights)
from prefopt.errors import PrefoptError
from prefopt.lm_head import chunking
from prefopt.evaluation import evaluate, evaluate_and_sample
from prefopt.export import ExportedWeights, push_to_hub, write_provenance
from prefopt.metrics import MetricAverager, MetricsWriter, peak_memory_mb, tracker_config
from prefopt.optim import make_optimizer
from prefopt.registry import ALGORITHMS
from prefopt.stopping import Interrupted, NonFiniteError, NonFiniteGuard, SignalCatcher, signal_name

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
        self.tokenizer = run_tokenizer(config)
        self.algorithm = algorithm_cls(config.algorithm, config, self.tokenizer)
        self.output_dir = Path(config.train.output_dir)
        self.loaders: dict[str, Any] = {}
        self.data_report: dict[str, Any] = {}
        self.guard = NonFiniteGuard(self.accelerator, config.train, self.output_dir)
        self.data_position = (0, 0)  # (epoch, batches of it taken so far), per process
        self.signals = SignalCatcher()
        self.lock = rundir.RunLock(self.output_dir)
        self.main = self.accelerator.is_main_process
        self.identity: dict[str, Any] = {}
        self.stepped = False  # a training step completed in this process (then a failure keeps the run's files)
        self.fresh = False  # this attempt starts the run (no checkpoint resumed)
        self.latest_metrics: dict[str, float] = {}  # the last logged row (and evaluation), for the model cards

    # ------------------------------------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        """Load, split and tokenize rows of the algorithm's kind (prefopt.data.run_loaders)."""
        self.loaders, self.data_report = run_loaders(self.config, self.algorithm.kind, self.tokenizer,
                                                     self.algorithm.full_batches, self.accelerator.num_processes)

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self) -> dict[str, float]:
        """Train for ``train.max_steps`` steps; returns the final evaluation metrics.

        The data is read before the output directory is claimed (a data error never blocks a fixed re-run); a
        fresh start that fails before its first step removes what it wrote (``rundir.undo_start``).
        """
        check_backend(self.accelerator, self.config.train)
        try:
            if not self.loaders:
                self.prepare_data()
            self._on_main(self._claim_output_dir)
            self.signals.install()
            with chunking(self.config.model.logits):  # the LM head's log-probs, chunk by chunk (prefopt.lm_head)
                return self._fit()
        except BaseException:
            if self.main and self.lock.held and self.fresh and not self.stepped:
                rundir.undo_start(self.output_dir)
            raise
        finally:
            self.signals.restore()
            self.lock.release()

    def _on_main(self, work: Any, *args: Any) -> Any:
        """Run ``work`` on the main process; its result, or the PrefoptError it raised, on every process."""
        box: list[Any] = [None, None]
        if self.main:
            try:
                box = [work(*args), None]
            except PrefoptError as exc:
                box = [None, exc]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(box)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def _claim_output_dir(self) -> None:
        """The output-directory policy under the lock (prefopt.rundir); nothing is written yet."""
        t = self.config.train
        rundir.claim(self.output_dir, self.config.to_dict(), t.resume, t.overwrite, self._writes(), self.lock)

    def _writes(self) -> tuple[str, ...]:
        """The entries of the output directory this run writes (its ledger, prefopt.rundir)."""
        t = self.config.train
        return rundir.run_entries(self.output_dir, save_model=t.save_model, samples=self.algorithm.kind == "prompts",
                                  trackers=bool(t.report_to))

    def _begin(self, state: dict[str, Any] | None) -> None:
        """Main process, once the resume is decided: the run's ledger, config, data manifest and logs (history)."""
        history.begin(self.output_dir, self._writes(), state, self._finished(state), self.config.to_dict(),
                      self.data_report)

    def _finished(self, state: dict[str, Any] | None) -> bool:
        """The checkpoint was written after the final evaluation of a run of this length."""
        return state is not None and "final" in state and state["step"] == self.config.train.max_steps

    def _fit(self) -> dict[str, float]:
        t, acc = self.config.train, self.accelerator
        self.algorithm.build()
        groups = self.algorithm.parameter_groups()
        if not any(group["params"] for group in groups):
            raise PrefoptError(f"algorithm {self.config.algorithm_name!r} has no trainable parameters")
        optimizer = make_optimizer(groups, t)
        batches = batches_per_process(len(self.loaders["train"]), acc.num_processes, self.algorithm.full_batches)
        steps_per_epoch = math.ceil(batches / self.batches_per_step)
        if t.epochs is not None:  # a control key (prefopt.rundir): the run config keeps train.epochs
            t.max_steps = max(math.ceil(t.epochs * steps_per_epoch), 1)
        updates = self.algorithm.updates_per_step  # the schedule advances once per optimizer update
        scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps * updates,
                                  num_training_steps=t.max_steps * updates)
        names = list(self.loaders)
        prepared = acc.prepare(self.algorithm.model, optimizer, scheduler, *self.loaders.values())
        self.algorithm.model, optimizer, scheduler = prepared[:3]
        self.loaders = dict(zip(names, prepared[3:]))
        params = [p for p in self.algorithm.model.parameters() if p.requires_grad]  # FSDP replaces them
        self.algorithm.setup(acc, self.loaders)

        self.identity = self._on_main(identity.run_identity, self.config.algorithm_name, self.config.to_dict(),
                                      self.data_report)
        step, consumed = 0, 0
        state = self._resume()
        self.fresh = state is None
        self._on_main(self._begin, state)
        if t.report_to:
            acc.init_trackers(self.output_dir.name, config=tracker_config(self.config.to_dict()),
                              init_kwargs=history.tracker_kwargs(t.report_to, state["step"] if state else 0))
        writer = MetricsWriter(self.output_dir, acc, enabled=self.main)
        averager = MetricAverager()
        console.say(console.banner(self.config, self.algorithm.model, self.data_report, steps_per_epoch,
                                   acc.num_processes, self.batches_per_step, acc.mixed_precision), self.main)
        if state is not None:
            step, consumed = state["step"], state["batches_consumed"]
            self.data_position = self._restored_position(state)
            self.guard.restore(state)
            averager.restore(state.get("averagers"), acc.process_index, acc.num_processes)
            console.say(f"resuming from step {step} of {t.max_steps} ({state['path']})", self.main)
        if signum := self.signals.agreed(acc):
            raise self._interrupted(signum, step, saved=False)

        batches = self._batches(*self.data_position)
        progress = tqdm(total=t.max_steps, initial=step, disable=not (t.progress and self.main),
                        desc=f"{self.config.algorithm_name}", dynamic_ncols=True)
        train_start, first_step = time.perf_counter(), step
        try:
            while step < t.max_steps:
                step_start = time.perf_counter()
                with self.guard.sampling(step + 1, "training"):
                    tokens = self._train_step(batches, step, params, optimizer, scheduler, averager)
                consumed += self.batches_per_step
                step += 1
                self.stepped = True
                elapsed = time.perf_counter() - step_start
                averager.add({"perf/step_s": elapsed, "perf/tokens_per_s": tokens / max(elapsed, 1e-9),
                              "train/lr": scheduler.get_last_lr()[0]})
                progress.update(1)
                if step % t.log_every == 0 or step == t.max_steps:
                    row = mean_over_processes(acc, averager)
                    row["train/skipped_updates"] = self.guard.skipped_updates
                    row["perf/peak_mem_mb"] = peak_memory_mb(acc.device)
                    writer.log(step, row)
                    self.latest_metrics = row
                    console.say(console.format_line(step, t.max_steps, row, time.perf_counter() - train_start,
                                                    step - first_step), self.main)
                if t.eval_every and step % t.eval_every == 0 and step < t.max_steps and "eval" in self.loaders:
                    evaluated = self._evaluate_and_sample(step)
                    writer.log(step, evaluated)
                    self.latest_metrics = {**self.latest_metrics, **evaluated}
                if signum := self.signals.agreed(acc):
                    self._checkpoint(step, consumed, averager)
                    raise self._interrupted(signum, step, saved=True)
                if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                    self._checkpoint(step, consumed, averager)
        finally:
            progress.close()
            writer.to_csv()
        if self._finished(state):  # resumed from the final checkpoint: the end is logged already
            final = state["final"]
        else:
            final = self._evaluate_and_sample(step) if "eval" in self.loaders else {}
            final["perf/train_s"] = time.perf_counter() - train_start
            final["perf/peak_mem_mb"] = peak_memory_mb(acc.device)
            writer.log(step, final)
            writer.to_csv()
            self._checkpoint(step, consumed, averager, final=final)
        self.latest_metrics = {**self.latest_metrics, **final}
        if t.save_model:
            self.save(self.output_dir / "model", step)
            if t.push_to_hub and self.main:
                url = push_to_hub(self.output_dir / "model", t.push_to_hub, t.hub_private,
                                  f"prefopt {self.config.algorithm_name}: step {step}")
                console.say(f"uploaded {self.output_dir / 'model'} to {url}")
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
        """One step: ``batches_per_step`` batches; each yielded loss is one micro-batch; one lr step per update.

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
                    if spoiled is None and self.guard.loss_spoiled(out.loss, step):
                        spoiled = "loss"
                    if spoiled is None:
                        acc.backward(out.loss)
                    if acc.sync_gradients:
                        if spoiled is None:
                            spoiled = self.guard.clip(params, averager, step)
                        if spoiled is None:
                            optimizer.step()
                            self.guard.updated()
                        else:
                            self.guard.skipped(step, spoiled)
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()  # also after a skipped update: the lr is a function of the update count
                        spoiled = None
                averager.add({"train/loss": float(out.loss.detach()), **out.metrics})
        if micro_batches % t.gradient_accumulation_steps:
            raise PrefoptError(f"{self.config.algorithm_name} yielded {micro_batches} micro-batches in step "
                               f"{step + 1}, not a multiple of train.gradient_accumulation_steps "
                               f"({t.gradient_accumulation_steps})")
        return tokens

    # ------------------------------------------------------------------------------------------------ eval/save
    def evaluate(self) -> dict[str, float]:
        """Average the algorithm's evaluation metrics over the held-out split, each row counted once."""
        loader = self.loaders.get("eval")
        if loader is None:
            return {}
        return evaluate(self.accelerator, self.algorithm, loader, self.config.train.max_eval_batches)

    def _evaluate_and_sample(self, step: int) -> dict[str, float]:
        """``evaluate``, recording the completions online algorithms sample (prefopt.evaluation)."""
        with self.guard.sampling(step, "evaluation"):
            return evaluate_and_sample(self.evaluate, step, self.output_dir, self.main)

    def save(self, out_dir: str | Path, step: int | None = None) -> None:
        self.guard.check_weights(self.algorithm.model, self.config.train.max_steps, f"the model {out_dir}")
        self.accelerator.wait_for_everyone()
        if self.main:
            step = self.config.train.max_steps if step is None else step
            rundir.replace_dir(Path(out_dir), lambda tmp: self._export(tmp, step))  # never a half-written model/
        self.accelerator.wait_for_everyone()

    def _export(self, out_dir: str | Path, step: int) -> None:
        """The model as plain transformers / peft load it, with its card and recipe (prefopt.export)."""
        self.algorithm.save(out_dir)
        write_provenance(out_dir, self.config, step, self.latest_metrics, self.data_report.get("manifests", {}))

    def _weights_once(self) -> ExportedWeights | None:
        """How a checkpoint stores its weights once (in its model/), or None where accelerate must store them: sharded
        or DeepSpeed-held weights."""
        if sharded_weights(self.accelerator) or self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return None
        return ExportedWeights(self.accelerator.unwrap_model(self.algorithm.model), self.algorithm.exported_model)

    def _checkpoint(self, step: int, consumed: int, averager: MetricAverager, final: dict | None = None) -> None:
        t = self.config.train
        self.guard.check_weights(self.algorithm.model, step, "checkpoint")
        ends = {"final": final} if final is not None else {}
        state = {"batches_consumed": consumed, "data_positions": gather_object([list(self.data_position)]),
                 "identity": self.identity, "logs": history.log_sizes(self.output_dir), **ends,
                 **self.guard.state(), "averagers": gather_object([averager.state()]),
                 "seed": t.seed, "batch_size": t.batch_size,
                 "gradient_accumulation_steps": t.gradient_accumulation_steps,
                 "num_processes": self.accelerator.num_processes}
        weights = self._weights_once()
        export = None if sharded_weights(self.accelerator) else lambda out: self._export(out, step)  # from_pretrained
        save_checkpoint(self.accelerator, self.output_dir, step, state, keep=t.keep_checkpoints, export=export,
                        weights=weights)

    def _resume(self) -> dict[str, Any] | None:
        """The trainer state of the checkpoint ``train.resume`` names (None: a fresh start); see load_resume."""
        found = load_resume(self.accelerator, self.output_dir, self.config.train.resume, self._weights_once(),
                            check=lambda path, state: identity.check_resumable(path, state, self.identity,
                                                                               self.config.train))
        if found is None:
            return None
        path, state = found
        self._check_resume_state(state, path)
        return {**state, "path": str(path)}

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

