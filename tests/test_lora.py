"""LoRA (peft) and QLoRA (bitsandbytes 4-bit + LoRA) through the one Trainer, for every algorithm.

``model.lora.r > 0`` adds the adapter inside the model loader, so every algorithm gets it without code of its own.
Checked here with short runs on a tiny GPT-2: only adapter parameters train, the training loss goes down, and the
saved ``output_dir/model`` is a peft adapter that plain ``peft.PeftModel.from_pretrained`` loads to the same
outputs. For DPO the reference is the base with the adapter off: no second model is allocated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BitsAndBytesConfig)

from prefopt.algorithms.pairwise import policy_logps
from prefopt.cli import main as cli_main
from prefopt.config import load_config
from prefopt.data import build_dataloader, load_rows
from prefopt.models import count_parameters
from prefopt.registry import ALGORITHMS
from prefopt.scoring import TokenScorer
from prefopt.trainer import Trainer


def run(model_dir: Path, data_path: Path, out_dir: Path, algorithm: str, *overrides: str) -> Trainer:
    """A short run on 6 HH pairs; one batch holds all of them, so every step sees the same rows."""
    config = load_config(None, [
        f"algorithm.name={algorithm}", f"model.name_or_path={model_dir}", f"data.path={data_path}",
        "data.eval_fraction=0.0", "data.max_examples=6", "data.max_length=96", "data.max_prompt_length=48",
        f"train.output_dir={out_dir}", "train.max_steps=4", "train.batch_size=16", "train.learning_rate=0.01",
        "train.log_every=1", "train.progress=false",
        "model.lora.r=4", "model.lora.alpha=8", *overrides])
    trainer = Trainer(config)
    trainer.fit()
    return trainer


def train_losses(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def held_parameters(algorithm) -> int:
    """Parameters of every module the algorithm object holds (each tensor once): the memory it allocated."""
    seen, total = set(), 0
    for value in vars(algorithm).values():
        if isinstance(value, torch.nn.Module):
            for param in value.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    total += param.numel()
    return total


@pytest.fixture(scope="module")
def base_parameters(tiny_model_dir) -> int:
    return count_parameters(AutoModelForCausalLM.from_pretrained(tiny_model_dir))[1]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, hh_path, tmp_path_factory):
    """``lora_run(name)``: the trainer of a 4-step LoRA run of algorithm ``name`` (each run once per module)."""
    runs: dict[str, Trainer] = {}
    overrides = {"pt": ["train.batch_size=32"]}  # 6 packed documents make 18 chunks of 96 tokens: one batch

    def get(name: str) -> Trainer:
        if name not in runs:
            out_dir = tmp_path_factory.mktemp(f"lora-{name}")
            runs[name] = run(tiny_model_dir, hh_path, out_dir, name, *overrides.get(name, []))
        return runs[name]

    return get


@pytest.fixture(scope="module")
def probe(tiny_model_dir) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then let it rise."
    return tokenizer(text, return_tensors="pt")["input_ids"]


SLOW = pytest.mark.slow


@pytest.mark.parametrize("algorithm", ["dpo", "sft", pytest.param("orpo", marks=SLOW), pytest.param("pt", marks=SLOW),
                                       pytest.param("kto", marks=SLOW), pytest.param("reward", marks=SLOW)])
def test_lora_trains_only_the_adapter_for_every_algorithm(algorithm, lora_run, tiny_model_dir, base_parameters,
                                                          probe):
    trainer = lora_run(algorithm)
    model = trainer.algorithm.unwrapped
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    adapter, total = count_parameters(model)
    if algorithm == "reward":  # the score head is new: peft trains it in full (modules_to_save) next to the adapter
        head = [name for name in trainable if "lora_" not in name]
        assert head and all("modules_to_save" in name and "score" in name for name in head)
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        assert total == count_parameters(base)[1] + adapter  # base with its score head + adapter + trained head copy
    else:
        assert trainable and all("lora_" in name for name in trainable)
        assert total == base_parameters + adapter
    assert 0 < adapter < 0.1 * base_parameters

    losses = train_losses(Path(trainer.config.train.output_dir))
    assert len(losses) == 4 and losses[-1] < losses[0] - 1e-3, losses

    saved = Path(trainer.config.train.output_dir) / "model"
    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()
    with torch.no_grad():
        if algorithm == "reward":
            base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
            reloaded = peft.PeftModel.from_pretrained(base, str(saved)).eval()
            expected = model.eval()(probe, torch.ones_like(probe))
            got = reloaded(input_ids=probe).logits[:, 0]
        else:
            reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(saved))
            expected = model.lm.eval()(input_ids=probe).logits
            got = reloaded.eval()(input_ids=probe).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_dpo_lora_reference_is_the_base_and_no_second_model(lora_run, tiny_model_dir, hh_path, base_parameters):
    trainer = lora_run("dpo")
    algorithm = trainer.algorithm
    assert algorithm.reference is None
    adapter, _ = count_parameters(algorithm.unwrapped)
    assert held_parameters(algorithm) == base_parameters + adapter  # one model: base + adapter, nothing else

    # the reference log-probs are the base model's, while the trained policy's differ
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = trainer.config.data
    loader, _ = build_dataloader(load_rows(data, "pairs").train, "pairs", tokenizer, data, batch_size=8,
                                 shuffle=False, seed=0)
    batch = next(iter(loader))
    algorithm.unwrapped.eval()
    with torch.no_grad():
        reference = policy_logps(algorithm.reference_forward, batch)[:2]
        policy = policy_logps(algorithm.model, batch)[:2]
        base = policy_logps(TokenScorer(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), batch)[:2]
    for ref, want, pol in zip(reference, base, policy):
        torch.testing.assert_close(ref, want, atol=1e-6, rtol=0)
        assert (pol - want).abs().max() > 1e-2  # the adapter really moved the policy


def test_dpo_without_lora_allocates_a_reference_copy(tiny_model_dir, hh_path, base_parameters):
    """The contrast: a full fine-tune holds two models."""
    config = load_config(None, ["algorithm.name=dpo", f"model.name_or_path={tiny_model_dir}"])
    algorithm = ALGORITHMS.get("dpo")(config.algorithm, config, AutoTokenizer.from_pretrained(tiny_model_dir))
    algorithm.build()
    assert algorithm.reference is not None
    assert held_parameters(algorithm) == 2 * base_parameters


def test_qlora_dpo_on_cpu_moves_the_loss_and_the_adapter_reloads(tiny_model_dir, hh_path, tmp_path, base_parameters,
                                                                 probe):
    trainer = run(tiny_model_dir, hh_path, tmp_path / "qlora", "dpo", "model.load_in_4bit=true", "model.lora.r=8",
                  "model.lora.alpha=16")
    model = trainer.algorithm.unwrapped.lm
    assert trainer.algorithm.reference is None
    assert any(type(module).__name__ == "Linear4bit" for module in model.modules())
    adapter, total = count_parameters(model)
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert total == base_parameters + adapter  # packed 4-bit weights counted as the values they hold

    losses = train_losses(tmp_path / "qlora")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference before the first update
    assert losses[-1] < losses[0] - 0.05, losses

    saved = tmp_path / "qlora" / "model"
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization)
    reloaded = peft.PeftModel.from_pretrained(base, str(saved)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, model.eval()(input_ids=probe).logits,
                                   atol=1e-5, rtol=0)

    # `prefopt merge-adapter` folds the 4-bit-trained adapter into the full-precision base
    assert cli_main(["merge-adapter", str(saved), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        moved = merged(input_ids=probe).logits - base(input_ids=probe).logits
    assert moved.abs().max() > 1e-3
