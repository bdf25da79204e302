"""The contract every algorithm fulfils, so that the Trainer never needs to know which one it runs.

An algorithm declares:
  * ``kind``: the data kind it consumes (a name in ``prefopt.registry.KINDS``: "text", "sft", "pairs",
    "ranks", "prompts", "unpaired"); the Trainer builds batches of that kind's typed container;
  * ``Config``: a dataclass of its hyper-parameters (validated from the recipe's ``algorithm`` section);
  * ``check_run(run)``: refuse, when the recipe is read, model / data / train settings it cannot run (a
    ConfigError naming the key), so an unsupported combination never fails mid-run;
  * ``kl_knob`` (optional): the Config field that trades reward for KL to the reference (beta, kl_coef), the one
    the benchmark sweeps for its frontier (prefopt.bench);
  * ``build()``: load its models (``self.model`` is the one module the optimizer trains);
  * ``step(batch)``: yield the ``LossOutput`` of each micro-batch; ``train.gradient_accumulation_steps`` (G)
    consecutive micro-batches make one optimizer update (accelerate accumulates them and scales each loss by 1/G,
    so the update's loss is the mean of its G micro-batch losses);
  * ``accumulates_in_step``: who makes the G micro-batches of an update. False (offline algorithms): each batch
    is one micro-batch and the Trainer passes G batches per training step. True (online algorithms, which make
    several updates from one batch: PPO's epochs x minibatches of a rollout, A2C's one update of a rollout): the
    Trainer passes ONE batch per training step, and ``step`` splits every update's minibatch into G
    micro-batches whose losses are weighted so that their mean is the minibatch's loss -- accumulation then
    changes memory, not the update;
  * ``full_batches``: every training batch holds exactly ``train.batch_size`` rows (the short last batch of an
    epoch is left out, a different one each epoch; online algorithms, whose updates split a batch into minibatches
    and micro-batches that must not be empty, as TRL does);
  * ``updates_per_step``: optimizer updates per training step (the learning-rate schedule advances once per update);
  * ``parameter_groups()``: the optimizer's parameter groups (a critic may have its own learning rate);
  * ``evaluate(batch)``: metric sums for a held-out batch (the Trainer averages them over rows).

An algorithm with a reference policy scores it with ``reference_forward`` (the one way, for every algorithm):
``self.reference`` when it holds a frozen copy, else its trained module with the LoRA adapter off, in either case
under the accelerator's autocast, the precision the prepared policy runs in, so that at policy = reference every
log-ratio is exactly 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prefopt.models import reference_context
from prefopt.types import LossOutput


class Algorithm:
    kind: ClassVar[str]
    kl_knob: ClassVar[str | None] = None  # the Config field that sets the strength of the pull to the reference
    Config: ClassVar[type]
    registry_name: ClassVar[str]
    accumulates_in_step: ClassVar[bool] = False
    full_batches: ClassVar[bool] = False

    def __init__(self, config: Any, run: Any, tokenizer: Any):
        self.config = config  # this algorithm's Config
        self.run = run  # the whole RunConfig (model, data, train sections)
        self.tokenizer = tokenizer
        self.model: nn.Module | None = None
        self.accelerator = None

    @classmethod
    def check_run(cls, run: Any) -> None:
        """Raise a ConfigError for settings of the other sections this algorithm cannot run (none by default).

        Called by ``prefopt.config.build_run_config`` (config time: ``prefopt train`` exits 2 with one line) and
        again by ``build``-time code that wants the same guarantee for a RunConfig made by hand.
        """

    # ------------------------------------------------------------------ lifecycle (called by the Trainer)
    def build(self) -> None:
        """Load the models; set ``self.model`` to the trainable module."""
        raise NotImplementedError

    def setup(self, accelerator: Any, loaders: dict[str, Any]) -> None:
        """After ``accelerator.prepare``: move frozen modules to the device; precompute what is cached."""
        self.accelerator = accelerator
        for name, module in vars(self).items():
            if isinstance(module, nn.Module) and name != "model":
                module.to(accelerator.device)

    def step(self, batch: Any) -> Iterator[LossOutput]:
        """Yield the loss of each micro-batch this batch gives rise to (see the module docstring)."""
        raise NotImplementedError

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates one ``step`` makes (each ``train.gradient_accumulation_steps`` micro-batches)."""
        return 1

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: every trainable parameter of ``self.model`` at ``train.learning_rate``."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    @property
    def accumulation(self) -> int:
        """G: micro-batches per optimizer update (``train.gradient_accumulation_steps``)."""
        return self.run.train.gradient_accumulation_steps

    @torch.no_grad()
    def evaluate(self, batch: Any) -> dict[str, float]:
        """Per-batch metric SUMS over rows plus ``"count"``; the Trainer divides by the total count."""
        return {}

    def finalize_eval(self, metrics: dict[str, float]) -> dict[str, float]:
        """Derive metrics from the averaged ones (e.g. perplexity from NLL)."""
        return metrics

    def save(self, out_dir: str | Path) -> None:
        """Write the trained model so plain transformers / peft can load it."""
        model = self.unwrapped
        model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)

    @property
    def exported_model(self) -> nn.Module:
        """The transformers / peft model ``save`` writes (its weights are what a checkpoint's ``model/`` holds):
        the trained module's ``lm`` or ``rm`` when it wraps one (TokenScorer, RewardScorer, PolicyAndValue)."""
        unwrapped = self.unwrapped
        for name in ("lm", "rm"):
            inner = getattr(unwrapped, name, None)
            if isinstance(inner, nn.Module):
                return inner
        return unwrapped

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def reference_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The reference policy's forward on the arguments the policy's forward takes, without gradients.

        ``self.reference`` (a frozen module taking those arguments) when set, else ``self.model`` with its LoRA
        adapter disabled (no second copy). Runs under the accelerator's autocast, as the prepared policy does.
        """
        reference = getattr(self, "reference", None)
        with self.autocast():
            if reference is not None:
                return reference(*args, **kwargs)
            with reference_context(getattr(self.unwrapped, "lm", self.unwrapped)):
                return self.model(*args, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of the run (the one ``accelerator.prepare`` puts around the policy)."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    @property
    def unwrapped(self) -> nn.Module:
        if self.accelerator is None:
            return self.model
        return self.accelerator.unwrap_model(self.model)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator is not None else torch.device("cpu")

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
