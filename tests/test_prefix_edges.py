"""Prefix sharing at the edges of a model's range (found in review, each failing before its fix):

* the cached layout's padding slots must not carry position ids past the original rows': at G = 8 with one group's
  branches shorter than another's, they ran to prefix + the longest branch of the batch, past a learned position
  table (GPT-2: ``IndexError``) and past dynamic RoPE's trigger (Llama: every position rescaled, log-probs 1.6e-5
  off);
* a sliding window declared in a multimodal model's ``text_config`` (Gemma 3) must keep the layouts off: the packed
  layout's 4D mask replaced the window (log-probs 0.09 off).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma3Config, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from prefopt.prefix import cache_prefixes, supports
from prefopt.scoring import token_logps


def gpt2_with_128_positions():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                      attn_implementation="sdpa")).eval()


def llama_with_dynamic_rope():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                                        attn_implementation="sdpa")).eval()


def right_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids, mask = torch.zeros(len(seqs), width, dtype=torch.long), torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


@pytest.mark.parametrize("build", [gpt2_with_128_positions, llama_with_dynamic_rope])
def test_cached_branches_keep_positions_inside_their_rows(build):
    """Two G = 8 groups filling the model's 128 positions (as generation allows: prompt + max_new_tokens): group A's
    samples share a 20-token opening, so its branches are 20 tokens shorter than group B's."""
    model, rng = build(), random.Random(0)
    tokens = lambda n: [rng.randrange(1, 100) for _ in range(n)]  # noqa: E731
    prompt_a, prompt_b, opening = tokens(40), tokens(40), tokens(20)
    ids, mask = right_padded([prompt_a + opening + tokens(68) for _ in range(8)] +
                             [prompt_b + tokens(88) for _ in range(8)])
    scored = mask.clone()
    scored[:, :40] = 0
    layout = cache_prefixes(ids, mask, [list(range(8)), list(range(8, 16))])
    assert int(layout.branch_positions.max()) <= ids.shape[1] - 1
    with torch.no_grad():
        padded, _ = token_logps(model, ids, mask, scored)
        cached, _ = token_logps(model, ids, mask, scored, layout=layout)
    torch.testing.assert_close(cached, padded, atol=1e-6, rtol=1e-6)


def test_a_sliding_window_in_the_text_config_turns_the_layouts_off():
    config = Gemma3Config(text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                           layer_types=["sliding_attention", "full_attention"]),
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14),
                          mm_tokens_per_image=4, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config)
    assert getattr(model.config, "sliding_window", None) is None  # the window is only in text_config
    assert not supports(model)
