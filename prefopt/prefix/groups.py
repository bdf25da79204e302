"""Rows that share a prefix: the groups of a batch, their common prefixes, and which models can run a layout."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from prefopt.models import adapted

SUPPORTED_ATTENTION = ("sdpa", "eager")


def attention_implementation(model: nn.Module) -> str | None:
    """The attention kind transformers runs ``model`` with ("sdpa", "eager", ...), None when it does not say."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def supports(model: nn.Module) -> bool:
    """Whether ``model`` can run a layout: SDPA or eager attention (they take a 4D mask as it is), position ids in
    its forward, and no sliding window (the 4D mask replaces the one transformers would build)."""
    base = adapted(model)
    return (attention_implementation(base) in SUPPORTED_ATTENTION
            and "position_ids" in inspect.signature(base.forward).parameters
            and getattr(base.config.get_text_config(), "sliding_window", None) is None)  # multimodal: text_config


def can_cache(model: nn.Module) -> bool:
    """Whether the cached layout can run now: not while gradient checkpointing is on and a gradient is recorded
    (transformers' checkpointed layers drop the cache)."""
    return not (getattr(adapted(model), "is_gradient_checkpointing", False) and torch.is_grad_enabled()
                and model.training)


def pair_groups(num_pairs: int) -> list[list[int]]:
    """Row groups of a PairBatch: chosen row i and rejected row num_pairs + i share their prompt."""
    return [[i, num_pairs + i] for i in range(num_pairs)]


def rank_groups(num_rows: int, pairs: Tensor, pair_group: Tensor) -> list[list[int]]:
    """Row groups of a RankBatch: the rows compared within one prompt (``pair_group``); rows in no pair alone."""
    groups: dict[int, set[int]] = {}
    for (better, worse), group in zip(pairs.tolist(), pair_group.tolist()):
        groups.setdefault(group, set()).update((better, worse))
    out = [sorted(rows) for _, rows in sorted(groups.items())]
    seen = {row for rows in out for row in rows}
    return out + [[row] for row in range(num_rows) if row not in seen]


def common_prefix_length(input_ids: np.ndarray, rows: Sequence[int], lengths: Sequence[int]) -> int:
    """Number of leading tokens the ``rows`` of ``input_ids`` [N, T] all share (within their real lengths)."""
    shortest = min(lengths[r] for r in rows)
    if len(rows) == 1:
        return shortest
    same = (input_ids[list(rows), :shortest] == input_ids[rows[0], :shortest]).all(0)
    return shortest if same.all() else int(same.argmin())


def right_padded(input_ids: Tensor, attention_mask: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The ids and real lengths of right-padded rows, on the host."""
    ids = input_ids.cpu().numpy()
    real = attention_mask.cpu().numpy().astype(bool)
    lengths = real.sum(1)
    if not (real == (np.arange(ids.shape[1]) < lengths[:, None])).all():
        raise ValueError("prefix sharing needs right-padded rows (attention_mask = ones, then zeros)")
    return ids, lengths


def split_prefixes(ids: np.ndarray, lengths: np.ndarray,
              groups: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """The groups with a common prefix (a group whose rows differ at their first token: each row alone) and the
    length of each group's common prefix."""
    out = []
    for rows in groups:
        prefix = common_prefix_length(ids, rows, lengths)
        out.extend([(list(rows), prefix)] if prefix > 0 or len(rows) == 1 else [([r], int(lengths[r])) for r in rows])
    return [rows for rows, _ in out], [prefix for _, prefix in out]


def segment_sizes(ids: np.ndarray, lengths: np.ndarray, groups: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """The common prefix length of each group and the size of its segment (the prefix once, then every branch)."""
    prefixes = [common_prefix_length(ids, rows, lengths) for rows in groups]
    return prefixes, [p + sum(int(lengths[r]) - p for r in rows) for p, rows in zip(prefixes, groups)]
