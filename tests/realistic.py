"""Realistic model folders for tests: built locally from configs and the tiny BPE tokenizer, no hub.

The kind fixtures of ``conftest.py`` (``tiny_model_dir``, ``tiny_llama_dir``) have no dropout, a pad token
separate from EOS, no chat template and fp32 weights. Researchers' models are not like that. These are:

* ``gpt2-real``: GPT-2 with its default dropouts (0.1 everywhere), tied head, and pad = eos, as GPT-2 ships
  (``<|endoftext|>`` is bos, eos, unk and pad; ``config.pad_token_id`` is unset, as in ``gpt2`` on the hub).
* ``llama-chat``: Llama, untied head, weights saved in bf16, a Llama-3-style chat template whose turns end with
  ``<|eot_id|>``; the generation config lists two EOS ids (``<|endoftext|>`` and ``<|eot_id|>``), as Llama 3 does.
* ``qwen2-window``: Qwen2 with ``use_sliding_window`` and a 16-token window on every layer (shorter than the test
  sequences), a ChatML template (``<|im_start|>`` / ``<|im_end|>``), eos ``<|im_end|>`` and pad ``<|endoftext|>``
  as Qwen2-Instruct ships.

All are "nano" sized (2 layers, width 64): every test runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

from prefopt.tiny import EOS_TOKEN, SIZES, _llama_mlp_width, corpus_texts, train_tokenizer

REALISTIC = ("gpt2-real", "llama-chat", "qwen2-window")
SLIDING_WINDOW = 16

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(texts: Iterable[str], vocab_size: int, extra_special: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = train_tokenizer(texts, vocab_size)
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": extra_special})
    return tokenizer


def build(name: str, out_dir: str | Path, corpus: list[str], vocab_size: int = 512, max_texts: int = 800,
          seed: int = 0) -> Path:
    """Build the realistic fixture ``name`` (one of ``REALISTIC``) into ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    texts = list(islice(corpus_texts(corpus), max_texts))
    shape = SIZES["nano"]
    torch.manual_seed(seed)
    generation = None
    if name == "gpt2-real":
        tokenizer = _tokenizer(texts, vocab_size, [])
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; everyone pads with eos
        config = GPT2Config(vocab_size=len(tokenizer), n_layer=shape.layers, n_embd=shape.dim, n_head=shape.heads,
                            n_positions=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1  # GPT-2's defaults
        dtype = torch.float32
    elif name == "llama-chat":
        specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tokenizer = _tokenizer(texts, vocab_size, specials)
        tokenizer.chat_template = LLAMA3_TEMPLATE
        eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=shape.layers, hidden_size=shape.dim,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                             intermediate_size=_llama_mlp_width(shape.dim), max_position_embeddings=512,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, eot],
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, eot],
                                      pad_token_id=tokenizer.pad_token_id)
        dtype = torch.bfloat16
    elif name == "qwen2-window":
        tokenizer = _tokenizer(texts, vocab_size, ["<|im_start|>", "<|im_end|>"])
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.pad_token = EOS_TOKEN
        tokenizer.bos_token = None
        config = Qwen2Config(vocab_size=len(tokenizer), num_hidden_layers=shape.layers, hidden_size=shape.dim,
                             num_attention_heads=shape.heads, num_key_value_heads=1,
                             intermediate_size=_llama_mlp_width(shape.dim), max_position_embeddings=512,
                             use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=0,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             tie_word_embeddings=True)
        dtype = torch.float32
    else:
        raise ValueError(f"unknown realistic fixture {name!r}; one of {REALISTIC}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(dtype)
    if generation is not None:
        model.generation_config = generation
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "prefopt_fixture.json").write_text(json.dumps({"fixture": name, "n_params": model.num_parameters(),
                                                              "dtype": str(dtype)}, indent=2) + "\n")
    return out_dir
