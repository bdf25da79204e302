"""Prefix sharing: rows that start with the same tokens run that prefix through the model once.

A preference pair is two rows, prompt + chosen and prompt + rejected, a K-wise ranking is K rows with one prompt,
and an online rollout is G samples of one prompt. In a causal LM the hidden states of a common prefix do not depend
on what follows it, so each group of rows needs its prefix computed once. Two layouts do it, with every hidden state
the one the unshared row would give (so the log-probs, rewards, losses and gradients are the same):

* **cached** (``CachedPrefixLayout``, ``cache_prefixes``): one forward over the group prefixes, left-padded so every
  prefix ends at the same column, with a KV cache; the cache rows selected once per branch (an index over the batch
  dimension: differentiable, so the branches' gradients flow back into the prefix's forward); one forward over the
  branches, right-padded, with the cache as their past, a 2D mask [prefix mask; branch mask] and positions
  continuing from each prefix's length. Attention covers K b (p + b) pairs for K branches of b tokens after a
  p-token prefix: less than the padded rows' K (p + b)^2.
* **packed** (``SharedPrefixLayout``, ``share_prefixes``): each group as ONE segment ``[prefix, branch_1, ...]`` in
  which a branch token attends to the prefix and its own branch only (a 4D mask, positions restarting at the prefix
  length; Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing", arXiv 2410.20305),
  segments packed first-fit into rows as wide as the longest. SDPA computes all W^2 pairs of a row of width W, so it
  loses to the padded rows when K long branches share a short prefix; it wins where the cached layout cannot run
  (gradient checkpointing drops the cache in transformers' checkpointed layers) and where packing short segments
  saves padding.

``choose_layout`` picks, by a cost model fitted on CPU (``layout_costs``), the cheapest of the padded rows (None),
the packed layout and the cached one. Both layouts keep, for every token of the original rows, the flat index of
its hidden state (``source``), so callers gather scored positions there and return results in the original layout:
``layout.hidden(backbone)`` runs a transformers base model (a causal LM's decoder, a reward model's backbone) and
``layout.gather(hidden, rows, cols)`` reads it.

Models: SDPA or eager attention, position ids in the forward, no sliding window (``supports(model)``); the
algorithms run the padded rows otherwise.
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
    branch_positions: Tensor  # [M, S] continuing from its prefix's length
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


def attention_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the adapted model


def supports(model: nn.Module) -> bool:
    """Whether ``model`` can run a layout: SDPA or eager attention (they take a 4D mask as it is), position ids in
    its forward, and no sliding window (the 4D mask replaces the one transformers would build)."""
    base = _base(model)
    return (attention_implementation(base) in SUPPORTED_ATTENTION
            and "position_ids" in inspect.signature(base.forward).parameters
            and getattr(base.config, "sliding_window", None) is None)


def can_cache(model: nn.Module) -> bool:
    """Whether the cached layout can run now: not while gradient checkpointing is on and a gradient is recorded
    (transformers' checkpointed layers drop the cache)."""
    return not (getattr(_base(model), "is_gradient_checkpointing", False) and torch.is_grad_enabled()
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


def _host(input_ids: Tensor, attention_mask: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The ids and real lengths of right-padded rows, on the host."""
    ids = input_ids.cpu().numpy()
    real = attention_mask.cpu().numpy().astype(bool)
    lengths = real.sum(1)
    if not (real == (np.arange(ids.shape[1]) < lengths[:, None])).all():
        raise ValueError("prefix sharing needs right-padded rows (attention_mask = ones, then zeros)")
    return ids, lengths


def _prefixes(ids: np.ndarray, lengths: np.ndarray,
              groups: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """The groups with a common prefix (a group whose rows differ at their first token: each row alone) and the
    length of each group's common prefix."""
    out = []
    for rows in groups:
        prefix = common_prefix_length(ids, rows, lengths)
        out.extend([(list(rows), prefix)] if prefix > 0 or len(rows) == 1 else [([r], int(lengths[r])) for r in rows])
    return [rows for rows, _ in out], [prefix for _, prefix in out]


def _segments(ids: np.ndarray, lengths: np.ndarray, groups: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """The common prefix length of each group and the size of its segment (the prefix once, then every branch)."""
    prefixes = [common_prefix_length(ids, rows, lengths) for rows in groups]
    return prefixes, [p + sum(int(lengths[r]) - p for r in rows) for p, rows in zip(prefixes, groups)]


# ------------------------------------------------------------------------------------------------- the choice
TOKEN_WEIGHT = 6  # a token slot's cost per unit of hidden size: 24 d^2 FLOPs a layer, in units of 4 d FLOPs
ATTENTION_WEIGHT = 0.5  # a (query, key) pair SDPA computes, in units of 4 d FLOPs, fitted on CPU (choose_layout)
COPY_WEIGHT = 64  # a prefix position's keys and values copied for one branch (forward and backward), fitted on CPU


def _cost(slots: int, pairs: int, hidden_size: int, copies: int = 0) -> float:
    return TOKEN_WEIGHT * hidden_size * slots + ATTENTION_WEIGHT * pairs + COPY_WEIGHT * copies


def layout_costs(input_ids: Tensor, attention_mask: Tensor, groups: Sequence[Sequence[int]],
                 hidden_size: int) -> dict[str, float]:
    """The modelled cost of one forward over these right-padded rows: "padded" (the rows as they are), "packed" and
    "cached" (the two layouts), in units of 4 x ``hidden_size`` FLOPs per layer (see ``choose_layout``)."""
    ids, lengths = _host(input_ids, attention_mask)
    rows, width = ids.shape
    _, sizes = _segments(ids, lengths, groups)
    packed_width = max(sizes)
    packed_rows = max(row for row, _ in _first_fit(sizes, packed_width)) + 1
    groups, prefixes = _prefixes(ids, lengths, groups)
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
    slots, p^2 + K b (p + b) pairs in one chunk (fewer in n, ``branch_chunks``) and K p n copies. So the packed layout loses when K long branches share a short prefix,
    the cached one when the branches are short (its copies) or by padding (prefixes padded to the longest, branches
    to the longest), and the padded rows win only when little is shared. ``ATTENTION_WEIGHT`` and ``COPY_WEIGHT``
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


# ------------------------------------------------------------------------------------------------- the builders
def share_prefixes(input_ids: Tensor, attention_mask: Tensor, groups: Sequence[Sequence[int]],
                   pack: bool = True) -> SharedPrefixLayout:
    """Lay out right-padded rows ``input_ids`` [N, T] with each group's common prefix computed once, packed.

    ``groups`` lists row indices that may share a prefix (every row in exactly one group). With ``pack`` the
    segments are packed first-fit (longest first) into rows as wide as the longest segment; else one per row.
    The layout is built with numpy on the host (a few small arrays per batch) and moved to ``input_ids.device``.
    """
    ids, lengths = _host(input_ids, attention_mask)
    n, t = ids.shape
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


def cache_prefixes(input_ids: Tensor, attention_mask: Tensor,
                   groups: Sequence[Sequence[int]]) -> CachedPrefixLayout:
    """Lay out right-padded rows ``input_ids`` [N, T] as each group's common prefix (run once, with a KV cache) and
    the branches that continue it. ``groups`` as for ``share_prefixes``; a group whose rows differ at their first
    token runs each row as its own prefix. Built with numpy on the host and moved to ``input_ids.device``."""
    ids, lengths = _host(input_ids, attention_mask)
    n, t = ids.shape
    groups, prefixes = _prefixes(ids, lengths, groups)
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
        branch_positions[m] = prefix + np.arange(span)
        source[r, prefix:lengths[r]] = len(groups) * width + m * span + np.arange(length)
    prefix_of = np.array([g for _, g in branches], dtype=np.int64)

    device = input_ids.device
    return CachedPrefixLayout(*(torch.from_numpy(a).to(device) for a in (
        prefix_ids, prefix_mask, prefix_positions, branch_ids, branch_mask, branch_positions, prefix_of, source,
        lengths)))


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
