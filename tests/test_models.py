"""Model layer: tiny local models, loading, LoRA reference, QLoRA on CPU, adapter merging."""

from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from prefopt.config import LoraConfig, ModelConfig
from prefopt.errors import PrefoptError
from prefopt.export import merge_adapter
from prefopt.scoring import sequence_logps
from prefopt.models import (count_parameters, load_causal_lm, load_reward_model, load_tokenizer,
                            needs_separate_reference, reference_context)
from prefopt.tiny import EOS_TOKEN, PAD_TOKEN, build_model, corpus_texts, init_model, train_tokenizer


def hh_batch(model_dir: Path, hh_path: Path, rows: int = 4, length: int = 48) -> dict[str, torch.Tensor]:
    """Right-padded HH dialogues with the first 16 tokens of each row treated as prompt (not scored)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [text[: 40 + 60 * i] for i, text in enumerate(islice(corpus_texts([str(hh_path)]), rows))]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=length)
    completion_mask = batch["attention_mask"].clone()
    completion_mask[:, :16] = 0
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "completion_mask": completion_mask}


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])[0]


def perturb_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = identity); give it random values so the adapter changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_llama_dir"])
def test_init_model_loads_with_plain_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    record = json.loads((model_dir / "prefopt_init.json").read_text())
    assert record["arch"] == model.config.model_type and record["size"] == "nano" and record["seed"] == 0
    assert record["n_params"] == model.num_parameters() and record["vocab_size"] == 512
    assert model.config.vocab_size == len(tokenizer) == 512
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert model.config.eos_token_id == tokenizer.eos_token_id != model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 512
    prompt = tokenizer("\n\nHuman: Hello\n\nAssistant:", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 6)


def test_tokenizer_round_trips_hh_text(tiny_model_dir, hh_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = list(islice(corpus_texts([str(hh_path)]), 3000, 3200)) + ["  tabs\tand “quotes” — 中文 \n\n  end "]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.eos_token_id not in ids  # no special tokens added by encode
        assert tokenizer.decode(ids) == text


def test_parameter_counts_per_size(hh_path):
    tokenizer = train_tokenizer(islice(corpus_texts([str(hh_path)]), 800), vocab_size=4096)
    assert len(tokenizer) == 4096
    counts = {size: build_model("gpt2", size, tokenizer).num_parameters() for size in ("nano", "tiny", "small")}
    assert 0.3e6 < counts["nano"] < 0.6e6
    assert 3e6 < counts["tiny"] < 6e6
    assert 15e6 < counts["small"] < 25e6
    assert 3e6 < build_model("llama", "tiny", tokenizer).num_parameters() < 6e6


def test_init_model_is_deterministic(hh_path, tmp_path):
    def build(name: str, seed: int) -> Path:
        return init_model(tmp_path / name, [str(hh_path)], size="nano", vocab_size=300, seed=seed, max_texts=100)

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    weights = [load_file(d / "model.safetensors") for d in (first, again, other)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["transformer.h.0.attn.c_attn.weight"],
                           weights[2]["transformer.h.0.attn.c_attn.weight"])
    assert (first / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_corpus_texts_reads_every_format(shared_data, hh_path):
    assert sum(1 for _ in corpus_texts([str(shared_data / "hh-rlhf")])) == 2 * 2000
    first = next(corpus_texts([str(hh_path)]))
    assert first.startswith("\n\nHuman:") and "\n\nAssistant:" in first
    medical = shared_data / "medicalgpt"
    assert sum(1 for _ in corpus_texts([str(medical / "dpo_zh_500.jsonl")])) == 2 * 500  # prompt+chosen, +rejected
    assert sum(1 for _ in corpus_texts([str(medical / "medical_sft_1K_format.jsonl")])) == 1000
    lines = (medical / "en_article_tail500.txt").read_text(encoding="utf-8").splitlines()
    assert list(corpus_texts([str(medical / "en_article_tail500.txt")])) == [line for line in lines if line.strip()]


def test_load_tokenizer_pads_with_eos_when_missing(tiny_model_dir, tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp_path / "no-pad")
    with caplog.at_level(logging.WARNING, logger="prefopt.models"):
        loaded = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), tokenizer=str(tmp_path / "no-pad")))
    assert loaded.pad_token == loaded.eos_token == EOS_TOKEN and loaded.padding_side == "right"
    assert "no pad token" in caplog.text

    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "no-pad-no-eos")
    with pytest.raises(PrefoptError, match="has no pad or eos token"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "no-pad-no-eos")))


def test_missing_or_empty_paths_are_user_errors(tmp_path):
    missing = ModelConfig(name_or_path=str(tmp_path / "missing"))
    with pytest.raises(PrefoptError, match="does not exist"):
        load_tokenizer(missing)
    with pytest.raises(PrefoptError, match="does not exist"):
        load_causal_lm(missing)
    with pytest.raises(PrefoptError, match="cannot load model"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path)))  # exists, holds no model
    with pytest.raises(PrefoptError, match="name_or_path"):
        load_tokenizer(ModelConfig())


def test_a_name_tried_on_the_hub_says_no_local_folder_holds_it(tmp_path, monkeypatch):
    """``models/base`` before ``models/`` exists can only be a hub id; when the hub cannot give it, the message says
    that no local folder of that name exists here either (a new user's first run from the wrong directory)."""
    from transformers import AutoTokenizer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(PrefoptError, match=f"cannot load model 'models/base' from the hub .* no folder "
                                           f"'models/base' in {tmp_path} either"):
        load_tokenizer(ModelConfig(name_or_path="models/base"))


def test_frozen_reference_and_full_policy(tiny_model_dir):
    policy = load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)))
    reference = load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)), trainable=False)
    assert policy.training and not policy.config.use_cache
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert needs_separate_reference(policy)
    trainable, total = count_parameters(policy)
    assert trainable == total == policy.num_parameters()
    assert count_parameters(reference) == (0, total)
    with reference_context(policy, reference) as ref:
        assert ref is reference


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_llama_dir"])
def test_lora_reference_is_the_base_with_the_adapter_off(fixture, request, hh_path):
    model_dir = request.getfixturevalue(fixture)
    cfg = ModelConfig(name_or_path=str(model_dir), lora=LoraConfig(r=4, alpha=8), gradient_checkpointing=True)
    policy = load_causal_lm(cfg)
    base = load_causal_lm(cfg, trainable=False)
    assert isinstance(policy, peft.PeftModel) and not needs_separate_reference(policy)
    trainable_names = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable_names and all("lora_" in name for name in trainable_names)
    trainable, total = count_parameters(policy)
    assert trainable == sum(p.numel() for p in policy.parameters() if p.requires_grad) and trainable < total / 5

    batch = hh_batch(model_dir, hh_path)
    assert torch.allclose(logps(policy, batch), logps(base, batch), atol=1e-6)  # B = 0: adapter is identity
    perturb_lora_b(policy)
    with_adapter = logps(policy, batch)
    with reference_context(policy) as reference:
        assert reference is policy
        without_adapter = logps(reference, batch)
    base_logps = logps(base, batch)
    assert (with_adapter - base_logps).abs().min() > 1e-3
    torch.testing.assert_close(without_adapter, base_logps, atol=1e-6, rtol=0)
    torch.testing.assert_close(logps(policy, batch), with_adapter, atol=0, rtol=0)  # adapter back on

    loss = -sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])[0].mean()
    loss.backward()  # through gradient checkpointing
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_qlora_trains_on_cpu_and_the_adapter_reloads(tiny_model_dir, hh_path, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), load_in_4bit=True, lora=LoraConfig(r=8, alpha=16))
    policy = load_causal_lm(cfg)
    assert any(type(m).__name__ == "Linear4bit" for m in policy.modules())
    trainable, total = count_parameters(policy)
    unquantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    assert 0 < trainable < total == unquantized + trainable  # packed 4-bit weights counted as values
    batch = hh_batch(tiny_model_dir, hh_path)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses

    policy.save_pretrained(tmp_path / "adapter")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    policy.eval()
    torch.testing.assert_close(logps(reloaded, batch), logps(policy, batch), atol=1e-5, rtol=0)


