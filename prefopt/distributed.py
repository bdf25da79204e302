"""What the Trainer must agree on across processes, and how it reads data exactly once under accelerate.

Every function here is collective when the run has several processes: all processes call it at the same point,
or the run hangs. With one process they cost nothing.

* ``any_process`` / ``max_over_processes``: one decision for all (a NaN on one process, a signal to one process);
* ``mean_over_processes`` / ``sum_over_processes``: logged averages over every process's micro-batches, and exact
  evaluation totals (float64);
* ``total_over_processes`` / ``gather_over_processes``: a tensor summed over every process, or the values of every
  process in one tensor (the online algorithms' batch statistics: whitening, token counts, entropy quantiles);
* ``batches_per_process``: an epoch's batches on each process, as accelerate shards them;
* ``exact_eval_batches``: each held-out batch once, although accelerate's ``even_batches`` pads the last round
  of batches with rows from the start;
* ``seed_epoch``: the batch order of an epoch as a function of (seed, epoch) only, reaching through the batch
  samplers accelerate wraps around ours;
* ``end_training``: accelerate's, once gloo has let go of the last collective (see its docstring);
* ``BatchStream``: endless batches of a loader the Trainer does not drive (PPO-ptx's text), whose position is
  checkpoint state, so a resumed run continues the stream where it stopped.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin, gather_object

from prefopt.errors import ConfigError
from prefopt.metrics import MetricAverager


def any_process(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` is True on any process."""
    return max_over_processes(accelerator, int(bool(flag))) > 0


def end_training(accelerator: Any) -> None:
    """``accelerator.end_training()``, after every gloo worker has let go of the last collective's tensors.

    A gloo worker drops its reference to a finished collective under the process group's lock, and dropping a
    tensor that Python created needs the GIL. If the main thread, holding the GIL, frees the process group in that
    moment (DDP's reducer holds the last reference and lets go when the model is freed), both wait for ever: seen in
    ``tests/test_distributed.py`` under load, rank 0 stuck in ``~ProcessGroupGloo`` from ``~Reducer``. A barrier,
    then a short sleep (which releases the GIL), lets the workers finish first.
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)
    accelerator.end_training()


def max_over_processes(accelerator: Any, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([float(value)], device=accelerator.device)
    return int(accelerator.reduce(tensor, "max").item())


def _all_keys(accelerator: Any, keys: list[str]) -> list[str]:
    if accelerator.num_processes == 1:
        return sorted(keys)
    return sorted(set(gather_object(sorted(keys))))


def sum_over_processes(accelerator: Any, totals: dict[str, float]) -> dict[str, float]:
    """Per-key sums over all processes (a key missing on a process counts 0), in float64."""
    keys = _all_keys(accelerator, list(totals))
    if accelerator.num_processes == 1 or not keys:
        return {k: totals[k] for k in keys}
    values = torch.tensor([totals.get(k, 0.0) for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(values, "sum").tolist()))


def total_over_processes(accelerator: Any, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed elementwise over every process (a new tensor); ``tensor`` itself with one process or no
    accelerator."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.clone(), "sum")


def gather_over_processes(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    """The 1-d ``values`` of every process concatenated (processes may hold different counts); ``values`` itself with
    one process or no accelerator."""
    if accelerator is None or accelerator.num_processes == 1:
        return values
    count = torch.tensor([values.numel()], device=values.device)
    counts = accelerator.gather(count)
    padded = accelerator.pad_across_processes(values, dim=0)
    gathered = accelerator.gather(padded).view(accelerator.num_processes, -1)
    return torch.cat([row[:n] for row, n in zip(gathered, counts.tolist())])


def batches_per_process(batches: int, processes: int, drop_last: bool) -> int:
    """The batches each process takes in an epoch of a loader of ``batches`` batches that accelerate shards in rounds
    of one batch per process: a last round short of ``processes`` batches is left out with ``drop_last``, else
    filled with batches from the start (``even_batches``)."""
    return batches // processes if drop_last else math.ceil(batches / processes)


def mean_over_processes(accelerator: Any, averager: MetricAverager) -> dict[str, float]:
    """Pop ``averager``: each metric's mean over the values added on ALL processes since the last pop."""
    if accelerator.num_processes == 1:
        return averager.pop()
    sums = sum_over_processes(accelerator, dict(averager.sums))
    counts = sum_over_processes(accelerator, {k: float(v) for k, v in averager.counts.items()})
    averager.pop()
    return {k: sums[k] / counts[k] for k in sums if counts.get(k, 0) > 0}


