"""Reward modelling (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155, eq. 1; Sparrow's preference model).

A scalar head reads the hidden state of the last non-pad token, by transformers' rule (``prefopt.scoring.score_positions``), so
a saved reward model gives the same score in prefopt and in plain ``AutoModelForSequenceClassification``; with
pad = eos (GPT-2) a trailing eos is therefore not the token read. For K ranked completions of one prompt, all
C(K, 2) pairs (y_w better than y_l) enter the same batch, each completion is scored once, and

    loss(theta) = -1 / C(K,2) * sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l) - m_wl)

is averaged over prompts (K = 2 is the pairwise Bradley-Terry loss; m is an optional margin). The optional
centering regulariser  c * mean((r_w + r_l)^2)  keeps scores near 0 (Sparrow's preference model; TRL's
``center_rewards_coefficient``).

Choices: the completions of one prompt share one forward of that prompt (prefix sharing, prefopt.prefix).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.algorithm import Algorithm
from prefopt.config import check
from prefopt.models import load_reward_model
from prefopt.prefix import choose_layout, rank_groups
from prefopt.registry import register_algorithm
from prefopt.scoring import Layout, RewardScorer
from prefopt.types import LossOutput, RankBatch


def ranking_loss(scores: Tensor, batch: RankBatch, center_coef: float,
                 use_margins: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """The K-wise loss above: per-pair terms averaged within each prompt, then over prompts.

    ``use_margins``: subtract ``batch.margins`` (the data's score difference of each pair) inside the sigmoid.
    """
    better, worse = scores[batch.pairs[:, 0]], scores[batch.pairs[:, 1]]
    diff = better - worse
    if use_margins and batch.margins is not None:
        diff = diff - batch.margins
    per_pair = -F.logsigmoid(diff)
    if center_coef:
        per_pair = per_pair + center_coef * (better + worse) ** 2
    groups = int(batch.pair_group.max()) + 1
    per_group = torch.zeros(groups, device=scores.device).index_add(0, batch.pair_group, per_pair)
    pairs_per_group = torch.bincount(batch.pair_group, minlength=groups).clamp(min=1)
    loss = (per_group / pairs_per_group).mean()
    metrics = {"rm/accuracy": (better > worse).float(), "rm/margin": (better - worse).detach(),
               "rm/score": scores.detach().mean().expand_as(better)}
    return loss, metrics


@dataclass
class RewardConfig:
    center_coef: float = 0.0
    """Coefficient of the centering regulariser mean((r_w + r_l)^2) (0 disables)."""
    prefix_sharing: bool = True
    """Run each prompt once for all its completions (prefopt.prefix; same scores). Needs SDPA or eager attention."""
    use_margins: bool = False
    """Require r_w - r_l to exceed the data's score difference (Llama-2 style margin loss)."""

    def __post_init__(self):
        check(self.center_coef >= 0, "algorithm.center_coef", self.center_coef, "must be >= 0")


@register_algorithm("reward")
class RewardModelling(Algorithm):
    """Reward model: Bradley-Terry on pairs, InstructGPT K-wise on rankings, optional centering."""

    kind = "ranks"
    Config = RewardConfig

    def build(self) -> None:
        self.model = RewardScorer(load_reward_model(self.run.model.name_or_path, self.run.model, trainable=True))

    def layout(self, batch: RankBatch) -> Layout | None:
        """The batch with each prompt run once for all its completions (in the layout that costs least), or None to
        run the padded rows."""
        if not self.config.prefix_sharing:
            return None
        groups = rank_groups(batch.input_ids.shape[0], batch.pairs, batch.pair_group)
        return choose_layout(batch.input_ids, batch.attention_mask, groups, self.unwrapped.backbone)

    def scores(self, batch: RankBatch) -> Tensor:
        """Score of every completion row [N]."""
        return self.model(batch.input_ids, batch.attention_mask, layout=self.layout(batch))

    def step(self, batch: RankBatch) -> Iterator[LossOutput]:
        loss, metrics = ranking_loss(self.scores(batch), batch, self.config.center_coef, self.config.use_margins)
        yield LossOutput(loss, {k: float(v.float().mean()) for k, v in metrics.items()}, batch.num_tokens)

    @torch.no_grad()
    def evaluate(self, batch: RankBatch) -> dict[str, float]:
        scores = self.scores(batch)
        _, metrics = ranking_loss(scores, batch, self.config.center_coef, self.config.use_margins)
        out = {k.replace("rm/", ""): float(v.float().sum()) for k, v in metrics.items()}
        return {**out, "count": float(batch.pairs.shape[0])}