def test_merge_adapter_matches_the_adapter_model(tiny_llama_dir, hh_path, tmp_path):
    policy = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir), lora=LoraConfig(r=4, alpha=8)))
    perturb_lora_b(policy, seed=1)
    policy.save_pretrained(tmp_path / "adapter")
    merged_dir = merge_adapter(tmp_path / "adapter", tmp_path / "merged")  # no tokenizer saved: taken from the base
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert AutoTokenizer.from_pretrained(merged_dir).pad_token == PAD_TOKEN
    assert not any("lora" in name for name, _ in merged.named_parameters())
    batch = hh_batch(tiny_llama_dir, hh_path)
    policy.eval()
    torch.testing.assert_close(logits(merged, batch), logits(policy, batch), atol=1e-5, rtol=0)
    with pytest.raises(PrefoptError, match="no LoRA adapter"):
        merge_adapter(tmp_path / "merged", tmp_path / "again")


def test_merge_adapter_never_writes_over_a_model(qwen2_window_dir, tmp_path, capsys):
    """`prefopt merge-adapter ADAPTER runs/sft/model` wrote the merged weights over the SFT model without a word: a
    folder holding files is refused before anything is loaded (--overwrite replaces it), the adapter's own folder
    and its base's always."""
    from prefopt.cli import main

    policy = load_causal_lm(ModelConfig(name_or_path=str(qwen2_window_dir), lora=LoraConfig(r=4, alpha=8)))
    perturb_lora_b(policy, seed=1)
    policy.save_pretrained(tmp_path / "adapter")
    other = tmp_path / "sft-model"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"the user's model")
    before = {p.name: p.read_bytes() for p in Path(qwen2_window_dir).iterdir() if p.is_file()}
    capsys.readouterr()  # the loading bar of the policy above
    for out, message in ((other, "already holds files (model.safetensors); give a new folder"),
                         (tmp_path / "adapter", "already holds files")):
        assert main(["merge-adapter", str(tmp_path / "adapter"), str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert (other / "model.safetensors").read_bytes() == b"the user's model"
    for out in (tmp_path / "adapter", qwen2_window_dir):
        assert main(["merge-adapter", str(tmp_path / "adapter"), str(out), "--overwrite"]) == 2
        assert "own folder: the merged model goes to a new folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in Path(qwen2_window_dir).iterdir() if p.is_file()} == before
    assert main(["merge-adapter", str(tmp_path / "adapter"), str(other), "--overwrite"]) == 0
    assert not any("lora" in name for name, _ in AutoModelForCausalLM.from_pretrained(other).named_parameters())


def test_load_reward_model_scores_each_sequence(tiny_model_dir, hh_path, tmp_path):
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)  # no pad_token_id
    saved.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "rm")
    reward_model = load_reward_model(str(tmp_path / "rm"), ModelConfig())
    assert reward_model.config.num_labels == 1 and reward_model.config.pad_token_id == 1
    assert not reward_model.training and not any(p.requires_grad for p in reward_model.parameters())
    batch = hh_batch(tiny_model_dir, hh_path)
    with torch.no_grad():
        scores = reward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert scores.shape == (4, 1) and torch.isfinite(scores).all()