def exact_eval_batches(accelerator: Any, loader: Any, max_batches: int | None = None) -> Iterator[tuple[Any, bool]]:
    """``(batch, real)``: every batch of a prepared map-style loader once over all processes.

    accelerate's ``even_batches`` fills the last round of batches with rows from the start, which an average would
    count twice; it is off while we iterate. A process with no batch in the last round then runs a stand-in
    (``real`` False: drop its result), so every process runs the same number of forwards (FSDP and ZeRO-3 gather
    weights inside each one). ``max_batches`` caps the batches of all processes together; batch i of process r
    is batch ``i * num_processes + r`` of the loader's order, as without the cap.
    """
    shard = loader.batch_sampler if isinstance(loader.batch_sampler, BatchSamplerShard) else None
    processes, rank = (accelerator.num_processes, accelerator.process_index) if shard is not None else (1, 0)
    total = len(shard.batch_sampler) if shard is not None else len(loader)
    if max_batches is not None:
        total = min(total, max_batches)
    mine, rounds = len(range(rank, total, processes)), math.ceil(total / processes)
    stand_in = None
    even = shard.even_batches if shard is not None else None
    if shard is not None:
        shard.even_batches = False
    try:
        if mine:
            capped = mine < len(loader)  # else let the loader finish: accelerate unregisters it at its end
            for i, batch in enumerate(loader):
                stand_in = batch if stand_in is None else stand_in
                yield batch, True
                if capped and i + 1 >= mine:
                    break
    finally:
        if shard is not None:
            shard.even_batches = even
    for _ in range(rounds - mine):
        if stand_in is None:  # this process has no batch at all: borrow its even_batches one
            stand_in = next(iter(loader))
        yield stand_in, False


def seed_epoch(loader: Any, epoch: int, seed: int) -> None:
    """Make epoch ``epoch``'s batch order a function of ``(seed, epoch)`` only.

    ``loader.set_epoch`` reseeds accelerate's seedable random sampler (seed + epoch). A batch sampler with its own
    generator (prefopt's LengthBucketSampler) is not reached by it once accelerate wraps it in a BatchSamplerShard
    (several processes), and without a ``set_epoch`` of its own its generator just runs on, so the order of epoch e
    would depend on how often it was iterated before -- not the same after a resume. We reseed it with
    ``seed + epoch``, as accelerate does its sampler.
    """
    if hasattr(loader, "set_epoch"):  # a loader prepared by accelerate
        loader.set_epoch(epoch)
    sampler = loader.batch_sampler
    while hasattr(sampler, "batch_sampler"):  # accelerate's BatchSamplerShard / SkipBatchSampler wrappers
        sampler = sampler.batch_sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    elif isinstance(getattr(sampler, "generator", None), torch.Generator):
        sampler.generator.manual_seed(seed + epoch)
    elif isinstance(getattr(getattr(sampler, "sampler", None), "generator", None), torch.Generator):
        sampler.sampler.generator.manual_seed(seed + epoch)  # a plain DataLoader's RandomSampler


