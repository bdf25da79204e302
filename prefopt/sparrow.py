"""Sparrow's shared frozen trunk (Glaese et al. 2022, "Improving alignment of dialogue agents via targeted
human judgements", arXiv 2209.14375).

Sparrow trains only the top layers of its 70B policy and freezes the rest; the frozen bottom layers are SHARED by
the policy, the frozen reference policy, the value function and the reward models, and computed once per batch.
Here a decoder of L blocks is cut at L - N (``trainable_layers`` = N):

    h = trunk(x)              embeddings + blocks[0 : L-N]        frozen, run ONCE per batch under no_grad
    pi(. | x_<t)   = softmax(W_pi norm_pi(top_pi(h))_{t-1})       top_pi = blocks[L-N : L]: trained
    pi_0(. | x_<t) = softmax(W_0 norm_0(top_0(h))_{t-1})          top_0: frozen deep copy of the initial top
    V(x_<t)        = v(h_{t-1})                                   MLP on trunk features, or a top copy + scalar
    r(x)           = w . norm_r(top_r(h))_last                    reward heads: preference model, rule heads

Choices. The policy IS the loaded transformers model (its bottom blocks are the trunk, its top blocks the trained
top), so ``prefopt.rl.engine.generate`` and ``save_pretrained`` use it unchanged. A tied LM head is untied: the policy
trains its own copy of the output embedding (``train_lm_head``), while the reference reads the frozen input
embedding the trunk already holds (no extra copy). Position ids follow the attention mask (cumsum - 1, as
transformers' ``generate`` makes them), so left-padded prompts score the same as in generation, and trunk outputs
recorded while generating become features without a trunk pass (``Trunk.as_features``). A top's last block computes
only the columns read from it (the response for log-probs and values, the last tokens for the reward heads); the
columns before enter it as keys and values only (``block_from``).

Supported layouts: GPT-2 (``transformer.wte/wpe/h/ln_f``) and Llama-like decoders
(``model.embed_tokens/layers/norm/rotary_emb``: Llama, Mistral, Qwen2, ...). Each block gets the mask of its
layer type (``config.layer_types``: full causal or sliding window), built by transformers' masking utils as the
model's own forward builds it (``prefopt.decoder_layout``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from prefopt.decoder_layout import LAYOUTS, layer_mask, layer_types, layout_of
from prefopt.errors import PrefoptError
from prefopt.models import disable_dropout
from prefopt.scoring import logps_from_hidden, position_ids


def num_blocks(lm: nn.Module) -> int:
    decoder = lm.base_model
    return len(getattr(decoder, layout_of(decoder).blocks))


@dataclass
class TrunkOutput:
    """Trunk features of one batch, shared by every top (tensors carry no grad)."""

    hidden: Tensor  # [B, T, H] output of the last trunk block
    attention_mask: Tensor  # [B, T] 1 on real tokens
    masks: dict[str, Any]  # the attention mask of each layer type ("full_attention", "sliding_attention")
    block_kwargs: dict[str, Any]  # what else every block takes besides hidden states: position ids, rotary

    def select(self, rows: Tensor) -> TrunkOutput:
        """The features of the batch rows ``rows`` (a micro-batch), without running the trunk again."""
        batch = self.hidden.shape[0]

        def pick(value: Any) -> Any:
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value[rows]
            if isinstance(value, (tuple, list)):
                return type(value)(pick(v) for v in value)
            if isinstance(value, dict):
                return {k: pick(v) for k, v in value.items()}
            return value

        return TrunkOutput(self.hidden[rows], self.attention_mask[rows], pick(self.masks), pick(self.block_kwargs))


def run_blocks(blocks: Iterable[nn.Module], types: list[str], hidden: Tensor, features: TrunkOutput,
               start: int = 0) -> Tensor:
    """Hidden states through ``blocks``, each with the mask of its layer type; with ``start`` > 0 the last block
    computes only the columns start.. (``block_from``), and the result is [B, T - start, H]."""
    blocks = list(blocks)
    for i, (block, kind) in enumerate(zip(blocks, types, strict=True)):
        if start and i == len(blocks) - 1:
            return block_from(block, kind, hidden, features, start)
        hidden = block(hidden, attention_mask=features.masks[kind], **features.block_kwargs)
    return hidden


def block_from(block: nn.Module, kind: str, hidden: Tensor, features: TrunkOutput, start: int) -> Tensor:
    """The output of ``block`` [B, T - start, H] at the columns start.. only, equal to its full output there.

    The columns before ``start`` enter those outputs only as keys and values: the block's own self-attention
    (after its norm) runs on them first and leaves them in a cache, and the block then runs on the columns start..
    with that cache. Their MLP and the rest of the block are not computed. Where transformers left the mask to the
    kernel (no padding) it is materialised here; where none can be (flash or flex attention) the whole block runs.
    """
    mask = features.masks[kind]
    layout = next((layout for layout in LAYOUTS if hasattr(block, layout.attention)), None)
    if layout is not None and not (isinstance(mask, Tensor) and mask.dim() == 4):
        mask = layer_mask(getattr(block, layout.attention).config, kind, hidden, features.attention_mask,
                          features.block_kwargs["position_ids"], materialise=True)
    if layout is None or not (isinstance(mask, Tensor) and mask.dim() == 4):
        return block(hidden, attention_mask=mask, **features.block_kwargs)[:, start:]
    width = hidden.shape[1]

    def columns(value: Any, part: slice) -> Any:
        if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[1] == width:
            return value[:, part]
        if isinstance(value, (tuple, list)):
            return type(value)(columns(v, part) for v in value)
        return value

    before, after = slice(0, start), slice(start, None)
    cache = DynamicCache()  # plain layers: a sliding window is in the mask
    kwargs = {name: columns(value, before) for name, value in features.block_kwargs.items()}
    getattr(block, layout.attention)(getattr(block, layout.attention_norm)(hidden[:, before]),
                                     attention_mask=mask[:, :, before, before], cache=cache, **kwargs)
    kwargs = {name: columns(value, after) for name, value in features.block_kwargs.items()}
    return block(hidden[:, after], attention_mask=mask[:, :, after], cache=cache, **kwargs)


class Trunk(nn.Module):
    """Embeddings + the first ``depth`` blocks of ``lm`` (the same module objects, frozen); forward under no_grad.

    It builds the masks the model's own forward would (transformers' masking utils: a causal mask, and a sliding
    window one for the layers ``config.layer_types`` marks so, as in Mistral or Qwen2 with ``use_sliding_window``).
    """

    def __init__(self, lm: nn.Module, depth: int):
        super().__init__()
        decoder = lm.base_model
        layout = layout_of(decoder)
        self.config = decoder.config
        self.embed = getattr(decoder, layout.embed)
        self.positions = getattr(decoder, layout.positions) if layout.positions else None
        self.rotary = getattr(decoder, layout.rotary) if layout.rotary else None
        self.dropout = getattr(decoder, "drop", None)
        self.blocks = nn.ModuleList(list(getattr(decoder, layout.blocks))[:depth])
        self.types = layer_types(self.config)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TrunkOutput:
        hidden = self.embed(input_ids)
        if self.positions is not None:
            hidden = hidden + self.positions(position_ids(attention_mask))
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        embedded = self.as_features(hidden, attention_mask)
        return dataclasses.replace(embedded, hidden=run_blocks(self.blocks, self.types[:len(self.blocks)], hidden,
                                                                embedded))

    @torch.no_grad()
    def as_features(self, hidden: Tensor, attention_mask: Tensor) -> TrunkOutput:
        """``hidden`` [B, T, H] in the layout of ``attention_mask`` with the masks and block arguments this forward
        builds for it (positions from the mask): trunk outputs computed elsewhere (during generation,
        ``prefopt.rl.engine.generate(capture=...)``) become features the tops read."""
        positions = position_ids(attention_mask)
        masks = {kind: layer_mask(self.config, kind, hidden, attention_mask, positions) for kind in set(self.types)}
        kwargs: dict[str, Any] = {"position_ids": positions, "use_cache": False}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, position_ids=positions)
        return TrunkOutput(hidden, attention_mask, masks, kwargs)


class Top(nn.Module):
    """Top transformer blocks (of attention types ``types``) + final norm on trunk features -> [B, T - start, H]:
    the outputs at the columns start.. (all: 0), the last block computing only those (``block_from``)."""

    def __init__(self, blocks: Iterable[nn.Module], norm: nn.Module, types: list[str]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.types = list(types)

    def forward(self, features: TrunkOutput, start: int = 0) -> Tensor:
        return self.norm(run_blocks(self.blocks, self.types, features.hidden, features, start))


class LMTop(nn.Module):
    """A top with an LM head: the policy's or the reference's per-token log-probs on trunk features."""

    def __init__(self, top: Top, head: nn.Module):
        super().__init__()
        self.top = top
        self.head = head

    def forward(self, features: TrunkOutput, input_ids: Tensor, score_mask: Tensor, temperature: float = 1.0,
                with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
        """Log-probs (and entropies) [B, T] of the scored tokens; the top runs from the column before the first
        scored one (a rollout: the last prompt column), so the prompt is only keys and values to it."""
        start = first_state(score_mask)
        hidden = self.top(features, start)
        logps, entropy = logps_from_hidden(hidden, self.head, input_ids[:, start:], score_mask[:, start:],
                                           temperature, with_entropy)
        return F.pad(logps, (start, 0)), None if entropy is None else F.pad(entropy, (start, 0))


def first_state(score_mask: Tensor) -> int:
    """The column of the state that predicts the first scored token of any row (0 when none is scored)."""
    scored = score_mask.bool().any(0).nonzero()
    return max(int(scored[0]) - 1, 0) if len(scored) else 0


def last_token(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state of the last attended token of each row [B, H] (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def linear_head(head: nn.Module, hidden: Tensor) -> Tensor:
    """``head`` (float32 parameters) on hidden states of the model's dtype (bf16 models too) -> float32."""
    dtype = next(head.parameters()).dtype
    return head(hidden.to(dtype)).float()


