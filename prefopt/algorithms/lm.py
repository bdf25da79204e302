"""Language-model stages of the pipeline (InstructGPT step 1; MedicalGPT's PT and SFT).

``pt``: continued pretraining on raw text, documents packed into fixed-length chunks (as transformers'
run_clm does: EOS-separated, positions 0..T-1 over the chunk, attention spans it). ``lm_nll`` is the one way
packed text is scored, here and in PPO-ptx.
``sft``: supervised fine-tuning on demonstrations; the loss covers response tokens only (prompt tokens are
labelled -100 by the ``sft`` data kind).

Both minimise the token-mean negative log-likelihood  L = -1/N * sum_t log pi(y_t | y_<t)  over labelled tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from prefopt.algorithm import Algorithm
from prefopt.models import load_causal_lm
from prefopt.registry import register_algorithm
from prefopt.scoring import TokenScorer
from prefopt.types import LMBatch, LossOutput


def lm_nll(token_logps: Callable[[Tensor, Tensor, Tensor], Tensor], batch: LMBatch) -> tuple[Tensor, Tensor]:
    """(summed NLL over the labelled tokens of ``batch``, their count).

    ``token_logps(input_ids, attention_mask, score_mask)`` -> per-token log-probs [B, T] of a causal LM forward
    over each row (positions from the attention mask: 0..T-1 on right-padded rows).
    """
    score_mask = (batch.labels != -100).long()
    score_mask[:, 0] = 0  # column 0 is never predicted
    per_token = token_logps(batch.input_ids, batch.attention_mask, score_mask)
    return -(per_token * score_mask).sum(), score_mask.sum()


@dataclass
class LMConfig:
    """The LM stages take their settings from the model, data and train sections."""


class LanguageModelling(Algorithm):
    Config = LMConfig

    def build(self) -> None:
        self.model = TokenScorer(load_causal_lm(self.run.model))

    def nll(self, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL over labelled tokens, number of labelled tokens)."""
        return lm_nll(lambda *inputs: self.model(*inputs)[0], batch)

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
