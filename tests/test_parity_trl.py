"""Our DPO losses and ORPO loss equal TRL 1.16's on the same batch (to 1e-5); both sides are computed here.

Both sides run in float32: TRL 1.16 defaults to ``bf16=True`` even on CPU (its reference forward then runs under
bf16 autocast), so the TRL configs here set ``bf16=False``. Each test runs on the kind nano GPT-2 and on the
realistic fixtures ``gpt2-real`` (dropout 0.1, pad = eos) and ``llama-chat`` (bf16 weights, loaded in float32), in
train mode: our loader turns dropout off (``model.disable_dropout``) and so does TRL's trainer, from the saved model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.algorithms.orpo import ORPO, ORPOConfig
from prefopt.algorithms.pairwise import policy_logps, resolve_loss
from prefopt.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from prefopt.data import build_dataloader, load_rows
from prefopt.models import load_causal_lm
from prefopt.scoring import TokenScorer
from prefopt.types import PairLogps


@pytest.fixture(scope="module")
def setup(offline_model, hh_path, tmp_path_factory):
    name, model_dir = offline_model
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = load_causal_lm(ModelConfig(name_or_path=str(model_dir)))  # float32, dropout off, train mode
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # make the reference differ so the log-ratios are not zero
        for p in reference.parameters():
            p.add_(0.005 * torch.randn_like(p))  # log-ratios of a few nats; fp32 sums stay well inside 1e-5
    data_cfg = DataConfig(path=str(hh_path), eval_fraction=0.0, max_examples=6, max_length=160, max_prompt_length=96)
    rows = load_rows(data_cfg, "pairs").train
    loader, _ = build_dataloader(rows, "pairs", tokenizer, data_cfg, batch_size=6, shuffle=False, seed=0,
                                 length_bucketing=False)
    batch = next(iter(loader))
    return tokenizer, policy, reference, rows, batch, tmp_path_factory.mktemp("trl"), model_dir, name


def saved_model(setup, weights: torch.nn.Module | None = None) -> torch.nn.Module:
    """The fixture as TRL users load it (float32, its dropout as saved), with ``weights`` loaded when given."""
    model = AutoModelForCausalLM.from_pretrained(setup[6], dtype=torch.float32)
    if weights is not None:
        model.load_state_dict(weights.state_dict())
    return model


def trl_dpo_loss(setup, loss_type: str, beta: float) -> float:
    from trl import DPOConfig, DPOTrainer

    tokenizer, policy, reference, rows, batch, tmp, _, _ = setup
    args = DPOConfig(output_dir=str(tmp / loss_type), loss_type=[loss_type], beta=beta, report_to="none",
                     per_device_train_batch_size=6, max_length=None, use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=saved_model(setup), ref_model=saved_model(setup, reference), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.model.train()  # TRL turned its dropout off (DPOConfig.disable_dropout)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": batch.completion_mask}
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs, return_outputs=False))


def our_dpo_loss(setup, loss: str, beta: float) -> float:
    _, policy, reference, _, batch, _, _, _ = setup
    with torch.no_grad():
        c, r, cl, rl = policy_logps(TokenScorer(policy), batch)
        rc, rr, _, _ = policy_logps(TokenScorer(reference), batch)
    return float(resolve_loss(loss, {})(PairLogps(c, r, rc, rr, cl, rl), beta).mean())


@pytest.mark.parametrize("loss,beta", [("sigmoid", 0.1), ("ipo", 0.1), ("hinge", 0.5), ("sigmoid", 2.0)])
def test_dpo_losses_equal_trl(setup, loss, beta):
    ours = our_dpo_loss(setup, loss, beta)
    theirs = trl_dpo_loss(setup, loss, beta)
    # summed log-probs are ~ -200..-300 (float32 ulp 1.5e-5..3e-5) and the two sides sum in different orders (and
    # thread counts), so the log-ratio margin agrees to ~5e-5; the loss moves by beta times that (at most)
    tolerance = max(1e-5, 5e-5 * beta)
    assert ours == pytest.approx(theirs, abs=tolerance), (loss, ours, theirs)
    assert ours != pytest.approx(our_dpo_loss(setup, loss, beta * 1.5), abs=1e-4)  # the loss really depends on beta


def test_cdpo_equals_trl_robust_shape_by_hand(setup):
    """cdpo at eps: -(1-eps) log s(bm) - eps log s(-bm), checked by hand on the same log-probs."""
    _, policy, reference, _, batch, _, _, _ = setup
    with torch.no_grad():
        c, r, cl, rl = policy_logps(TokenScorer(policy), batch)
        rc, rr, _, _ = policy_logps(TokenScorer(reference), batch)
    logps = PairLogps(c, r, rc, rr, cl, rl)
    margin = 0.1 * ((c - rc) - (r - rr))
    expected = -(0.8 * torch.log(torch.sigmoid(margin)) + 0.2 * torch.log(torch.sigmoid(-margin)))
    got = resolve_loss("cdpo", {"label_smoothing": 0.2})(logps, 0.1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_orpo_loss_equals_trl(setup, tmp_path):
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer

    tokenizer, policy, _, rows, batch, _, _, _ = setup
    n = batch.num_pairs
    labels = batch.input_ids.masked_fill(batch.completion_mask == 0, -100)
    trl_batch = {
        "chosen_input_ids": batch.input_ids[:n], "chosen_attention_mask": batch.attention_mask[:n],
        "chosen_labels": labels[:n],
        "rejected_input_ids": batch.input_ids[n:], "rejected_attention_mask": batch.attention_mask[n:],
        "rejected_labels": labels[n:],
    }
    args = TRLORPOConfig(output_dir=str(tmp_path), beta=0.25, report_to="none", use_cpu=True,
                         per_device_train_batch_size=n, max_length=512, bf16=False)
    trainer = ORPOTrainer(model=saved_model(setup), args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    trainer.model.train()  # TRL turned its dropout off (ORPOConfig.disable_dropout)
    with torch.no_grad():
        theirs, _ = trainer.get_batch_loss_metrics(trainer.model, trl_batch)

    run = RunConfig(algorithm=ORPOConfig(beta=0.25, nll_on="full"), model=ModelConfig(), train=TrainConfig())
    ours_algo = ORPO(run.algorithm, run, tokenizer)
    ours_algo.model = TokenScorer(policy)
    with torch.no_grad():
        ours, metrics = ours_algo.losses(batch)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)

    paper = ORPO(ORPOConfig(beta=0.25, nll_on="response"), run, tokenizer)
    paper.model = TokenScorer(policy)
    with torch.no_grad():
        response_only, _ = paper.losses(batch)
    assert float(response_only) != pytest.approx(float(ours), abs=1e-4)  # the prompt tokens change the NLL term