class SequenceHead(nn.Module):
    """A reward head: a copy of the top blocks + a linear map read at the last token -> [B, outputs].

    Sparrow's preference model (outputs=1) and rule model (outputs = number of rules) are heads of this kind on
    the shared trunk. The linear layer starts at zero, so a fresh head scores every sequence 0.
    """

    def __init__(self, top: Top, hidden_size: int, outputs: int = 1):
        super().__init__()
        self.top = top
        self.score = nn.Linear(hidden_size, outputs)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, features: TrunkOutput) -> Tensor:
        """The top runs from the earliest last token of the rows: what comes before is only keys and values."""
        positions = torch.arange(features.attention_mask.shape[1], device=features.attention_mask.device)
        start = int((features.attention_mask * positions).argmax(-1).min())
        return linear_head(self.score, last_token(self.top(features, start), features.attention_mask[:, start:]))


class PreferenceHead(SequenceHead):
    """Sparrow's preference reward model on the trunk: a scalar score r(x, y) per sequence [B]."""

    def __init__(self, top: Top, hidden_size: int):
        super().__init__(top, hidden_size, outputs=1)

    def forward(self, features: TrunkOutput) -> Tensor:
        return super().forward(features).squeeze(-1)


class ValueMLP(nn.Module):
    """V(s_t) from the trunk feature at each position: Linear -> GELU -> Linear (last layer zero-initialised)."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.GELU(),
                                 nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: TrunkOutput, start: int = 0) -> Tensor:
        return linear_head(self.net, features.hidden[:, start:]).squeeze(-1)  # [B, T - start]


class ValueTop(nn.Module):
    """V(s_t) from a copy of the top blocks + a scalar head at each position (zero-initialised)."""

    def __init__(self, top: Top, hidden_size: int):
        super().__init__()
        self.top = top
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: TrunkOutput, start: int = 0) -> Tensor:
        return linear_head(self.head, self.top(features, start)).squeeze(-1)  # [B, T - start]


class SparrowActorCritic(nn.Module):
    """The one trainable module (policy top + LM head + value head); its forward takes trunk features.

    ``forward(features, input_ids, score_mask)`` -> (log-probs, entropies, values), each [B, T] and aligned with
    ``input_ids``: entry t belongs to token t, predicted from the state x_<t (position t - 1), 0 where not scored.
    """

    def __init__(self, policy: LMTop, value: nn.Module):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, features: TrunkOutput, input_ids: Tensor, score_mask: Tensor,
                temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        logps, entropy = self.policy(features, input_ids, score_mask, temperature)
        start = first_state(score_mask)
        state_values = self.value(features, start)  # [B, T - start]: V of the state ending at each column start..
        values = torch.zeros_like(logps)
        values[:, start + 1:] = state_values[:, :-1]
        return logps, entropy, values * score_mask


@dataclass
class SharedTrunkModel:
    """A causal LM split for Sparrow-style training; ``lm`` (trunk + trained top) generates and is saved."""

    lm: nn.Module  # the transformers model: trunk blocks frozen, top blocks (+ LM head) trainable
    trunk: Trunk
    policy: LMTop  # shares its modules with ``lm``
    reference: LMTop  # frozen copy of the initial top; its head is the frozen embedding when ``lm`` was tied
    hidden_size: int

    def copy_top(self, trainable: bool = False) -> Top:
        """A fresh copy of the initial top blocks + norm (from the never-trained reference), for a value or
        reward head."""
        return copy.deepcopy(self.reference.top).requires_grad_(trainable)


def split_model(lm: nn.Module, trainable_layers: int, train_lm_head: bool = True) -> SharedTrunkModel:
    """Freeze the bottom L - N blocks of ``lm`` into a trunk; the top N blocks, final norm and LM head train.

    ``lm`` is modified in place: trainable flags, dropout off everywhere (policy, reference and heads must differ
    by their weights only, and the shared features must not depend on which top reads them), and a tied LM head
    is untied when ``train_lm_head``.
    """
    decoder = lm.base_model
    layout = layout_of(decoder)
    blocks = list(getattr(decoder, layout.blocks))
    if not 1 <= trainable_layers <= len(blocks):
        raise PrefoptError(f"algorithm.trainable_layers={trainable_layers}: the model has {len(blocks)} blocks; "
                           f"choose 1..{len(blocks)}")
    depth = len(blocks) - trainable_layers
    embed, head = getattr(decoder, layout.embed), lm.get_output_embeddings()
    tied = head.weight is embed.weight
    lm.requires_grad_(False)
    disable_dropout(lm)
    top_blocks, norm, top_types = blocks[depth:], getattr(decoder, layout.norm), layer_types(decoder.config)[depth:]
    reference_top = Top(copy.deepcopy(top_blocks), copy.deepcopy(norm), top_types)
    if not train_lm_head:  # policy and reference share the one frozen head
        reference_head = head
    elif tied:  # the policy trains its own output embedding; the reference reads the trunk's input embedding
        reference_head = _linear_on(embed.weight, head)
        head.weight = nn.Parameter(embed.weight.detach().clone())
        lm.config.tie_word_embeddings = False
        if hasattr(lm.config, "get_text_config"):
            lm.config.get_text_config().tie_word_embeddings = False
    else:
        reference_head = copy.deepcopy(head)
    policy = LMTop(Top(top_blocks, norm, top_types), head).requires_grad_(True)
    head.requires_grad_(train_lm_head)
    reference = LMTop(reference_top, reference_head).requires_grad_(False).eval()
    return SharedTrunkModel(lm=lm, trunk=Trunk(lm, depth).eval(), policy=policy, reference=reference,
                            hidden_size=embed.weight.shape[1])


def _linear_on(weight: nn.Parameter, like: nn.Module) -> nn.Linear:
    """A linear layer that uses ``weight`` (shared, not copied), with a copy of ``like``'s bias if any."""
    bias = getattr(like, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = weight
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone())
    return linear
