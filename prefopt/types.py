"""Typed batches: every algorithm of a kind receives the same container.

Shapes: B = rows (pairs, prompts), T = padded sequence length, P = number of ranked pairs.
All token tensors are right-padded unless stated otherwise; ``completion_mask`` is 1 on response tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class _Batch:
    """Moves every tensor field to a device (accelerate's send_to_device calls ``.to``)."""

    def to(self, device: Any, non_blocking: bool = False):
        changes = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens in the batch (for tokens/s)."""
        return int(self.attention_mask.sum())  # type: ignore[attr-defined]


@dataclass
class LMBatch(_Batch):
    """Causal-LM batch for ``pt`` and ``sft``."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    labels: Tensor  # [B, T], -100 where no loss (prompt tokens, padding)
    position_ids: Tensor | None = None  # [B, T] packed SFT rows: each packed example counts from 0 (data.packing)


@dataclass
class PairBatch(_Batch):
    """Preference pairs, chosen rows first then rejected rows (one forward for both).

    ``index`` identifies each pair in its dataset, so cached reference log-probs can be looked up.
    """

    input_ids: Tensor  # [2B, T] prompt + response; rows 0..B-1 chosen, B..2B-1 rejected
    attention_mask: Tensor  # [2B, T]
    completion_mask: Tensor  # [2B, T] 1 on response tokens
    index: Tensor  # [B] row ids in the dataset
    ref_chosen_logps: Tensor | None = None  # [B] summed reference log-probs, when precomputed
    ref_rejected_logps: Tensor | None = None  # [B]

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2


@dataclass
class RankBatch(_Batch):
    """K-wise rankings: every completion is one row; ``pairs`` lists (better_row, worse_row).

    InstructGPT: all C(K, 2) pairs of a prompt go in one batch, one forward per completion, and the
    loss is averaged over the pairs of each prompt (``pair_group``) and then over prompts.
    """

    input_ids: Tensor  # [N, T] prompt + completion, N = sum of K over prompts
    attention_mask: Tensor  # [N, T]
    pairs: Tensor  # [P, 2] long: row of the better and of the worse completion
    pair_group: Tensor  # [P] long: which prompt each pair belongs to (0..G-1)
    margins: Tensor | None = None  # [P] score difference of each pair in the data (used as a margin on request)


@dataclass
class PromptBatch(_Batch):
    """Prompts for online algorithms, LEFT-padded for generation."""

    input_ids: Tensor  # [B, Tp] left-padded
    attention_mask: Tensor  # [B, Tp]
    prompts: list[str] = field(default_factory=list)  # the prompt texts
    meta: list[dict[str, Any]] = field(default_factory=list)  # per-row extras (e.g. a reference answer)
    raw_prompts: list[Any] = field(default_factory=list)  # each prompt as the data gave it: a string or chat messages


@dataclass
class UnpairedBatch(_Batch):
    """Unpaired feedback (KTO): one completion per row with a desirable / undesirable label."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    completion_mask: Tensor  # [B, T]
    desirable: Tensor  # [B] bool
    index: Tensor  # [B]
    ref_logps: Tensor | None = None  # [B]


@dataclass
class Rollout(_Batch):
    """Sampled responses with everything an online update needs. Built by prefopt.rl.engine.

    Sequences are prompt (left-padded) + response (right-padded): ``sequences = cat(prompt_ids, response_ids)``.
    Per-token tensors are aligned with ``response_ids``: entry t belongs to the response token t.
    """

    prompt_ids: Tensor  # [B, Tp] left-padded
    prompt_mask: Tensor  # [B, Tp]
    response_ids: Tensor  # [B, Tr] right-padded
    response_mask: Tensor  # [B, Tr] 1 on generated tokens up to and including EOS
    logprobs: Tensor  # [B, Tr] behaviour policy log-probs of the sampled tokens
    ended: Tensor  # [B] bool: the response stopped at one of the model's EOS ids (not at max_new_tokens)
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    raw_prompts: list[Any] = field(default_factory=list)  # as PromptBatch.raw_prompts (reward models and functions)
    group: Tensor | None = None  # [B] long: which prompt each row answers (the G samples of a prompt share it)

    @property
    def sequences(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


@dataclass
class LossOutput:
    """What an algorithm returns for one optimizer step: the loss and namespaced metrics."""

    loss: Tensor  # scalar
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"rewards/accuracy": 0.6}
    num_tokens: int = 0  # tokens processed (for tokens/s)


@dataclass
class PairLogps:
    """What a pairwise loss sees: summed response log-probs under the policy and the reference.

    All tensors are [B]. ``*_lengths`` count response tokens (for length-normalised losses); the reference
    entries are None for reference-free losses.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_lengths: Tensor
    rejected_lengths: Tensor

    @property
    def chosen_logratios(self) -> Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected - self.ref_rejected
