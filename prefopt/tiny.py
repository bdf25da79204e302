"""Tiny local starting models: a byte-level BPE tokenizer trained on the data and a small GPT-2 or Llama.

Nothing can be downloaded here, so tests and benchmarks start from a model built from the corpus itself:
``init_model`` trains the tokenizer, builds a randomly initialised model of a named size (GPT-2, Llama or Qwen2; with
a chat template and its special tokens on request) and saves both in
the ordinary transformers layout, so ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
``AutoTokenizer.from_pretrained(out_dir)`` load them like any hub checkpoint.

The tokenizer is byte-level BPE (GPT-2's scheme): every string round-trips exactly, ``decode(encode(x)) == x``.
``<|endoftext|>`` is bos, eos and unk; ``<|pad|>`` is a separate pad token. No special tokens are added by
``encode``; the data layer decides where eos goes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GenerationConfig, GPT2Config, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast,
                          Qwen2Config)

from prefopt.chat_templates import END_OF_TURN, SPECIAL_TOKENS, TEMPLATES
from prefopt.config import DataConfig
from prefopt.data.readers import SkipLog, is_hub_name, read_json_lines, read_rows
from prefopt.errors import DataError, PrefoptError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CONTEXT_LENGTH = 512


@dataclass(frozen=True)
class Size:
    """Shape of a tiny transformer; parameter counts below are for GPT-2 with a 4096-token vocabulary."""

    layers: int
    dim: int
    heads: int


SIZES: dict[str, Size] = {
    "nano": Size(layers=2, dim=64, heads=2),  # ~0.4M parameters
    "micro": Size(layers=4, dim=128, heads=4),  # ~1.3M
    "tiny": Size(layers=4, dim=256, heads=4),  # ~4.3M, the benchmark size
    "small": Size(layers=6, dim=512, heads=8),  # ~21M
    "base": Size(layers=12, dim=768, heads=12),  # ~91M with an 8192-token vocabulary (GPU checks: tests/gpu)
}


def corpus_texts(paths: list[str]) -> Iterator[str]:
    """Documents from HH files or directories, MedicalGPT ``conversations`` jsonl, plain ``.txt`` files, and anything
    else ``data.path`` may name (a parquet, csv, JSON or arrow file, a saved or hub dataset: prefopt.data.readers).

    HH rows give both the chosen and the rejected dialogue; a conversation gives its turns joined by newlines
    (and, for a preference row, that prompt followed by each of chosen and rejected); ``.txt`` gives one
    document per non-empty line. An HH directory is read as ``<dir>/<subset>/<split>.jsonl.gz``. Any other row gives
    each of its string fields (ids aside) and each of its chat message lists, the contents joined by newlines.
    """
    for path in map(Path, paths):
        files = sorted(path.glob("*/*.jsonl.gz")) if path.is_dir() else []
        if files:
            yield from corpus_texts([str(f) for f in files])
        elif not path.exists() and not is_hub_name(str(path)):
            raise DataError(f"corpus file {str(path)!r} not found")
        elif path.suffix == ".txt":
            with path.open(encoding="utf-8") as lines:
                yield from (line.rstrip("\n") for line in lines if line.strip())
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl_texts(path)
        else:
            skips = SkipLog()
            for _, row in read_rows(DataConfig(path=str(path)), skips):
                yield from _row_texts(row)


def _jsonl_texts(path: Path) -> Iterator[str]:
    for number, row in read_json_lines(path):
        if "conversations" in row:
            prompt = "\n".join(turn["value"] for turn in row["conversations"])
            replies = [row[key] for key in ("chosen", "rejected") if key in row]
            yield from ([prompt + "\n" + reply for reply in replies] if replies else [prompt])
        elif isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
            yield row["chosen"]
            yield row["rejected"]
        elif isinstance(row, dict):
            yield from _row_texts(row)
        else:
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")


def _row_texts(row: dict[str, Any]) -> Iterator[str]:
    """Each string field of a row (not ``*id``) and each chat message list (``{role, content}`` or ``{from, value}``
    items; one such item alone too), its contents joined by newlines."""
    for key, value in row.items():
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, str) and value.strip() and not str(key).lower().endswith("id"):
            yield value
        elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            contents = [m.get("content", m.get("value")) for m in value]
            text = "\n".join(c for c in contents if isinstance(c, str))
            if text.strip():
                yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``vocab_size`` entries (256 bytes + 2 special tokens + merges)."""
    if vocab_size < 259:
        raise PrefoptError(f"vocab_size={vocab_size}: byte-level BPE needs at least 259 (256 bytes + 2 specials + 1)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=CONTEXT_LENGTH,
                                   padding_side="right", clean_up_tokenization_spaces=False)


