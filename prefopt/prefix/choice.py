"""Which way to run rows that share prefixes: the padded rows, the packed layout or the cached one, by a cost model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from prefopt.prefix.cached import CachedPrefixLayout, branch_chunks, cache_prefixes
from prefopt.prefix.groups import can_cache, right_padded, segment_sizes, split_prefixes, supports
from prefopt.prefix.packed import SharedPrefixLayout, first_fit, share_prefixes

TOKEN_WEIGHT = 6  # a token slot's cost per unit of hidden size: 24 d^2 FLOPs a layer, in units of 4 d FLOPs
ATTENTION_WEIGHT = 0.5  # a (query, key) pair SDPA computes, in units of 4 d FLOPs, fitted on CPU (choose_layout)
COPY_WEIGHT = 64  # a prefix position's keys and values copied for one branch (forward and backward), fitted on CPU


def _cost(slots: int, pairs: int, hidden_size: int, copies: int = 0) -> float:
    return TOKEN_WEIGHT * hidden_size * slots + ATTENTION_WEIGHT * pairs + COPY_WEIGHT * copies


def layout_costs(input_ids: Tensor, attention_mask: Tensor, groups: Sequence[Sequence[int]],
                 hidden_size: int) -> dict[str, float]:
    """The modelled cost of one forward over these right-padded rows: "padded" (the rows as they are), "packed" and
    "cached" (the two layouts), in units of 4 x ``hidden_size`` FLOPs per layer (see ``choose_layout``)."""
    ids, lengths = right_padded(input_ids, attention_mask)
    rows, width = ids.shape
    _, sizes = segment_sizes(ids, lengths, groups)
    packed_width = max(sizes)
    packed_rows = max(row for row, _ in first_fit(sizes, packed_width)) + 1
    groups, prefixes = split_prefixes(ids, lengths, groups)
    spans = [int(lengths[r]) - p for rows_, p in zip(groups, prefixes) for r in rows_ if lengths[r] > p]
    prefix_width, branch_width = max(prefixes), max(spans, default=0)
    chunks = branch_chunks(branch_width) if branch_width else []
    return {
        "padded": _cost(rows * width, rows * width**2, hidden_size),
        "packed": _cost(packed_rows * packed_width, packed_rows * packed_width**2, hidden_size),
        "cached": _cost(len(groups) * prefix_width + len(spans) * branch_width,
                        len(groups) * prefix_width**2
                        + len(spans) * sum((end - start) * (prefix_width + end) for start, end in chunks),
                        hidden_size, len(spans) * prefix_width * len(chunks)),
    }


def choose_layout(input_ids: Tensor, attention_mask: Tensor, groups: Sequence[Sequence[int]],
                  model: nn.Module) -> SharedPrefixLayout | CachedPrefixLayout | None:
    """The cheapest way to run these right-padded rows through ``model``: the packed or the cached layout, or None
    (the padded rows; also when ``model`` cannot take a layout).

    A layer's cost is its matmuls, 24 d^2 FLOPs per token slot (d = the hidden size; attention projections and an
    MLP 4 d wide), plus attention, 4 d per (query, key) pair SDPA computes, every pair of a row even where the mask
    hides it, plus, in the cached layout, the prefix's keys and values copied once per branch and chunk (index,
    concatenation and their backward: memory-bound). Per group of K rows with a p-token prefix and b-token branches:
    padded K (p + b) slots and K (p + b)^2 pairs, packed (p + K b) slots and (p + K b)^2 pairs, cached p + K b
    slots, p^2 + K b (p + b) pairs in one chunk (fewer in n, ``branch_chunks``) and K p n copies. So the packed
    layout loses when K long branches share a short prefix, the cached one when the branches are short (its copies)
    or by padding (prefixes padded to the longest, branches to the longest), and the padded rows win only when
    little is shared. ``ATTENTION_WEIGHT`` and ``COPY_WEIGHT``
    are fitted on CPU (``benchmarks/prefix_layouts.py``: the rule picks the measured fastest layout, or one within
    5% of it, in each measured setting; GPT-2 4 x 256 and Qwen2 4 x 64 trunks, online groups of 8 with 8-256-token
    responses, HH-like pairs, 1,024-token pairs, 4-wise rankings).
    """
    if not supports(model):
        return None
    costs = layout_costs(input_ids, attention_mask, groups, model.config.get_text_config().hidden_size)
    if not can_cache(model):
        costs.pop("cached")
    best = min(costs, key=costs.get)
    if best == "packed":
        return share_prefixes(input_ids, attention_mask, groups)
    return cache_prefixes(input_ids, attention_mask, groups) if best == "cached" else None
