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

Modules: ``groups`` (the rows that share a prefix, which models can take a layout), ``packed``, ``cached`` (the two
layouts), ``choice`` (the cost model and ``choose_layout``).
"""

from prefopt.prefix.cached import CachedPrefixLayout, branch_chunks, cache_prefixes
from prefopt.prefix.choice import choose_layout, layout_costs
from prefopt.prefix.groups import can_cache, common_prefix_length, pair_groups, rank_groups, supports
from prefopt.prefix.packed import SharedPrefixLayout, share_prefixes

__all__ = ["CachedPrefixLayout", "SharedPrefixLayout", "branch_chunks", "cache_prefixes", "can_cache",
           "choose_layout", "common_prefix_length", "layout_costs", "pair_groups", "rank_groups", "share_prefixes",
           "supports"]
