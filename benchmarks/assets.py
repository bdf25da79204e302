"""What the side-by-side benchmarks train on: the HH-RLHF file and a model of a chosen shape built from its text.

The tokenizer is always the byte-level BPE of 4,096 entries ``prefopt.tiny`` trains on the HH text. The model is
built from a ``Shape``: GPT-2 (the default: 4 layers, width 256, 4,096-entry vocabulary: ``prefopt.tiny``'s "tiny",
4.3M parameters) or Qwen2 (RMSNorm, rotary positions, grouped-query attention, tied embeddings, as Qwen2.5), with
any number of layers, width and vocabulary size. A vocabulary larger than the tokenizer's (151,936 for a
Qwen2.5-like shape) adds output rows no text ever uses as a target, but every softmax runs over all of them, as it
does in the real model: the LM head's cost and the [tokens, vocab] logits are those of the real vocabulary. Sampled
ids beyond the tokenizer decode to nothing (both libraries decode alike). Each shape is built once into its own
folder of the benchmark's work folder, with a copy holding a seeded one-label score head for reward modelling.
``lengthened`` makes a long pair of an HH row (the file's own pairs are short), for rows at 1,024 tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
TOKENIZER_VOCAB = 4096


@dataclass(frozen=True)
class Shape:
    """A model shape; ``vocab`` may exceed the tokenizer's 4,096 entries."""

    arch: str = "gpt2"
    layers: int = 4
    width: int = 256
    heads: int = 4
    vocab: int = TOKENIZER_VOCAB
    positions: int = 512

    @property
    def key(self) -> str:
        return f"{self.arch}-l{self.layers}-w{self.width}-h{self.heads}-v{self.vocab}-p{self.positions}"

    @property
    def default(self) -> bool:
        return self == Shape()


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--arch, --layers, --width, --heads, --vocab: the model shape (positions follow the lengths)."""
    parser.add_argument("--arch", default="gpt2", choices=["gpt2", "qwen2"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=TOKENIZER_VOCAB, help="model vocabulary (>= 4096)")


def shape_flags(args: argparse.Namespace) -> list[str]:
    return ["--arch", args.arch, "--layers", str(args.layers), "--width", str(args.width), "--heads",
            str(args.heads), "--vocab", str(args.vocab)]


def shape_of(args: argparse.Namespace, longest: int) -> Shape:
    """The shape the options ask for, with room for ``longest`` positions (512 at least, as prefopt.tiny)."""
    return Shape(args.arch, args.layers, args.width, args.heads, args.vocab, max(512, longest))


def build_assets(work: Path, shape: Shape = Shape()) -> dict[str, Path]:
    """The causal LM of ``shape`` and the same weights with a seeded one-label score head (reward model)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefopt.tiny import init_model

    folder = work if shape.default else work / shape.key
    lm_dir, rm_dir = folder / "model", folder / "rm"
    if not (lm_dir / "config.json").is_file():
        if shape.default:
            init_model(lm_dir, [str(HH)], arch="gpt2", size="tiny", vocab_size=TOKENIZER_VOCAB, seed=0)
        else:
            build_shaped(lm_dir, shape)
    if not (rm_dir / "config.json").is_file():
        torch.manual_seed(0)
        rm = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        rm.config.pad_token_id = tokenizer.pad_token_id
        rm.save_pretrained(rm_dir, safe_serialization=True)
        tokenizer.save_pretrained(rm_dir)
    return {"lm": lm_dir, "rm": rm_dir}


def build_shaped(out_dir: Path, shape: Shape) -> None:
    """A randomly initialised model of ``shape`` (seed 0, no dropout, tied embeddings) and the HH tokenizer."""
    import torch
    import transformers
    from transformers import GPT2Config, Qwen2Config

    from prefopt.tiny import _llama_mlp_width, corpus_texts, train_tokenizer

    tokenizer = train_tokenizer(list(corpus_texts([str(HH)])), TOKENIZER_VOCAB)  # as prefopt.tiny.init_model
    tokenizer.model_max_length = shape.positions
    if shape.vocab < len(tokenizer):
        raise ValueError(f"--vocab {shape.vocab} is smaller than the tokenizer's {len(tokenizer)} entries")
    ids = dict(vocab_size=shape.vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if shape.arch == "gpt2":
        config = GPT2Config(n_layer=shape.layers, n_embd=shape.width, n_head=shape.heads, n_positions=shape.positions,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    else:  # Qwen2.5's layout: 2 query heads per key-value head, SwiGLU MLP, RMSNorm, rotary positions
        config = Qwen2Config(num_hidden_layers=shape.layers, hidden_size=shape.width, num_attention_heads=shape.heads,
                             num_key_value_heads=max(1, shape.heads // 2), intermediate_size=_llama_mlp_width(shape.width),
                             max_position_embeddings=shape.positions, **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def lengthened(rows: list[dict[str, Any]], i: int, args: argparse.Namespace) -> dict[str, Any]:
    """Pair ``i`` as long as ``--max-prompt-length`` / ``--max-length`` allow (``--long-pairs``): its prompt after
    the conversations before it (a long multi-turn history, cut from the left by the tokenization), each response
    followed by the same side's responses of the rows after it (cut from the right), so that prompt + response
    fill ``--max-length`` tokens, as a 1,024-token pair of a long-context preference set would (TRL's historical
    defaults: 512 prompt tokens, 1,024 in all). The HH file's own pairs are short (median 142 tokens)."""
    room = 6 * args.max_prompt_length, 6 * (args.max_length - args.max_prompt_length)  # characters, >= the tokens
    history, j = [rows[i]["prompt"]], i
    while sum(map(len, history)) < room[0]:
        j = (j - 1) % len(rows)
        history.insert(0, rows[j]["prompt"] + rows[j]["chosen"])
    out = {**rows[i], "prompt": "".join(history)}
    for side in ("chosen", "rejected"):
        text, j = [rows[i][side]], i
        while sum(map(len, text)) < room[1]:
            j = (j + 1) % len(rows)
            text.append(rows[j][side])
        out[side] = "".join(text)
    return out
