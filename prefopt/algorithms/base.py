"""The contract every algorithm fulfils, so that the Trainer never needs to know which one it runs.

An algorithm declares:
  * ``kind``: the data kind it consumes (a name in ``prefopt.registry.KINDS``: "text", "sft", "pairs",
    "ranks", "prompts", "unpaired"); the Trainer builds batches of that kind's typed container;
  * ``Config``: a dataclass of its hyper-parameters (validated from the recipe's ``algorithm`` section);
  * ``check_run(run)``: refuse, when the recipe is read, model / data / train settings it cannot run (a
    ConfigError naming the key), so an unsupported combination never fails mid-run;
  * ``build()``: load its models (``self.model`` is the one module the optimizer trains);
  * ``step(batch)``: yield one ``LossOutput`` per optimizer update (offline algorithms yield once per batch;
    PPO yields epochs x minibatches of one rollout);
  * ``evaluate(batch)``: metric sums for a held-out batch (the Trainer averages them over rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prefopt.types import LossOutput


class Algorithm:
    kind: ClassVar[str]
    Config: ClassVar[type]
    registry_name: ClassVar[str]

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
        """Yield the loss of each optimizer update this batch gives rise to."""
        raise NotImplementedError

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

    # ------------------------------------------------------------------ helpers
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