def build_model(arch: Literal["gpt2", "llama", "qwen2"], size: str, tokenizer: PreTrainedTokenizerFast,
                seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM of a named size whose vocabulary and special ids match ``tokenizer``.

    Dropout is off (as in Llama): policy and reference log-probs must not differ by dropout noise. ``qwen2`` is
    Qwen2's architecture (grouped-query attention with one key/value head per two query heads, no sliding window).
    """
    if size not in SIZES:
        raise PrefoptError(f"unknown model size {size!r}; sizes: {', '.join(SIZES)}")
    shape = SIZES[size]
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if arch == "gpt2":
        config = GPT2Config(n_layer=shape.layers, n_embd=shape.dim, n_head=shape.heads, n_positions=CONTEXT_LENGTH,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    elif arch == "llama":
        config = LlamaConfig(num_hidden_layers=shape.layers, hidden_size=shape.dim, num_attention_heads=shape.heads,
                             num_key_value_heads=shape.heads, intermediate_size=_llama_mlp_width(shape.dim),
                             max_position_embeddings=CONTEXT_LENGTH, **ids)
    elif arch == "qwen2":
        config = Qwen2Config(num_hidden_layers=shape.layers, hidden_size=shape.dim, num_attention_heads=shape.heads,
                             num_key_value_heads=max(shape.heads // 2, 1), intermediate_size=_llama_mlp_width(shape.dim),
                             max_position_embeddings=CONTEXT_LENGTH, use_sliding_window=False, **ids)
    else:
        raise PrefoptError(f"unknown architecture {arch!r}; architectures: gpt2, llama, qwen2")
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _llama_mlp_width(dim: int) -> int:
    """Llama's SwiGLU width: 8/3 of the model width rounded up to a multiple of 32."""
    return -(-8 * dim // 3 // 32) * 32


def add_chat_template(tokenizer: PreTrainedTokenizerFast, name: str) -> None:
    """Give ``tokenizer`` the built-in chat template ``name`` (prefopt.chat_templates) and its markers as special tokens.

    ChatML ends the assistant turn (and so generation) with ``<|im_end|>``: it becomes the EOS token, as in
    Qwen2-Instruct. Llama 3 keeps ``<|endoftext|>`` as EOS and stops at ``<|eot_id|>`` too (the generation config
    lists both, as Llama-3-Instruct's does)."""
    if name not in TEMPLATES:
        raise PrefoptError(f"unknown chat template {name!r}; built in: {', '.join(TEMPLATES)}")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[name]})
    tokenizer.chat_template = TEMPLATES[name]
    if name == "chatml":
        tokenizer.eos_token = END_OF_TURN[name]


def init_model(out_dir: str | Path, corpus: list[str], arch: Literal["gpt2", "llama", "qwen2"] = "gpt2",
               size: str = "tiny", vocab_size: int = 4096, seed: int = 0, max_texts: int | None = None,
               chat_template: str | None = None) -> Path:
    """Train a tokenizer on ``corpus`` (at most ``max_texts`` documents), build a model, save both to ``out_dir``.

    ``chat_template`` (chatml, llama3) adds that template and its special tokens (``add_chat_template``); the
    model's generation config then stops at the end of an assistant turn. Also writes ``prefopt_init.json``
    recording how the model was made. Same inputs and seed -> same files.
    """
    out_dir = Path(out_dir)
    texts = list(islice(corpus_texts(corpus), max_texts))
    if not texts:
        raise DataError(f"no texts in corpus {corpus}")
    tokenizer = train_tokenizer(texts, vocab_size)
    if chat_template is not None:
        add_chat_template(tokenizer, chat_template)
    model = build_model(arch, size, tokenizer, seed)
    if chat_template is not None:
        stops = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN[chat_template])})
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stops,
                                                   pad_token_id=tokenizer.pad_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    record = {
        "arch": arch, "size": size, "vocab_size": len(tokenizer), "requested_vocab_size": vocab_size,
        "chat_template": chat_template,
        "corpus": [str(Path(p).resolve()) for p in corpus], "n_texts": len(texts), "max_texts": max_texts,
        "n_params": model.num_parameters(), "seed": seed, "context_length": CONTEXT_LENGTH,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    (out_dir / "prefopt_init.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir
