"""Reward modelling (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155, eq. 1; Sparrow's preference model).

A scalar head reads the hidden state of the last non-pad token, by transformers' rule (``score_positions``), so
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

import peft
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefopt.algorithms.base import Algorithm
from prefopt.config import check
from prefopt.models import load_reward_model
from prefopt.prefix import SharedPrefixLayout, rank_groups, share_prefixes, supports
from prefopt.registry import register_algorithm
from prefopt.types import LossOutput, RankBatch


def score_positions(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int | None) -> Tensor:
    """The token a sequence-classification head reads in each row [N]: the last attended one that is not pad.

    This is transformers' rule (the rightmost token != ``config.pad_token_id``, left or right padding), restricted
    to attended tokens: when pad = eos, a text ending with eos is read at the token before it, as plain
    transformers reads it.
    """
    readable = attention_mask.bool()
    if pad_token_id is not None:
        readable = readable & (input_ids != pad_token_id)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (readable * positions).argmax(-1)


class RewardScorer(nn.Module):
    """Wraps a sequence-classification model: ``forward(input_ids, attention_mask)`` -> scores [N].

    With ``layout`` (prefopt.prefix.share_prefixes of these right-padded rows) the backbone runs on the packed rows,
    where the prompt shared by a group of completions is computed once; the scores are the same. Scores are read
    where plain transformers reads them (``score_positions``)."""

    def __init__(self, rm: nn.Module):
        super().__init__()
        self.rm = rm

    @property
    def backbone(self) -> nn.Module:
        """The plain transformers model (LoRA: adapted in place)."""
        return self.rm.get_base_model() if isinstance(self.rm, peft.PeftModel) else self.rm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, layout: SharedPrefixLayout | None = None) -> Tensor:
        rm = self.backbone
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        read = score_positions(input_ids, attention_mask, rm.config.pad_token_id)
        if layout is None:
            hidden = rm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            pooled = hidden.last_hidden_state[rows, read]
        else:
            hidden = rm.base_model(input_ids=layout.input_ids, attention_mask=layout.mask_for(rm, rm.dtype),
                                   position_ids=layout.position_ids, use_cache=False)
            pooled = layout.gather(hidden.last_hidden_state, rows, read)
        return rm.score(pooled).squeeze(-1).float()

    def save_pretrained(self, out_dir, **kwargs) -> None:
        self.rm.save_pretrained(out_dir, **kwargs)


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

    def layout(self, batch: RankBatch) -> SharedPrefixLayout | None:
        """The batch with each prompt written once for all its completions, or None to run the padded rows."""
        if not (self.config.prefix_sharing and supports(self.unwrapped.backbone)):
            return None
        groups = rank_groups(batch.input_ids.shape[0], batch.pairs, batch.pair_group)
        return share_prefixes(batch.input_ids, batch.attention_mask, groups)

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
