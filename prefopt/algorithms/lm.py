"""Language-model stages of the pipeline (InstructGPT step 1; MedicalGPT's PT and SFT).

``pt``: continued pretraining on raw text, documents packed into fixed-length chunks (as transformers'
run_clm does: EOS-separated, positions 0..T-1 over the chunk, attention spans it). ``lm_nll`` is the one way
packed text is scored, here and in PPO-ptx.
``sft``: supervised fine-tuning on demonstrations; the loss covers the assistant's tokens only (every assistant turn
of a conversation, or only the last: ``data.assistant_turns``; the rest is labelled -100 by the ``sft`` data kind).
With ``data.packing`` the examples are packed into ``data.max_length`` sequences (TRL's bfd packing) and each
keeps its own positions and a causal mask of its own (``packed_layout``): the attention boundaries are exact, so a
packed example's loss equals its unpacked loss.

Both minimise the token-mean negative log-likelihood  L = -1/N * sum_t log pi(y_t | y_<t)  over labelled tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from prefopt.algorithm import Algorithm
from prefopt.errors import ConfigError
from prefopt.models import load_causal_lm
from prefopt.registry import register_algorithm
from prefopt.prefix import SharedPrefixLayout, supports
from prefopt.scoring import TokenScorer
from prefopt.types import LMBatch, LossOutput


def lm_nll(token_logps: Callable[..., Tensor], batch: LMBatch) -> tuple[Tensor, Tensor]:
    """(summed NLL over the labelled tokens of ``batch``, their count).

    ``token_logps(input_ids, attention_mask, score_mask, layout=None)`` -> per-token log-probs [B, T] of a causal LM
    forward over each row (positions from the attention mask: 0..T-1 on right-padded rows); packed SFT examples
    (``batch.position_ids``) run in their ``packed_layout``.
    """
    score_mask = (batch.labels != -100).long()
    score_mask[:, 0] = 0  # column 0 is never predicted
    if batch.position_ids is None:
        per_token = token_logps(batch.input_ids, batch.attention_mask, score_mask)
    else:
        per_token = token_logps(batch.input_ids, batch.attention_mask, score_mask, layout=packed_layout(batch))
    return -(per_token * score_mask).sum(), score_mask.sum()


def packed_layout(batch: LMBatch) -> SharedPrefixLayout:
    """The forward layout of packed examples: their positions, and a causal mask within each example only (a block
    diagonal; a padding slot attends to itself), so every example is scored as it would be alone."""
    positions, real = batch.position_ids, batch.attention_mask.bool()
    example = (positions == 0).long().cumsum(-1)  # [B, T] which example each token belongs to
    width = positions.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=positions.device).tril()
    mask = (example[:, :, None] == example[:, None, :]) & causal & real[:, None, :] & real[:, :, None]
    mask |= torch.eye(width, dtype=torch.bool, device=positions.device) & ~real[:, :, None]
    source = torch.arange(positions.numel(), device=positions.device).view_as(positions)
    return SharedPrefixLayout(batch.input_ids, positions, mask[:, None], source, batch.attention_mask.sum(-1))


@dataclass
class LMConfig:
    """The LM stages take their settings from the model, data and train sections."""


class LanguageModelling(Algorithm):
    Config = LMConfig

    def build(self) -> None:
        lm = load_causal_lm(self.run.model)
        if self.run.data.packing and self.kind == "sft" and not supports(lm):
            raise ConfigError("data.packing: this model cannot take a per-example attention mask (it needs SDPA or "
                              "eager attention and no sliding window); set data.packing=false")
        self.model = TokenScorer(lm)

    def nll(self, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL over labelled tokens, number of labelled tokens)."""
        return lm_nll(lambda *inputs, **kwargs: self.model(*inputs, **kwargs)[0], batch)

    def step(self, batch: LMBatch) -> Iterator[LossOutput]:
        total, count = self.nll(batch)
        loss = total / count.clamp(min=1)
        yield LossOutput(loss, {"lm/nll": float(loss.detach()), "lm/tokens": float(count)}, batch.num_tokens)

    @torch.no_grad()
    def evaluate(self, batch: LMBatch) -> dict[str, float]:
        total, count = self.nll(batch)
        return {"nll": float(total), "count": float(count)}

    def finalize_eval(self, metrics: dict[str, float]) -> dict[str, float]:
        if "eval/nll" in metrics:
            metrics["eval/perplexity"] = math.exp(min(metrics["eval/nll"], 50.0))
        return metrics


@register_algorithm("pt")
class Pretrain(LanguageModelling):
    """Continued pretraining: causal-LM loss on packed raw text."""

    kind = "text"


@register_algorithm("sft")
class SFT(LanguageModelling):
    """Supervised fine-tuning: causal-LM loss on response tokens only."""

    kind = "sft"
