"""The packed layout: each group as ONE segment [prefix, branch_1, ...] under a 4D mask, segments packed first-fit.

See prefopt.prefix for when it is chosen (short branches, mixed-length pairs, gradient checkpointing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from prefopt.prefix.groups import attention_implementation, right_padded, segment_sizes


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

    def hidden(self, backbone: nn.Module) -> Tensor:
        """Last hidden states [R * W, H] of the packed rows under ``backbone`` (a transformers base model)."""
        mask = self.mask_for(backbone, backbone.dtype)
        out = backbone(input_ids=self.input_ids, attention_mask=mask, position_ids=self.position_ids, use_cache=False)
        return out.last_hidden_state.flatten(0, 1)

    def gather(self, hidden: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Hidden states [M, H] of original tokens (rows[m], cols[m]) from ``hidden`` (``self.hidden``'s result)."""
        return hidden.flatten(0, -2)[self.source[rows, cols]]

    def mask_for(self, model: nn.Module, dtype: torch.dtype) -> Tensor:
        """The 4D mask in the form ``model``'s attention takes: bool for SDPA, an additive bias for eager."""
        if attention_implementation(model) == "eager":
            bias = torch.zeros(self.attention_mask.shape, dtype=dtype, device=self.attention_mask.device)
            return bias.masked_fill_(~self.attention_mask, torch.finfo(dtype).min)
        return self.attention_mask


def share_prefixes(input_ids: Tensor, attention_mask: Tensor, groups: Sequence[Sequence[int]],
                   pack: bool = True) -> SharedPrefixLayout:
    """Lay out right-padded rows ``input_ids`` [N, T] with each group's common prefix computed once, packed.

    ``groups`` lists row indices that may share a prefix (every row in exactly one group). With ``pack`` the
    segments are packed first-fit (longest first) into rows as wide as the longest segment; else one per row.
    The layout is built with numpy on the host (a few small arrays per batch) and moved to ``input_ids.device``.
    """
    ids, lengths = right_padded(input_ids, attention_mask)
    n, t = ids.shape
    prefixes, sizes = segment_sizes(ids, lengths, groups)
    width = max(sizes)
    placement = first_fit(sizes, width) if pack else [(i, 0) for i in range(len(sizes))]
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


def first_fit(sizes: list[int], width: int) -> list[tuple[int, int]]:
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
