"""KTO: the "unpaired" data kind plugs in through the registry, the loss equals TRL 1.16's KTOTrainer on the same
batch (its full forward path, both sides computed here, to 1e-5), and a short run trains."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.algorithms.kto import KTO, KTOConfig, completion_logps, kto_loss, mismatched_pairs
from prefopt.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from prefopt.data import build_dataloader, load_rows
from prefopt.registry import ALGORITHMS, KINDS
from prefopt.scoring import TokenScorer
from prefopt.trainer import Trainer
from prefopt.types import UnpairedBatch

MAX_LENGTH = 160
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "kto_hh_tiny.yaml"


@pytest.fixture(scope="module")
def setup(offline_model, hh_path, tmp_path_factory):
    """On the kind nano GPT-2, gpt2-real and llama-chat (tests/conftest.py ``offline_model``)."""
    model_dir = offline_model[1]
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    other = copy.deepcopy(policy)
    with torch.no_grad():  # a second model that differs, so log-ratios and the KL estimate are not zero
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    data_cfg = DataConfig(path=str(hh_path), eval_fraction=0.0, max_examples=6, max_length=MAX_LENGTH,
                          max_prompt_length=96)
    rows = load_rows(data_cfg, "unpaired").train  # each HH pair gives a desirable and an undesirable row
    loader, _ = build_dataloader(rows, "unpaired", tokenizer, data_cfg, batch_size=6, shuffle=False, seed=0,
                                 length_bucketing=False)
    batch = next(iter(loader))
    kl_batch = mismatched_pairs(batch, tokenizer.pad_token_id, MAX_LENGTH)
    with torch.no_grad():
        estimate = (completion_logps(TokenScorer(policy), *kl_batch)
                    - completion_logps(TokenScorer(other), *kl_batch)).mean()
    if estimate > 0:  # orient the pair so that (policy, other) gives a negative estimate and the swap a positive one
        policy, other = other, policy
    return tokenizer, policy, other, rows, data_cfg, batch, tmp_path_factory.mktemp("trl-kto")


def test_kto_is_an_unpaired_algorithm_of_the_registry(setup):
    batch = setup[5]
    assert ALGORITHMS.get("kto").kind == "unpaired" and "unpaired" in KINDS
    assert isinstance(batch, UnpairedBatch)
    assert batch.desirable.tolist() == [row["label"] for row in setup[3]]
    assert batch.desirable.any() and not batch.desirable.all()


def test_mismatched_pairs_put_the_previous_rows_completion_after_each_prompt(setup):
    tokenizer, batch = setup[0], setup[5]
    ids, mask, completion = mismatched_pairs(batch, tokenizer.pad_token_id, MAX_LENGTH)
    rows = batch.input_ids.shape[0]
    for i in range(rows):
        prompt = batch.input_ids[i][(batch.attention_mask[i] == 1) & (batch.completion_mask[i] == 0)]
        previous = batch.input_ids[i - 1][batch.completion_mask[i - 1] == 1]  # i - 1 = -1 wraps to the last row
        want = torch.cat([prompt, previous])[:MAX_LENGTH]
        n = int(mask[i].sum())
        assert torch.equal(ids[i, :n], want)
        assert int(completion[i].sum()) == min(len(previous), MAX_LENGTH - len(prompt))
        assert completion[i, :len(prompt)].sum() == 0


def test_kto_loss_by_hand():
    """Eq. 7-8 with lambda_D = 2, lambda_U = 1, beta = 0.5, z_ref = 0.4 on two rows."""
    logratios = torch.tensor([1.0, -2.0])
    desirable = torch.tensor([True, False])
    got = kto_loss(logratios, desirable, torch.tensor(0.4), beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    sigmoid = lambda x: 1 / (1 + torch.exp(torch.tensor(-x)))  # noqa: E731
    expected = torch.stack([2.0 * (1 - sigmoid(0.5 * (1.0 - 0.4))), 1.0 * (1 - sigmoid(0.5 * (0.4 + 2.0)))])
    torch.testing.assert_close(got, expected)


def trl_kto_loss(setup, policy, reference, beta, desirable_weight, undesirable_weight, kl_batch) -> tuple[float, float]:
    """TRL KTOTrainer._compute_loss on our batch and our mismatched pairs: (loss, its KL estimate z_ref)."""
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    tokenizer, _, _, rows, _, batch, tmp = setup
    args = TRLKTOConfig(output_dir=str(tmp / "kto"), beta=beta, desirable_weight=desirable_weight,
                        undesirable_weight=undesirable_weight, report_to="none", use_cpu=True, bf16=False,
                        per_device_train_batch_size=6, max_length=None)
    trainer = KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    kl_ids, kl_mask, kl_completion = kl_batch
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": batch.completion_mask, "label": batch.desirable,
              "KL_input_ids": kl_ids, "KL_attention_mask": kl_mask, "KL_completion_mask": kl_completion}
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return float(loss), trainer._metrics["eval"]["kl"][-1]


@pytest.mark.parametrize("swap,beta,desirable_weight,undesirable_weight",
                         [(False, 0.1, 1.0, 1.0), (True, 0.1, 1.0, 1.0), (True, 0.5, 1.33, 0.8)])
def test_kto_loss_equals_trl(setup, swap, beta, desirable_weight, undesirable_weight):
    tokenizer, policy, other, _, data_cfg, batch, _ = setup
    if swap:  # the other way round the KL estimate is positive, so the reference point z_ref enters the loss
        policy, other = other, policy
    run = RunConfig(algorithm=KTOConfig(beta=beta, desirable_weight=desirable_weight,
                                        undesirable_weight=undesirable_weight),
                    model=ModelConfig(), data=data_cfg, train=TrainConfig(batch_size=6))
    ours = KTO(run.algorithm, run, tokenizer)
    ours.model, ours.reference = TokenScorer(policy), TokenScorer(other)
    with torch.no_grad():
        losses, metrics = ours.losses(batch)
    kl_batch = mismatched_pairs(batch, tokenizer.pad_token_id, MAX_LENGTH)
    theirs, theirs_kl = trl_kto_loss(setup, policy, other, beta, desirable_weight, undesirable_weight, kl_batch)
    assert float(losses.mean()) == pytest.approx(theirs, abs=1e-5)
    # z_ref is a mean of differences of summed log-probs (~ -200 each): float32 rounding alone is ~1e-5 there
    assert float(metrics["kto/kl"]) == pytest.approx(theirs_kl, abs=1e-4)
    if swap:
        assert float(metrics["kto/kl"]) > 0.1
    else:
        assert float(metrics["kto/kl"]) == 0.0  # a negative estimate is clamped at 0


def test_kto_recipe_trains(tiny_model_dir, hh_path, tmp_path):
    """recipes/kto_hh_tiny.yaml, shortened: 6 HH pairs = 12 unpaired rows in one batch, 4 steps; the loss falls."""
    config = load_config(RECIPE, [
        f"model.name_or_path={tiny_model_dir}", f"data.path={hh_path}", "data.eval_fraction=0.0",
        "data.max_examples=12", "data.max_length=96", "data.max_prompt_length=48", f"train.output_dir={tmp_path}",
        "train.max_steps=4", "train.batch_size=12", "train.learning_rate=0.002", "train.warmup_steps=0",
        "train.log_every=1", "train.progress=false"])
    trainer = Trainer(config)
    trainer.fit()
    assert trainer.algorithm.reference is not None  # full fine-tune: a frozen copy is the reference
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "train/loss" in row]
    assert len(logged) == 4
    assert logged[0]["train/loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: 1 - sigmoid(0) per row
    assert logged[-1]["train/loss"] < logged[0]["train/loss"] - 0.01
    assert all("kto/kl" in row and "rewards/accuracy" in row for row in logged)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model") is not None
