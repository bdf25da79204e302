"""The cached layout: each group's prefix run once with a KV cache, its rows selected per branch, the branches on it.

See prefopt.prefix for when it is chosen (long branches: attention K b (p + b) instead of the padded K (p + b)^2).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from prefopt.prefix.groups import right_padded, split_prefixes
from prefopt.prefix.packed import SharedPrefixLayout


@dataclass
class CachedPrefixLayout:
    """Group prefixes run once with a KV cache, then the branches on their prefix's cache.

    B groups, prefixes left-padded to P columns; M branch rows (the original rows with tokens past their group's
    prefix), right-padded to S columns; N original rows of width T.
    """

    prefix_ids: Tensor  # [B, P] each group's prefix, left-padded
    prefix_mask: Tensor  # [B, P] 1 on real prefix tokens
    prefix_positions: Tensor  # [B, P] 0.. from the first real token (0 on padding)
    branch_ids: Tensor  # [M, S] each branch (the row's tokens after its prefix), right-padded
    branch_mask: Tensor  # [M, P + S] its prefix's mask, then 1 on its real branch tokens
    branch_positions: Tensor  # [M, S] continuing from its prefix's length; padding slots repeat the branch's last
    # position, so no id passes the original row's (a learned position table's size, dynamic RoPE's trigger)
    prefix_of: Tensor  # [M] the group (prefix row) each branch continues
    source: Tensor  # [N, T] flat index of each original token in [prefix states (B * P); branch states (M * S)]
    lengths: Tensor  # [N] real tokens of each original row

    @property
    def num_tokens(self) -> int:
        """Token slots of the two forwards (their work outside attention)."""
        return self.prefix_ids.numel() + self.branch_ids.numel()

    def hidden(self, backbone: nn.Module) -> Tensor:
        """Last hidden states [B * P + M * S, H] of the prefixes, then the branches, under ``backbone``."""
        if backbone.training and torch.is_grad_enabled() and getattr(backbone, "is_gradient_checkpointing", False):
            raise RuntimeError("the cached prefix layout cannot run under gradient checkpointing (transformers drops "
                               "the cache in checkpointed layers); choose_layout picks the packed one there")
        # the embeddings of both forwards in one lookup: one [vocab, H] gradient (at a 152k vocabulary, a second one
        # costs as much as the attention saved)
        embeds = backbone.get_input_embeddings()(torch.cat([self.prefix_ids.flatten(), self.branch_ids.flatten()]))
        prefix_embeds, branch_embeds = embeds.split([self.prefix_ids.numel(), self.branch_ids.numel()])
        cache = new_cache(backbone)
        past = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
        prefix = backbone(inputs_embeds=prefix_embeds.view(*self.prefix_ids.shape, -1), attention_mask=self.prefix_mask,
                          position_ids=self.prefix_positions, use_cache=True, **{past: cache}).last_hidden_state
        if self.branch_ids.numel() == 0:
            return prefix.flatten(0, 1)
        select_rows(cache, self.prefix_of)  # one copy of the prefix's keys and values per branch
        branch_embeds, width = branch_embeds.view(*self.branch_ids.shape, -1), self.prefix_ids.shape[1]
        branch = []
        low_precision = backbone.dtype != torch.float32 or torch.is_autocast_enabled(embeds.device.type)
        chunks = branch_chunks(self.branch_ids.shape[1], bf16_gradients=low_precision and torch.is_grad_enabled())
        for start, end in chunks:  # each chunk attends to the cache and itself
            branch.append(backbone(inputs_embeds=branch_embeds[:, start:end],
                                   attention_mask=self.branch_mask[:, :width + end],
                                   position_ids=self.branch_positions[:, start:end], use_cache=True,
                                   **{past: cache}).last_hidden_state)
        return torch.cat([prefix.flatten(0, 1), torch.cat(branch, 1).flatten(0, 1)])

    gather = SharedPrefixLayout.gather


BRANCH_CHUNK = 128  # branch tokens per forward, at least (fitted on CPU: see branch_chunks)


def branch_chunks(width: int, bf16_gradients: bool = False) -> list[tuple[int, int]]:
    """(start, end) of the query chunks the branches run in: ``width // BRANCH_CHUNK`` chunks (at least one), each
    attending to the prefix's cache and the chunks before it. SDPA computes every (query, key) pair of a call under
    a mask, so one call over b branch tokens after a p-token prefix computes b (p + b) pairs; n chunks compute
    b p + b^2 (n + 1) / (2 n): fewer, at the price of one more model call and a longer cache copy per chunk.
    Measured (forward + backward, 1 thread): 512-token branches of a 512-token prefix at the Qwen2 4 x 64 shape
    0.403 s in one call, 0.380 in 2 and 0.358 in 4; G = 8 branches of 256 tokens (GPT-2 4 x 256) 2.82 / 2.58 / 2.82,
    (Qwen2) 0.497 / 0.461 / 0.465; 32 tokens 0.423 / 0.459 / 0.487. Exact: each query sees the same keys. One
    chunk when a gradient flows into low-precision keys and values (``bf16_gradients``): a chunk's cache is read by
    every later chunk, and autograd would add those gradients up in bf16, one rounding per chunk."""
    count = 1 if bf16_gradients else max(1, width // BRANCH_CHUNK)
    bounds = [round(width * k / count) for k in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


class _Rows(torch.autograd.Function):
    """``x[index]`` over the batch dimension, whose backward sums the rows' gradients in fp32 and rounds once: the
    gradient of a prefix's bf16 keys and values, read by K branches, is then rounded as the padded rows' matmuls
    round it (autograd's own backward would add them up in bf16, one rounding per branch)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        total = grad.new_zeros(ctx.shape, dtype=torch.float32).index_add_(0, index, grad.float())
        return total.to(ctx.dtype), None


def select_rows(cache, index: Tensor) -> None:
    """Replace each layer's keys and values of ``cache`` by their rows ``index`` (rows repeat: one per branch)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys, layer.values = _Rows.apply(layer.keys, index), _Rows.apply(layer.values, index)


def new_cache(backbone: nn.Module):
    """An empty dynamic KV cache for ``backbone`` (its layer types from the config where transformers reads them)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=backbone.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def cache_prefixes(input_ids: Tensor, attention_mask: Tensor,
                   groups: Sequence[Sequence[int]]) -> CachedPrefixLayout:
    """Lay out right-padded rows ``input_ids`` [N, T] as each group's common prefix (run once, with a KV cache) and
    the branches that continue it. ``groups`` as for ``share_prefixes``; a group whose rows differ at their first
    token runs each row as its own prefix. Built with numpy on the host and moved to ``input_ids.device``."""
    ids, lengths = right_padded(input_ids, attention_mask)
    n, t = ids.shape
    groups, prefixes = split_prefixes(ids, lengths, groups)
    width = max(prefixes)
    prefix_ids = np.zeros((len(groups), width), dtype=ids.dtype)
    prefix_mask = np.zeros((len(groups), width), dtype=np.int64)
    source = np.zeros((n, t), dtype=np.int64)
    branches = []  # (original row, group) of each branch row
    for g, (rows, prefix) in enumerate(zip(groups, prefixes)):
        prefix_ids[g, width - prefix:] = ids[rows[0], :prefix]
        prefix_mask[g, width - prefix:] = 1
        source[rows, :prefix] = g * width + width - prefix + np.arange(prefix)
        branches += [(r, g) for r in rows if lengths[r] > prefix]
    prefix_positions = np.maximum(prefix_mask.cumsum(1) - 1, 0)

    spans = [int(lengths[r]) - prefixes[g] for r, g in branches]
    span = max(spans, default=0)
    branch_ids = np.zeros((len(branches), span), dtype=ids.dtype)
    branch_mask = np.zeros((len(branches), width + span), dtype=np.int64)
    branch_positions = np.zeros((len(branches), span), dtype=np.int64)
    for m, ((r, g), length) in enumerate(zip(branches, spans)):
        prefix = prefixes[g]
        branch_ids[m, :length] = ids[r, prefix:lengths[r]]
        branch_mask[m, :width] = prefix_mask[g]
        branch_mask[m, width:width + length] = 1
        branch_positions[m] = prefix + np.minimum(np.arange(span), length - 1)  # padding: the row's last position
        source[r, prefix:lengths[r]] = len(groups) * width + m * span + np.arange(length)
    prefix_of = np.array([g for _, g in branches], dtype=np.int64)

    device = input_ids.device
    return CachedPrefixLayout(*(torch.from_numpy(a).to(device) for a in (
        prefix_ids, prefix_mask, prefix_positions, branch_ids, branch_mask, branch_positions, prefix_of, source,
        lengths)))
