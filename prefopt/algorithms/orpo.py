"""ORPO: Monolithic preference optimisation without a reference model (Hong et al. 2024, arXiv 2403.07691).

Eq. 6-7:  L = L_SFT + lambda * L_OR,   L_OR = -log sigmoid( log[ odds(y_w|x) / odds(y_l|x) ] ),
odds(y|x) = P(y|x) / (1 - P(y|x)) with log P(y|x) the MEAN per-token log-prob of the response.
log odds = (log P_w - log P_l) - (log(1 - P_w) - log(1 - P_l)), computed with a stable log1mexp.

Choices: ``lambda`` is ``beta`` (as in TRL). L_SFT is the token-mean NLL of the chosen responses (the paper);
``nll_on: full`` also scores the chosen prompt tokens, which is what TRL's ORPOTrainer does. One forward runs
chosen and rejected together, each pair's prompt computed once for both responses (prefopt.prefix).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.algorithm import Algorithm
from prefopt.algorithms.pairwise import means, pair_layout, sums
from prefopt.config import MAX_COEF, TOO_STRONG, check
from prefopt.models import load_causal_lm
from prefopt.registry import register_algorithm
from prefopt.scoring import Layout, TokenScorer
from prefopt.types import LossOutput, PairBatch


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class ORPOConfig:
    beta: float = 0.1
    """lambda: weight of the odds-ratio term."""
    nll_on: Literal["response", "full"] = "response"
    """Tokens of the chosen rows in the NLL term: the response (paper) or prompt + response (TRL)."""
    prefix_sharing: bool = True
    """Run each pair's prompt once for both responses (prefopt.prefix; same values). Needs SDPA or eager attention."""

    def __post_init__(self):
        check(self.beta >= 0, "algorithm.beta", self.beta, "must be >= 0")
        check(self.beta <= MAX_COEF, "algorithm.beta", self.beta, TOO_STRONG)


@register_algorithm("orpo")
class ORPO(Algorithm):
    """ORPO (Hong et al. 2024): SFT loss plus an odds-ratio preference term, no reference model."""

    kind = "pairs"
    kl_knob = "beta"  # the Config field the benchmark sweeps for its reward-vs-KL frontier
    Config = ORPOConfig

    def build(self) -> None:
        self.model = TokenScorer(load_causal_lm(self.run.model))

    def layout(self, batch: PairBatch) -> Layout | None:
        """The batch with each prompt run once (prefix sharing, in the layout that costs least), or None to run the
        padded rows."""
        return pair_layout(batch, self.unwrapped.lm) if self.config.prefix_sharing else None

    def losses(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss, per-pair metrics)."""
        completion = batch.completion_mask.clone()
        completion[:, 0] = 0
        nll_mask = completion.clone()
        n = batch.num_pairs
        if self.config.nll_on == "full":
            nll_mask[:n] = batch.attention_mask[:n]
            nll_mask[:, 0] = 0
        score_mask = torch.maximum(nll_mask, completion)
        per_token, _ = self.model(batch.input_ids, batch.attention_mask, score_mask, layout=self.layout(batch))
        nll = -(per_token[:n] * nll_mask[:n]).sum() / nll_mask[:n].sum().clamp(min=1)
        mean_logps = (per_token * completion).sum(-1) / completion.sum(-1).clamp(min=1)
        chosen, rejected = mean_logps.chunk(2)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        log_sig = F.logsigmoid(log_odds)
        loss = nll - self.config.beta * log_sig.mean()
        metrics = {
            "rewards/chosen": self.config.beta * chosen.detach(),
            "rewards/rejected": self.config.beta * rejected.detach(),
            "rewards/margin": self.config.beta * (chosen - rejected).detach(),
            "rewards/accuracy": (chosen > rejected).float(),
            "orpo/log_odds": log_odds.detach(),
            "orpo/log_sigmoid_odds": log_sig.detach(),
            "orpo/nll": nll.detach().expand(n),
        }
        return loss, metrics

    def step(self, batch: PairBatch) -> Iterator[LossOutput]:
        loss, metrics = self.losses(batch)
        yield LossOutput(loss, means(metrics), batch.num_tokens)

    @torch.no_grad()
    def evaluate(self, batch: PairBatch) -> dict[str, float]:
        loss, metrics = self.losses(batch)
        return {"loss": float(loss) * batch.num_pairs, **sums(metrics), "count": batch.num_pairs}