class BatchStream:
    """Endless batches of ``loader``, epoch after epoch; ``state_dict`` is its position (epoch, batches taken).

    The order of epoch e is a function of ``(seed, e)`` (``seed_epoch``) and opening an iterator draws nothing from
    the global RNG, so after ``load_state_dict`` the stream gives exactly the batches it would have given next.
    Register it with ``accelerator.register_for_checkpointing``.
    """

    def __init__(self, loader: Any, seed: int):
        self.loader, self.seed = loader, seed
        self.epoch, self.offset = 0, 0
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._open()
        batch = next(self._iterator, None)
        if batch is None:  # the epoch ran out
            self.epoch, self.offset = self.epoch + 1, 0
            self._iterator = self._open()
            batch = next(self._iterator)
        self.offset += 1
        return batch

    def _open(self) -> Iterator[Any]:
        seed_epoch(self.loader, self.epoch, self.seed)
        with torch.random.fork_rng(devices=[]):  # opening a DataLoader iterator draws from the global RNG
            iterator = iter(self.loader)
        return itertools.islice(iterator, self.offset, None)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._iterator = None


def make_accelerator(config: Any) -> Accelerator:
    """The Accelerator of a run: precision (auto = bf16 on a GPU that has it), accumulation, seeded sampler.

    A launch whose distribution accelerate silently changes is refused (``check_launch``).
    """
    t = config.train
    check_trackers(t.report_to)
    precision = t.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        step_scheduler_with_optimizer=False,
        log_with=t.report_to or None,
        project_dir=t.output_dir,
    )
    check_launch(accelerator)
    return accelerator


REQUESTED = {"ACCELERATE_USE_FSDP": DistributedType.FSDP, "ACCELERATE_USE_DEEPSPEED": DistributedType.DEEPSPEED}


def check_launch(accelerator: Any) -> None:
    """ConfigError when accelerate runs other than launched: sharding asked for but not granted, or several
    launched processes that each run alone.

    accelerate (1.15) grants FSDP only to GPU-like devices: with ``use_cpu`` it runs plain data parallel
    (MULTI_CPU) and ignores the FSDP config, and without it each process of a CPU machine trains alone
    (DistributedType.NO) on the same output directory.
    """
    got = accelerator.distributed_type
    for variable, wanted in REQUESTED.items():
        if os.environ.get(variable, "false").lower() == "true" and got != wanted:
            raise ConfigError(f"the accelerate config asks for {wanted.value} but accelerate runs this launch as "
                              f"{got.value} on {accelerator.device.type} (accelerate {accelerate.__version__} "
                              f"shards with {wanted.value} on GPUs only); use a GPU, or a data-parallel launch")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise ConfigError(f"launched as {launched} processes but accelerate runs each alone ({got.value}); on CPU "
                          "launch with --multi_gpu and ACCELERATE_USE_CPU=true (see tests/test_distributed.py)")


def check_trackers(names: list[str]) -> None:
    """Every ``train.report_to`` name is an accelerate tracker whose package is installed (accelerate itself
    would only log at DEBUG level and run without it)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    from prefopt.errors import ConfigError

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; known: {', '.join(LOGGER_TYPE_TO_CLASS)}")
        if name not in available:
            raise ConfigError(f"train.report_to: tracker {name!r} needs its package, which is not installed "
                              f"(pip install {name})")


def sharded_weights(accelerator: Any) -> bool:
    """The run shards its weights over processes (FSDP, DeepSpeed ZeRO-3): no process holds the full model."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3


def check_backend(accelerator: Any, train: Any) -> None:
    """Refuse the combinations of backend and ``train`` settings whose result would be silently wrong."""
    from prefopt.errors import ConfigError

    if accelerator.distributed_type == DistributedType.DEEPSPEED and train.on_nonfinite == "skip":
        raise ConfigError("train.on_nonfinite='skip' is not supported under DeepSpeed (it steps the optimizer "
                          "inside backward); use 'stop' (DeepSpeed's fp16 loss scaler skips overflows itself)")
    if sharded_weights(accelerator) and train.save_model:
        raise ConfigError("train.save_model=true needs the full weights on one process, but this run shards "
                          "them (FSDP / ZeRO-3); set train.save_model=false and export the last checkpoint "
                          "(see docs/distributed.md)")
