"""What the side-by-side benchmarks train on: the HH-RLHF file and the tiny GPT-2 built from its text.

The model is the tiny GPT-2 of ``prefopt.tiny`` (4 layers, width 256, byte-level BPE 4096 trained on the HH text),
built into the benchmark's work folder on first use, with a copy holding a seeded one-label score head for reward
modelling. ``vs_trl.py`` and ``vs_trl_online.py`` both start from it.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def build_assets(work: Path) -> dict[str, Path]:
    """The tiny GPT-2 (causal LM) and the same weights with a seeded one-label score head (reward model)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefopt.tiny import init_model

    lm_dir, rm_dir = work / "model", work / "rm"
    if not (lm_dir / "config.json").is_file():
        init_model(lm_dir, [str(HH)], arch="gpt2", size="tiny", vocab_size=4096, seed=0)
    if not (rm_dir / "config.json").is_file():
        torch.manual_seed(0)
        rm = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        rm.config.pad_token_id = tokenizer.pad_token_id
        rm.save_pretrained(rm_dir, safe_serialization=True)
        tokenizer.save_pretrained(rm_dir)
    return {"lm": lm_dir, "rm": rm_dir}
