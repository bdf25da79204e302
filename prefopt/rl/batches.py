"""What the online skeleton's stages pass each other (prefopt.rl.algorithm): the scored rollout, one micro-batch of
an update, and the order of a rollout's rows over its updates."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefopt.types import Rollout


@dataclass
class Scored:
    """A rollout with everything the advantages and the update need; per-token tensors are [B, Tr]."""

    rollout: Rollout
    mask: Tensor  # 1 on response tokens
    old_logps: Tensor | None  # log pi_old; None: the single update's own log-probs are used (detached)
    ref_logps: Tensor | None  # log pi_ref; None without a KL term
    scores: Tensor  # [B] R(x, y)
    components: dict[str, Tensor]  # each reward component's raw score [B]
    kl: Tensor  # per-token KL estimate (``token_kl``; 0 without a reference or when ``kl_from_update``)
    rewards: Tensor  # per-token rewards r_t
    kl_coef: float = 0.0  # beta of the KL shaping in ``rewards`` (0: the KL is not a reward term)
    values: Tensor | None = None  # V(s_t) of the critic at scoring time (``uses_critic``)
    returns: Tensor | None = None  # the estimator's returns (value targets), set by ``advantages``
    loss_mask: Tensor | None = None  # the tokens the update trains on (default ``mask``; ``mask_truncated_completions``)

    def __post_init__(self):
        if self.loss_mask is None:
            self.loss_mask = self.mask


@dataclass
class MicroBatch:
    """One micro-batch of an update: its rows of the rollout, its place among the update's micro-batches, and the
    size of the update (the denominators that make the micro-batches' losses add up to the update's loss)."""

    rows: Tensor  # row indices into the rollout
    part: int  # 0 .. train.gradient_accumulation_steps - 1
    update_rows: int  # rows of the update (its minibatch)
    update_tokens: float  # response tokens of the update
    tokens_per_update: float  # response tokens of the rollout / num_minibatches
    micro_batches: int = 1  # micro-batches of the update (train.gradient_accumulation_steps)


def minibatches(rows: int, epochs: int, num_minibatches: int, device: Any, shuffle: bool = True,
                group: Tensor | None = None) -> Iterator[Tensor]:
    """Row indices of each optimizer update of one rollout of ``rows`` rows: ``epochs`` passes over
    ``num_minibatches`` minibatches, the rows shuffled at the start of each pass unless ``shuffle`` is False.
    With ``group`` (the prompt of each row) whole groups are shuffled and a group's rows stay next to each other, so
    the G samples of a prompt share a minibatch (and their prompt's forward) where the group count allows."""
    positions = torch.arange(rows, device=device)
    for _ in range(epochs):
        if not shuffle:
            order = positions
        elif group is None:
            order = torch.randperm(rows, device=device)
        else:
            ids, inverse = torch.unique(group, return_inverse=True)
            place = torch.randperm(len(ids), device=device)[inverse]  # each row's group's place in the pass
            order = torch.argsort(place * rows + positions)
        # a short last batch of an epoch can hold fewer rows than minibatches: no empty update
        yield from (minibatch for minibatch in order.tensor_split(num_minibatches) if len(minibatch))
