"""Pairwise losses added as plugins (one file, one decorator): ``simpo`` and ``robust`` equal TRL 1.16's on the same
batch (both sides computed here, to 1e-5), and the README's 'Add a loss in three steps' works as written."""

from __future__ import annotations

import copy
import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.algorithms.pairwise import policy_logps, resolve_loss
from prefopt.config import DataConfig, load_config
from prefopt.data import build_dataloader, load_rows
from prefopt.registry import ALGORITHMS, LOSSES
from prefopt.scoring import TokenScorer
from prefopt.types import PairLogps

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def setup(offline_model, hh_path, tmp_path_factory):
    """On the kind nano GPT-2, gpt2-real and llama-chat (tests/conftest.py ``offline_model``)."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(offline_model[1])
    policy = AutoModelForCausalLM.from_pretrained(offline_model[1], dtype=torch.float32).eval()
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # make the reference differ so the log-ratios are not zero
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    data_cfg = DataConfig(path=str(hh_path), eval_fraction=0.0, max_examples=6, max_length=160, max_prompt_length=96)
    rows = load_rows(data_cfg, "pairs").train
    loader, _ = build_dataloader(rows, "pairs", tokenizer, data_cfg, batch_size=6, shuffle=False, seed=0,
                                 length_bucketing=False)
    batch = next(iter(loader))
    with torch.no_grad():
        c, r, cl, rl = policy_logps(TokenScorer(policy), batch)
        rc, rr, _, _ = policy_logps(TokenScorer(reference), batch)
    logps = PairLogps(c, r, rc, rr, cl, rl)
    return tokenizer, policy, reference, rows, batch, logps, tmp_path_factory.mktemp("trl")


# ----------------------------------------------------------------------------------------------------- simpo
def trl_simpo(setup, beta: float, gamma: float, label_smoothing: float) -> tuple[float, torch.Tensor]:
    """TRL CPOTrainer(loss_type="simpo", cpo_alpha=0): (batch loss of its full forward path, per-pair losses)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tokenizer, policy, _, rows, batch, _, tmp = setup
    n = batch.num_pairs
    labels = batch.input_ids.masked_fill(batch.completion_mask == 0, -100)
    trl_batch = {
        "chosen_input_ids": batch.input_ids[:n], "chosen_attention_mask": batch.attention_mask[:n],
        "chosen_labels": labels[:n],
        "rejected_input_ids": batch.input_ids[n:], "rejected_attention_mask": batch.attention_mask[n:],
        "rejected_labels": labels[n:],
    }
    args = CPOConfig(output_dir=str(tmp / "cpo"), loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma,
                     label_smoothing=label_smoothing, report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=n, max_length=512)
    trainer = CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    with torch.no_grad():
        loss, _ = trainer.get_batch_loss_metrics(trainer.model, trl_batch)
        chosen, rejected = trainer.concatenated_forward(trainer.model, trl_batch)[:2]  # mean per-token log-probs
        per_pair, _, _ = trainer.cpo_loss(chosen, rejected)
    return float(loss), per_pair


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.2)])
def test_simpo_equals_trl_cpo_simpo(setup, beta, gamma, label_smoothing):
    logps = setup[5]
    ours = resolve_loss("simpo", {"gamma": gamma, "label_smoothing": label_smoothing})(logps, beta)
    theirs_loss, theirs = trl_simpo(setup, beta, gamma, label_smoothing)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert float(ours.mean()) == pytest.approx(theirs_loss, abs=1e-5)


def test_simpo_by_hand_and_reference_free(setup):
    """L = -log s(beta * (mean logp_w - mean logp_l) - gamma), from the summed log-probs and lengths."""
    logps = setup[5]
    mean_w, mean_l = logps.chosen / logps.chosen_lengths, logps.rejected / logps.rejected_lengths
    expected = -torch.log(torch.sigmoid(2.0 * (mean_w - mean_l) - 0.5))
    no_reference = PairLogps(logps.chosen, logps.rejected, None, None, logps.chosen_lengths, logps.rejected_lengths)
    got = resolve_loss("simpo", {"gamma": 0.5})(no_reference, 2.0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert resolve_loss("simpo", {}).reference_free


def test_dpo_with_a_reference_free_loss_loads_no_reference(setup, offline_model):
    tokenizer, policy, _, _, batch, logps, _ = setup
    config = load_config(None, ["algorithm.name=dpo", "algorithm.loss=simpo", "algorithm.beta=2.0",
                                "algorithm.loss_params={gamma: 0.5}", f"model.name_or_path={offline_model[1]}"])
    dpo = ALGORITHMS.get("dpo")(config.algorithm, config, tokenizer)
    dpo.build()
    assert dpo.reference is None
    modules = [value for value in vars(dpo).values() if isinstance(value, torch.nn.Module)]
    assert modules == [dpo.model]  # the policy alone
    dpo.model.eval()
    (out,) = list(dpo.step(batch))
    expected = resolve_loss("simpo", {"gamma": 0.5})(logps, 2.0).mean()
    assert float(out.loss) == pytest.approx(float(expected), abs=1e-5)


# ----------------------------------------------------------------------------------------------------- robust
def trl_robust(setup, beta: float, label_smoothing: float) -> float:
    from trl import DPOConfig, DPOTrainer

    tokenizer, policy, reference, rows, batch, _, tmp = setup
    args = DPOConfig(output_dir=str(tmp / "robust"), loss_type=["robust"], beta=beta, label_smoothing=label_smoothing,
                     report_to="none", per_device_train_batch_size=6, max_length=None, use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": batch.completion_mask}
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs, return_outputs=False))


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.1), (0.1, 0.3), (0.25, 0.0)])
def test_robust_equals_trl_dpo_robust(setup, beta, label_smoothing):
    """TRL sums its own per-token log-probs: float32 rounding there (~1e-4 on sums of ~-200) reaches the loss scaled
    by beta / (4 (1 - 2 eps)), so beta stays in DPO's usual range here."""
    ours = float(resolve_loss("robust", {"label_smoothing": label_smoothing})(setup[5], beta).mean())
    assert ours == pytest.approx(trl_robust(setup, beta, label_smoothing), abs=1e-5)


def test_robust_is_unbiased_under_label_flips(setup):
    """Eq. 9's point: averaged over a flip with probability eps, the robust loss is the clean DPO loss."""
    logps, eps = setup[5], 0.3
    flipped = PairLogps(logps.rejected, logps.chosen, logps.ref_rejected, logps.ref_chosen, logps.rejected_lengths,
                        logps.chosen_lengths)
    robust = resolve_loss("robust", {"label_smoothing": eps})
    expected_over_noise = (1 - eps) * robust(logps, 0.5) + eps * robust(flipped, 0.5)
    torch.testing.assert_close(expected_over_noise, resolve_loss("sigmoid", {})(logps, 0.5), atol=1e-6, rtol=0)
    assert not torch.allclose(robust(logps, 0.5), resolve_loss("cdpo", {"label_smoothing": eps})(logps, 0.5))
    torch.testing.assert_close(resolve_loss("robust", {"label_smoothing": 0.0})(logps, 0.5),
                               resolve_loss("sigmoid", {})(logps, 0.5))


# ----------------------------------------------------------------------------------------------------- the docs
def code_blocks(language: str) -> list[str]:
    """The code blocks of one language in the README's "Add a loss in three steps" section."""
    section = README.read_text().split("## Add a loss in three steps", 1)[1].split("\n## ", 1)[0]
    return [code for lang, code in re.findall(r"```(\w+)\n(.*?)```", section, re.S) if lang == language]


def test_adding_a_loss_doc_works_as_written(tiny_model_dir, hh_path, tmp_path, monkeypatch):
    """Step 1: the loss file, imported from a package of our own (as an entry point would); step 2: the recipe,
    verbatim; step 3: the Python that trains 2 DPO steps with the loss picked by name."""
    loss_file, train_script = code_blocks("python")
    (recipe,) = code_blocks("yaml")
    package = tmp_path / "my_prefopt_losses"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "margin_sigmoid.py").write_text(loss_file)
    (tmp_path / "dpo_margin.yaml").write_text(recipe)
    (tmp_path / "runs" / "hh-tiny" / "sft").mkdir(parents=True)
    (tmp_path / "runs" / "hh-tiny" / "sft" / "model").symlink_to(tiny_model_dir)
    monkeypatch.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("my_prefopt_losses.margin_sigmoid")  # registers the loss
        assert "margin_sigmoid" in LOSSES
        exec(compile(train_script, str(README), "exec"), {"__name__": "__main__"})
    finally:
        LOSSES.unregister("margin_sigmoid")
        for name in ("my_prefopt_losses.margin_sigmoid", "my_prefopt_losses"):
            sys.modules.pop(name, None)

    run_dir = tmp_path / "runs" / "hh-tiny" / "dpo-margin"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 2
    # before the first update the policy is its reference, so the loss is -log s(0 - margin) = log(1 + e^0.5)
    assert losses[0] == pytest.approx(math.log1p(math.exp(0.5)), abs=1e-5)
    assert json.loads((run_dir / "prefopt_config.json").read_text())["algorithm"]["loss"] == "margin_sigmoid"
