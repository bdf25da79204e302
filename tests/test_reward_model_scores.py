"""A reward model trained by prefopt gives the same score in prefopt and in plain transformers, for the same text.

The convention is transformers' (``AutoModelForSequenceClassification`` reads the rightmost token that is not
``config.pad_token_id``): with pad = eos (``gpt2-real``) a text ending with eos is read at the token before the eos,
in prefopt too (``prefopt.scoring.score_positions``). On ``llama-chat`` (pad != eos) the eos is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from prefopt.config import ModelConfig, build_run_config
from prefopt.data.collate import pad
from prefopt.models import load_reward_model
from prefopt.scoring import RewardScorer
from prefopt.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["\n\nHuman: how do I bake bread?\n\nAssistant: Mix flour, water and yeast.",
         "\n\nHuman: hi\n\nAssistant: Hello! How can I help?",
         "\n\nHuman: what is two plus two?\n\nAssistant: Four."]


@pytest.fixture(scope="module", params=["gpt2-real", "llama-chat"])
def trained(request, realistic_model_dirs, hh_path, tmp_path_factory):
    """(fixture name, a reward model trained two steps by the reward stage, the Trainer that trained it)."""
    out = tmp_path_factory.mktemp(f"rm-{request.param}")
    config = build_run_config({
        "algorithm": {"name": "reward"},
        "model": {"name_or_path": str(realistic_model_dirs[request.param])},
        "data": {"path": str(hh_path), "eval_fraction": 0.0, "max_examples": 8, "max_length": 160,
                 "max_prompt_length": 64},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "progress": False,
                  "mixed_precision": "no"},
    })
    trainer = Trainer(config)
    trainer.fit()
    return request.param, out / "model", trainer


def plain_scores(model_dir: Path, rows: list[list[int]]) -> torch.Tensor:
    """Each row alone (no padding) through plain transformers, as a user of the saved model scores it."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([row])).logits[0, 0] for row in rows])


def prefopt_scores(model_dir: Path, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """All rows in one right-padded batch through prefopt's loader and scorer."""
    scorer = RewardScorer(load_reward_model(str(model_dir), ModelConfig(name_or_path=str(model_dir))))
    ids = pad(rows, pad_id)
    mask = pad([[1] * len(row) for row in rows], 0)
    with torch.no_grad():
        return scorer(ids, mask)


def test_saved_reward_model_scores_the_same_in_plain_transformers(trained):
    name, model_dir, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == (name == "gpt2-real")
    text_rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    eos_rows = [row + [tokenizer.eos_token_id] for row in text_rows]  # as the reward stage tokenizes completions
    rows = text_rows + eos_rows
    plain = plain_scores(model_dir, rows)
    ours = prefopt_scores(model_dir, rows, tokenizer.pad_token_id)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)
    assert plain.std() > 1e-3  # the texts get different scores: the comparison is not between constants
    if name == "gpt2-real":  # pad = eos: a trailing eos is not read, by either side
        torch.testing.assert_close(plain[len(TEXTS):], plain[:len(TEXTS)], atol=1e-6, rtol=0)
    else:  # the eos is read
        assert (plain[len(TEXTS):] - plain[:len(TEXTS)]).abs().min() > 1e-4


def test_training_batches_are_scored_as_plain_transformers_scores_their_rows(trained):
    """The reward stage's own forward (prefix sharing, eos-terminated completions) equals the saved model's."""
    _, model_dir, trainer = trained
    batch = next(iter(trainer.loaders["train"]))
    algorithm = trainer.algorithm
    assert algorithm.layout(batch) is not None  # the prefix-shared path is the one under test
    with torch.no_grad():
        ours = algorithm.scores(batch)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask)]
    ended = sum(row[-1] == trainer.tokenizer.eos_token_id for row in rows)
    assert ended >= 2  # completions end with eos (the rest were cut at data.max_length)
    torch.testing.assert_close(ours, plain_scores(model_dir, rows), atol=1e-5, rtol=0)
