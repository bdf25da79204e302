"""DPO: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290).

The policy is trained directly on preference pairs with the implicit reward r(x, y) = beta * log pi(y|x) / pi_ref(y|x).
Eq. 7 gives the Bradley-Terry loss ``sigmoid``; the variants (``ipo``, ``hinge``, ``cdpo``, and any loss a plugin
registers) are chosen by name in ``algorithm.loss`` with their parameters in ``algorithm.loss_params``.

Choices: one forward runs chosen and rejected rows together, each pair's prompt computed once for both responses
(prefix sharing, prefopt.prefix: the same values; ``prefix_sharing: false`` runs the padded rows instead); the
reference is a frozen copy of the starting model (or, with LoRA, the same model with its adapter disabled: no second
copy); reference log-probs are computed without grad and, with ``precompute_reference``, once per pair before
training, after which the reference is freed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from prefopt.algorithm import Algorithm
from prefopt.algorithms.pairwise import (ReferenceCache, means, pair_layout, policy_logps, preference_metrics,
                                        resolve_loss, sums)
from prefopt.config import MAX_COEF, TOO_STRONG, LoraConfig, check
from prefopt.distributed import seed_epoch
from prefopt.errors import ConfigError, UnknownNameError
from prefopt.models import load_causal_lm, needs_separate_reference
from prefopt.prefix import supports
from prefopt.registry import register_algorithm
from prefopt.scoring import Layout, TokenScorer
from prefopt.types import LossOutput, PairBatch, PairLogps


@dataclass
class DPOConfig:
    beta: float = 0.1
    """KL-regularisation strength beta (IPO: tau)."""
    loss: str = "sigmoid"
    """Registered pairwise loss: sigmoid, ipo, hinge, cdpo, ... (see `prefopt list`)."""
    loss_params: dict[str, Any] = field(default_factory=dict)
    """Extra keyword parameters of the chosen loss, e.g. {label_smoothing: 0.1} for cdpo."""
    reference: str | None = None
    """Reference model path or hub id; default: the starting model (model.name_or_path)."""
    precompute_reference: bool = False
    """Compute reference log-probs once for every pair before training, then free the reference model."""
    prefix_sharing: bool = True
    """Run each pair's prompt once for both responses (prefopt.prefix; same values). Needs SDPA or eager attention."""

    def __post_init__(self):
        check(self.beta > 0, "algorithm.beta", self.beta, "must be > 0")
        check(self.beta <= MAX_COEF, "algorithm.beta", self.beta, TOO_STRONG)


@register_algorithm("dpo")
class DPO(Algorithm):
    """Direct Preference Optimization (Rafailov et al. 2023) with pluggable pairwise losses."""

    kind = "pairs"
    kl_knob = "beta"  # the Config field the benchmark sweeps for its reward-vs-KL frontier
    Config = DPOConfig

    @classmethod
    def check_run(cls, run: Any) -> None:
        try:  # a misspelled loss or parameter: refused when the recipe is read
            resolve_loss(run.algorithm.loss, run.algorithm.loss_params)
        except UnknownNameError as exc:
            raise ConfigError(f"algorithm.loss={run.algorithm.loss!r}: {exc}") from None

    def build(self) -> None:
        self.loss_fn = resolve_loss(self.config.loss, self.config.loss_params)
        lm = load_causal_lm(self.run.model)
        self.model = TokenScorer(lm)
        self.reference: TokenScorer | None = None
        if not self.loss_fn.reference_free and (needs_separate_reference(lm) or self.config.reference):
            ref_cfg = replace(self.run.model, lora=LoraConfig(), load_in_4bit=False, gradient_checkpointing=False)
            self.reference = TokenScorer(load_causal_lm(ref_cfg, path=self.config.reference, trainable=False))
        self.cache = ReferenceCache()

    @property
    def share_prefix(self) -> bool:
        """Prefix sharing is on and both the policy and the reference can take its layout."""
        reference = getattr(self, "reference", None)
        return (self.config.prefix_sharing and supports(self.unwrapped.lm)
                and (reference is None or supports(reference.lm)))

    def setup(self, accelerator: Any, loaders: dict[str, Any]) -> None:
        super().setup(accelerator, loaders)
        if self.config.precompute_reference and not self.loss_fn.reference_free:
            t = self.run.train
            budget = {"train": t.max_steps * t.gradient_accumulation_steps, "eval": t.max_eval_batches}
            if "train" in loaders:  # the first epoch's order: the batches a short run takes
                seed_epoch(loaders["train"], 0, t.seed)
            for split, loader in loaders.items():
                self.cache.fill(split, loader, self.reference_forward, accelerator, self.layout,
                                max_batches=budget.get(split), progress=t.progress)
            self.reference = None

    def layout(self, batch: PairBatch) -> Layout | None:
        """The batch with each prompt run once (prefix sharing, in the layout that costs least), or None to run the
        padded rows."""
        return pair_layout(batch, self.unwrapped.lm) if self.share_prefix else None

    def pair_logps(self, batch: PairBatch, split: str) -> PairLogps:
        layout = self.layout(batch)
        chosen, rejected, chosen_len, rejected_len = policy_logps(self.model, batch, layout)
        ref_chosen = ref_rejected = None
        if not self.loss_fn.reference_free:
            cached = self.cache.lookup(split, batch)
            if cached is None:
                ref_chosen, ref_rejected, _, _ = policy_logps(self.reference_forward, batch, layout)
            else:
                ref_chosen, ref_rejected = cached
        return PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)

    def step(self, batch: PairBatch) -> Iterator[LossOutput]:
        logps = self.pair_logps(batch, "train")
        losses = self.loss_fn(logps, self.config.beta)
        yield LossOutput(losses.mean(), means(preference_metrics(logps, self.config.beta)), batch.num_tokens)

    @torch.no_grad()
    def evaluate(self, batch: PairBatch) -> dict[str, float]:
        logps = self.pair_logps(batch, "eval")
        losses = self.loss_fn(logps, self.config.beta)
        return {"loss": float(losses.sum()), **sums(preference_metrics(logps, self.config.beta)),
                "count": batch.num_pairs}
