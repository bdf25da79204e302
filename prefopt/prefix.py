"""Prefix sharing: rows that start with the same tokens run that prefix through the model once.

A preference pair is two rows, prompt + chosen and prompt + rejected, and a K-wise ranking is K rows with one
prompt. In a causal LM the hidden states of a common prefix do not depend on what follows it, so each group of
rows can be written as ONE segment ``[prefix, branch_1, ..., branch_K]`` in which a branch token attends to the
prefix and to the earlier tokens of its own branch, never to another branch, and the position ids of every
branch restart at the prefix length (Wang et al. 2024, "Accelerating Direct Preference Optimization with
Prefix Sharing", arXiv 2410.20305). Every hidden state is then the one the unshared row would give, so the
log-probs and rewards are the same; the prefix is computed once instead of K times.

Segments are packed first-fit into rows no wider than the longest segment, so short pairs fill the room that
padding would take. The layout keeps, for every token of the original (logical) rows, the flat index of its
hidden state in the packed rows (``source``), so callers gather scored positions there and return results in
the original row layout: nothing downstream of the forward changes.

The attention mask is a 4D boolean mask ``[R, 1, W, W]`` (True = may attend), which transformers passes through
unchanged to SDPA; eager attention gets the same mask as an additive bias. Other attention implementations
(flash, flex), models without position ids and sliding-window models are not supported: ``supports(model)`` says
whether a model can take the layout, and the algorithms run the padded rows when it cannot. The mask takes
R * W^2 bytes, of the order of the [N, 1, T, T] mask transformers itself builds for padded rows under SDPA.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class SharedPrefixLayout:
    """Packed rows with shared prefixes, and where each original token went.

    R packed rows of width W; N original rows of width T.
    """

    input_ids: Tensor  # [R, W] packed tokens (0 in the unused slots)
    position_ids: Tensor  # [R, W] position of each token in its original row
    attention_mask: Tensor  # [R, 1, W, W] bool: query i may attend to key j
    source: Tensor  # [N, T] long: flat index (row * W + col) in the packed rows of each original token; 0 at padding
    lengths: Tensor  # [N] real tokens of each original row

    @property
    def num_tokens(self) -> int:
        """Token slots in the packed rows (the forward's work)."""
        return self.input_ids.numel()

    def gather(self, hidden: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Hidden states [M, H] of original tokens (rows[m], cols[m]) from the packed hidden states [R, W, H]."""
        return hidden.flatten(0, 1)[self.source[rows, cols]]

    def mask_for(self, model: nn.Module, dtype: torch.dtype) -> Tensor:
        """The 4D mask in the form ``model``'s attention takes: bool for SDPA, an additive bias for eager."""
        if attention_implementation(model) == "eager":
            bias = torch.zeros(self.attention_mask.shape, dtype=dtype, device=self.attention_mask.device)
            return bias.masked_fill_(~self.attention_mask, torch.finfo(dtype).min)
        return self.attention_mask


def attention_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def supports(model: nn.Module) -> bool:
    """Whether ``model`` can run a layout: SDPA or eager attention (they take a 4D mask as it is), position ids in
    its forward, and no sliding window (the 4D mask replaces the one transformers would build)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the adapted model
    return (attention_implementation(base) in SUPPORTED_ATTENTION
            and "position_ids" in inspect.signature(base.forward).parameters
            and getattr(base.config, "sliding_window", None) is None)


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


def _segments(ids: np.ndarray, lengths: np.ndarray, groups: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """The common prefix length of each group and the size of its segment (the prefix once, then every branch)."""
    prefixes = [common_prefix_length(ids, rows, lengths) for rows in groups]
    return prefixes, [p + sum(int(lengths[r]) - p for r in rows) for p, rows in zip(prefixes, groups)]


ATTENTION_WEIGHT = 0.5  # a (query, key) pair's cost in units of 4 x hidden_size FLOPs, fitted on CPU (see below)


def sharing_pays(input_ids: Tensor, attention_mask: Tensor, groups: Sequence[Sequence[int]],
                 hidden_size: int) -> bool:
    """Whether the shared layout of these right-padded rows costs less than the padded rows themselves.

    A layer's cost is its matmuls, 24 d^2 FLOPs per token slot (d = ``hidden_size``; attention projections and an
    MLP 4 d wide), plus attention, 4 d per (query, key) pair, which SDPA computes for every pair of a row even where
    the mask hides it: a packed row of width W costs W^2 pairs where its G branches alone would cost G (p + b)^2.
    So sharing wins when the prompt is long relative to the G responses and loses when G long responses share a
    short prompt (measured, GPT-2 4 x 256 forward + backward on CPU, G = 8, prompt 96: shared / padded time 0.37
    at 32-token responses, 0.86 at 128, 1.44 at 256; the rule, with attention pairs weighted ``ATTENTION_WEIGHT``,
    picks the faster side in each of 8 measured settings).
    """
    ids = input_ids.cpu().numpy()
    lengths = attention_mask.cpu().numpy().astype(bool).sum(1)
    _, sizes = _segments(ids, lengths, groups)
    width = max(sizes)
    packed_rows = max(row for row, _ in _first_fit(sizes, width)) + 1
    rows, padded_width = ids.shape

    def cost(rows: int, width: int) -> float:
        return rows * width * 6 * hidden_size + ATTENTION_WEIGHT * rows * width**2

    return cost(packed_rows, width) < cost(rows, padded_width)


def share_prefixes(input_ids: Tensor, attention_mask: Tensor, groups: Sequence[Sequence[int]],
                   pack: bool = True) -> SharedPrefixLayout:
    """Lay out right-padded rows ``input_ids`` [N, T] with each group's common prefix computed once.

    ``groups`` lists row indices that may share a prefix (every row in exactly one group). With ``pack`` the
    segments are packed first-fit (longest first) into rows as wide as the longest segment; else one per row.
    The layout is built with numpy on the host (a few small arrays per batch) and moved to ``input_ids.device``.
    """
    ids = input_ids.cpu().numpy()
    real = attention_mask.cpu().numpy().astype(bool)
    n, t = ids.shape
    lengths = real.sum(1)
    if not (real == (np.arange(t) < lengths[:, None])).all():
        raise ValueError("prefix sharing needs right-padded rows (attention_mask = ones, then zeros)")

    prefixes, sizes = _segments(ids, lengths, groups)
    width = max(sizes)
    placement = _first_fit(sizes, width) if pack else [(i, 0) for i in range(len(sizes))]
    num_rows = max(row for row, _ in placement) + 1

    packed = np.zeros((num_rows, width), dtype=ids.dtype)
    positions = np.zeros((num_rows, width), dtype=np.int64)
    mask = np.zeros((num_rows, width, width), dtype=bool)
    source = np.zeros((n, t), dtype=np.int64)
    causal = np.tril(np.ones((width, width), dtype=bool))
    for rows, prefix, (row, start) in zip(groups, prefixes, placement):
        packed[row, start:start + prefix] = ids[rows[0], :prefix]
        positions[row, start:start + prefix] = np.arange(prefix)
        source[list(rows), :prefix] = row * width + start + np.arange(prefix)
        branches = []  # (start, end) of each branch in the packed row
        end = start + prefix
        for r in rows:
            span = int(lengths[r]) - prefix
            packed[row, end:end + span] = ids[r, prefix:lengths[r]]
            positions[row, end:end + span] = np.arange(prefix, lengths[r])
            source[r, prefix:lengths[r]] = row * width + end + np.arange(span)
            branches.append((end, end + span))
            end += span
        size = end - start
        block = mask[row, start:end, start:end]
        block[:] = causal[:size, :size]  # the prefix and each branch: causal
        for k, (first, last) in enumerate(branches):  # ... and no branch sees an earlier branch
            for other_first, other_last in branches[:k]:
                block[first - start:last - start, other_first - start:other_last - start] = False
    unused = ~mask.any(-1)  # slots outside every segment attend to themselves: no empty softmax row
    rows_idx, cols_idx = np.nonzero(unused)
    mask[rows_idx, cols_idx, cols_idx] = True

    device = input_ids.device
    return SharedPrefixLayout(torch.from_numpy(packed).to(device), torch.from_numpy(positions).to(device),
                              torch.from_numpy(mask[:, None]).to(device), torch.from_numpy(source).to(device),
                              torch.from_numpy(lengths).to(device))


def _first_fit(sizes: list[int], width: int) -> list[tuple[int, int]]:
    """(row, start) of each segment: longest first, into the first row with room."""
    free: list[int] = []
    placement: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        row = next((r for r, room in enumerate(free) if room >= sizes[i]), len(free))
        if row == len(free):
            free.append(width)
        placement[i] = (row, width - free[row])
        free[row] -= sizes[i]
    return placement
