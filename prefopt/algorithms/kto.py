"""KTO: Kahneman-Tversky optimisation from unpaired feedback (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 7-8).

Each row is one completion labelled desirable or undesirable; there are no pairs. With the implicit reward
r(x, y) = log pi(y|x) / pi_ref(y|x) and the reference point z_ref = KL(pi(y'|x) || pi_ref(y'|x)),

    v(x, y) = lambda_D * sigmoid(beta * (r(x, y) - z_ref))   if y is desirable
              lambda_U * sigmoid(beta * (z_ref - r(x, y)))   if y is undesirable
    L = E[ lambda_y - v(x, y) ]

Choices (those of TRL's KTOTrainer, whose numbers we match): z_ref is estimated in every batch from MISMATCHED
pairs, row i's prompt with row i-1's completion (cyclically), as the batch mean of
log pi(y_{i-1}|x_i) - log pi_ref(y_{i-1}|x_i), averaged over processes, clamped at 0 and detached (no gradient
flows through it). The mismatched sequences are cut to ``data.max_length`` from the right. The loss is the mean
over all rows of the batch. The reference is a frozen copy of the starting model, or with LoRA the same model with
its adapter off (no second copy). Reference log-probs are not cached: the mismatched pairs change with the batch.
A batch needs at least two rows (with one row the "mismatched" pair is the matched one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from prefopt.algorithm import Algorithm
from prefopt.config import MAX_COEF, TOO_STRONG, LoraConfig, check
from prefopt.data.collate import pad
from prefopt.models import load_causal_lm, needs_separate_reference
from prefopt.registry import register_algorithm
from prefopt.scoring import TokenScorer, sum_scored
from prefopt.types import LossOutput, UnpairedBatch


@dataclass
class KTOConfig:
    beta: float = 0.1
    """Temperature beta of the value function (how far the policy may move from the reference)."""
    desirable_weight: float = 1.0
    """lambda_D: weight of desirable rows (eq. 8 suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3])."""
    undesirable_weight: float = 1.0
    """lambda_U: weight of undesirable rows."""
    reference: str | None = None
    """Reference model path or hub id; default: the starting model (model.name_or_path)."""

    def __post_init__(self):
        check(self.beta > 0, "algorithm.beta", self.beta, "must be > 0")
        check(self.beta <= MAX_COEF, "algorithm.beta", self.beta, TOO_STRONG)
        check(self.desirable_weight > 0, "algorithm.desirable_weight", self.desirable_weight, "must be > 0")
        check(self.undesirable_weight > 0, "algorithm.undesirable_weight", self.undesirable_weight, "must be > 0")


def mismatched_pairs(batch: UnpairedBatch, pad_id: int, max_length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row i = prompt of row i + completion of row i-1 (cyclically), right-padded and cut to ``max_length``.

    Returns (input_ids, attention_mask, completion_mask), each [B, T'].
    """
    completion = batch.completion_mask.bool()
    prompt = batch.attention_mask.bool() & ~completion
    prompts = [row[mask].tolist() for row, mask in zip(batch.input_ids, prompt)]
    completions = [row[mask].tolist() for row, mask in zip(batch.input_ids, completion)]
    completions = completions[-1:] + completions[:-1]
    rows = [(p + c)[:max_length] for p, c in zip(prompts, completions)]
    masks = [([0] * len(p) + [1] * len(c))[:max_length] for p, c in zip(prompts, completions)]
    device = batch.input_ids.device
    input_ids = pad(rows, pad_id).to(device)
    attention_mask = pad([[1] * len(row) for row in rows], 0).to(device)
    return input_ids, attention_mask, pad(masks, 0).to(device)


def kto_loss(logratios: Tensor, desirable: Tensor, kl: Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> Tensor:
    """Per-row KTO loss lambda_y - v(x, y) [B] from log-ratios r [B], labels [B] (bool) and z_ref (scalar)."""
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, chosen, rejected)


def completion_logps(scorer: Any, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """Summed log-probs of the completion tokens [B]."""
    per_token, _ = scorer(input_ids, attention_mask, completion_mask)
    return sum_scored(per_token, completion_mask)[0]


def group_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of ``values`` where ``mask``; NaN for an empty group (metric averagers skip it)."""
    return float(values[mask].mean()) if bool(mask.any()) else float("nan")


@register_algorithm("kto")
class KTO(Algorithm):
    """KTO (Ethayarajh et al. 2024): unpaired desirable / undesirable feedback, prospect-theoretic value."""

    kind = "unpaired"
    kl_knob = "beta"  # the Config field the benchmark sweeps for its reward-vs-KL frontier
    Config = KTOConfig

    @classmethod
    def check_run(cls, run: Any) -> None:
        check(run.train.batch_size > 1, "train.batch_size", run.train.batch_size,
              "KTO needs >= 2 rows per batch to estimate its KL reference point")

    def build(self) -> None:
        self.check_run(self.run)
        lm = load_causal_lm(self.run.model)
        self.model = TokenScorer(lm)
        self.reference: TokenScorer | None = None
        if needs_separate_reference(lm) or self.config.reference:
            ref_cfg = replace(self.run.model, lora=LoraConfig(), load_in_4bit=False, gradient_checkpointing=False)
            self.reference = TokenScorer(load_causal_lm(ref_cfg, path=self.config.reference, trainable=False))

    def reference_point(self, batch: UnpairedBatch) -> Tensor:
        """z_ref: mean KL estimate on the batch's mismatched pairs, over all processes, clamped at 0, detached."""
        kl_batch = mismatched_pairs(batch, self.tokenizer.pad_token_id, self.run.data.max_length)
        with torch.no_grad():
            kl = (completion_logps(self.model, *kl_batch) - completion_logps(self.reference_forward, *kl_batch)).mean()
        if self.accelerator is not None:
            kl = self.accelerator.gather(kl[None]).mean()
        return kl.clamp(min=0).detach()

    def losses(self, batch: UnpairedBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """(per-row losses [B], metrics)."""
        inputs = (batch.input_ids, batch.attention_mask, batch.completion_mask)
        kl = self.reference_point(batch)
        logps = completion_logps(self.model, *inputs)
        with torch.no_grad():
            ref_logps = completion_logps(self.reference_forward, *inputs)
        logratios = logps - ref_logps
        desirable = batch.desirable.bool()
        losses = kto_loss(logratios, desirable, kl, self.config.beta, self.config.desirable_weight,
                          self.config.undesirable_weight)
        rewards = self.config.beta * logratios.detach()
        metrics = {
            "kto/kl": kl,
            "rewards/accuracy": torch.where(desirable, logratios > kl, logratios < kl).float(),  # [B]
            "rewards/chosen": group_mean(rewards, desirable),
            "rewards/rejected": group_mean(rewards, ~desirable),
            "logps/chosen": group_mean(logps.detach(), desirable),
            "logps/rejected": group_mean(logps.detach(), ~desirable),
        }
        return losses, metrics

    def step(self, batch: UnpairedBatch) -> Iterator[LossOutput]:
        losses, metrics = self.losses(batch)
        logged = {key: float(value.float().mean()) if isinstance(value, Tensor) else value
                  for key, value in metrics.items()}
        yield LossOutput(losses.mean(), logged, batch.num_tokens)

    @torch.no_grad()
    def evaluate(self, batch: UnpairedBatch) -> dict[str, float]:
        losses, metrics = self.losses(batch)
        rows = batch.input_ids.shape[0]
        return {"loss": float(losses.sum()), "kto/kl": float(metrics["kto/kl"]) * rows,
                "rewards/accuracy": float(metrics["rewards/accuracy"].sum()), "count": rows}
