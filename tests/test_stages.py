"""Pipeline stages: reward modelling (pairwise = TRL, K-wise by hand), SFT masking and learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from prefopt.algorithms.reward import ranking_loss
from prefopt.config import DataConfig, load_config
from prefopt.data import build_dataloader, load_rows
from prefopt.models import disable_dropout
from prefopt.scoring import RewardScorer
from prefopt.trainer import Trainer
from prefopt.types import RankBatch


def rank_batch(scores: list[float], pairs: list[tuple[int, int]], groups: list[int]) -> tuple[torch.Tensor, RankBatch]:
    n = len(scores)
    batch = RankBatch(input_ids=torch.zeros(n, 1, dtype=torch.long), attention_mask=torch.ones(n, 1, dtype=torch.long),
                      pairs=torch.tensor(pairs), pair_group=torch.tensor(groups))
    return torch.tensor(scores), batch


def bt(diff: float) -> float:
    return -math.log(1 / (1 + math.exp(-diff)))


def test_kwise_k3_and_k4_match_hand_computed_values():
    # prompt 0: K=3 ranked a > b > c with scores 2, 0.5, -1 -> pairs (a,b), (a,c), (b,c)
    # prompt 1: K=4 ranked with scores 1, 0, 0.25, -2 in ranking order p > q > r > s -> 6 pairs
    scores = [2.0, 0.5, -1.0, 1.0, 0.0, 0.25, -2.0]
    pairs = [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (3, 6), (4, 5), (4, 6), (5, 6)]
    groups = [0, 0, 0, 1, 1, 1, 1, 1, 1]
    s, batch = rank_batch(scores, pairs, groups)
    loss, metrics = ranking_loss(s, batch, center_coef=0.0)
    k3 = (bt(1.5) + bt(3.0) + bt(1.5)) / 3
    k4 = (bt(1.0) + bt(0.75) + bt(3.0) + bt(-0.25) + bt(2.0) + bt(2.25)) / 6
    assert float(loss) == pytest.approx((k3 + k4) / 2, abs=1e-6)
    assert float(metrics["rm/accuracy"].mean()) == pytest.approx(8 / 9)


def test_kwise_with_k2_equals_pairwise_and_centering():
    s, batch = rank_batch([0.3, -0.2, 1.0, 1.5], [(0, 1), (2, 3)], [0, 1])
    loss, _ = ranking_loss(s, batch, center_coef=0.0)
    assert float(loss) == pytest.approx((bt(0.5) + bt(-0.5)) / 2, abs=1e-6)
    centered, _ = ranking_loss(s, batch, center_coef=0.1)
    assert float(centered) == pytest.approx(float(loss) + 0.1 * (0.1**2 + 2.5**2) / 2, abs=1e-6)


def test_pairwise_rm_loss_equals_trl_reward_trainer(offline_model, hh_path, tmp_path):
    """In train mode: our reward models load with dropout off (model.disable_dropout), TRL's trainer turns it off."""
    from trl import RewardConfig, RewardTrainer

    model_dir = offline_model[1]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    ours_model = disable_dropout(copy.deepcopy(model)).train()
    cfg = DataConfig(path=str(hh_path), eval_fraction=0.0, max_examples=6, max_length=160, max_prompt_length=96)
    rows = load_rows(cfg, "pairs").train
    loader, _ = build_dataloader(load_rows(cfg, "ranks").train, "ranks", tokenizer, cfg, batch_size=6,
                                 shuffle=False, seed=0, length_bucketing=False)
    batch = next(iter(loader))
    with torch.no_grad():
        ours, _ = ranking_loss(RewardScorer(ours_model)(batch.input_ids, batch.attention_mask), batch, center_coef=0.01)

    order = torch.cat([batch.pairs[:, 0], batch.pairs[:, 1]])  # TRL: chosen rows, then rejected rows
    inputs = {"input_ids": batch.input_ids[order], "attention_mask": batch.attention_mask[order]}
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                        center_rewards_coefficient=0.01, per_device_train_batch_size=6)
    trainer = RewardTrainer(model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    trainer.model.train()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
    assert batch.pairs.shape[0] == 6
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)


def test_sft_masks_prompt_tokens(tiny_model_dir, hh_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(path=str(hh_path), eval_fraction=0.0, max_examples=4, max_length=128, max_prompt_length=64)
    records = load_rows(cfg, "sft").train
    loader, _ = build_dataloader(records, "sft", tokenizer, cfg, batch_size=4, shuffle=False, seed=0,
                                 length_bucketing=False)
    batch = next(iter(loader))
    for row, record in zip(range(4), records):
        labelled = batch.labels[row][batch.labels[row] != -100]
        assert tokenizer.decode(labelled).startswith(record["completion"][: len(tokenizer.decode(labelled)) - 20])
        prompt_len = len(tokenizer(record["prompt"], add_special_tokens=False)["input_ids"][-64:])
        assert (batch.labels[row, :prompt_len] == -100).all()


@pytest.mark.slow
def test_sft_lowers_held_out_nll(tiny_model_dir, hh_path, tmp_path):
    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.path={hh_path}", "data.max_examples=256",
                 "data.max_length=128", "data.max_prompt_length=64", "train.max_steps=40", "train.batch_size=8",
                 "train.learning_rate=3e-3", "train.max_eval_batches=4", "train.eval_batch_size=16",
                 f"train.output_dir={tmp_path}", "train.progress=false", "train.save_model=false"]
    config = load_config(None, ["algorithm=sft", *overrides])
    trainer = Trainer(config)
    trainer.prepare_data()
    trainer.algorithm.build()
    before = trainer.evaluate()
    trainer.loaders.clear()
    after = Trainer(config).fit()
    assert after["eval/nll"] < before["eval/nll"] - 0.5, (before, after)
    assert after["eval/perplexity"] == pytest.approx(math.exp(after["eval/nll"]), rel=1e-6)
