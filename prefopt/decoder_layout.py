"""Where a decoder's parts are (its layout: GPT-2 or Llama-like) and the attention mask each of its layers gets.

Used to run a model's blocks outside its own forward (``prefopt.sparrow``: a frozen trunk and trained tops), with
the masks built by transformers' masking utils as the model's forward builds them: full causal, or sliding window
for the layers ``config.layer_types`` marks so (Mistral, Qwen2 with ``use_sliding_window``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from prefopt.errors import PrefoptError


@dataclass(frozen=True)
class Layout:
    """Attribute names of an architecture's parts on its decoder (``lm.base_model``)."""

    embed: str
    blocks: str
    norm: str
    attention_norm: str  # a block's norm before its self-attention
    attention: str  # a block's self-attention module (called with the block's arguments)
    positions: str | None = None  # learned absolute position embeddings (GPT-2)
    rotary: str | None = None  # rotary position embedding module (Llama)


GPT2 = Layout(embed="wte", blocks="h", norm="ln_f", attention_norm="ln_1", attention="attn", positions="wpe")
LLAMA = Layout(embed="embed_tokens", blocks="layers", norm="norm", attention_norm="input_layernorm",
               attention="self_attn", rotary="rotary_emb")
LAYOUTS = (GPT2, LLAMA)


def layout_of(decoder: nn.Module) -> Layout:
    """The layout of a decoder, recognised by its attributes."""
    for layout in LAYOUTS:
        names = [layout.embed, layout.blocks, layout.norm, layout.positions, layout.rotary]
        if all(hasattr(decoder, name) for name in names if name):
            return layout
    raise PrefoptError(f"cannot split {type(decoder).__name__} into trunk and top: supported layouts are GPT-2 "
                       "(wte/wpe/h/ln_f) and Llama-like (embed_tokens/layers/norm/rotary_emb)")


def layer_types(config: Any) -> list[str]:
    """The attention type of each block ("full_attention" or "sliding_attention"), as the model's forward reads it."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * config.num_hidden_layers


MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def layer_mask(config: Any, kind: str, hidden: Tensor, attention_mask: Tensor, positions: Tensor,
               materialise: bool = False) -> Any:
    """The mask of layer type ``kind`` as the model's forward builds it; ``materialise``: [B, 1, T, T] even where
    transformers would leave causality to the kernel (SDPA on a batch without padding: None)."""
    return MASKS[kind](config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                       position_ids=positions, allow_is_causal_skip=not materialise)
