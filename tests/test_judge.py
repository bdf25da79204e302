"""The evaluation core on the realistic chat fixtures: prompts rendered as training renders them, common random
numbers, KL = 0 for the reference itself and the KL / log-probs against a plain transformers forward, the
implicit-reward accuracy 0.5 for the reference, judges on the drawn rollouts."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from prefopt.config import DataConfig
from prefopt.data import build_dataloader
from prefopt.judge import draw_seed, pair_logps, preference_rows, preference_summary, sample_and_measure
from prefopt.judge.inputs import load_policy, load_policy_tokenizer
from prefopt.rl.engine import GenerationConfig
from prefopt.rl.rewards import RewardSpec, build_component

pytestmark = pytest.mark.usefixtures("one_thread")

CHATS = [[{"role": "user", "content": "How do I bake bread?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "Tell me a joke about cats and dogs, please."}],
         [{"role": "user", "content": "Name a color."}],
         [{"role": "user", "content": "Why is the sky blue?"}]]
GEN = GenerationConfig(max_new_tokens=6, temperature=0.7)
DATA = DataConfig(path="<eval>", eval_fraction=0.0, max_length=128, max_prompt_length=64)


def batches(rows: list[dict], kind: str, tokenizer, size: int = 2) -> list:
    loader, skipped = build_dataloader(rows, kind, tokenizer, DATA, size, shuffle=False, seed=0)
    assert not skipped
    return list(loader)


def prompt_batches(tokenizer, size: int = 2) -> list:
    return batches([{"prompt": chat, "meta": {}} for chat in CHATS], "prompts", tokenizer, size)


def perturbed(model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    head = other.get_output_embeddings().weight
    head.data += scale * torch.randn(head.shape, generator=generator)
    return other


@pytest.fixture(scope="module")
def llama(llama_chat_dir):
    """Llama with bf16 weights (loaded in float32), untied head, a Llama-3 template, two EOS ids."""
    return load_policy(str(llama_chat_dir), "float32", torch.device("cpu")), load_policy_tokenizer(str(llama_chat_dir))


def test_prompts_are_rendered_with_the_chat_template_as_training_renders_them(llama):
    model, tokenizer = llama
    rows = sample_and_measure(model, tokenizer, prompt_batches(tokenizer), GEN, seed=0, policy=False)
    assert [r["prompt_index"] for r in rows] == [0, 1, 2, 3, 4]
    for row, chat in zip(rows, CHATS):
        assert row["prompt_text"] == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert row["prompt_text"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert row["seed"] == draw_seed(0, row["prompt_index"] // 2, 0) and 1 <= row["length"] <= GEN.max_new_tokens


def test_kl_is_zero_for_the_reference_itself_and_matches_a_plain_forward(llama, llama_chat_dir):
    model, tokenizer = llama
    copy_of_model = load_policy(str(llama_chat_dir), "float32", torch.device("cpu"))
    for reference in (model, copy_of_model):
        rows = sample_and_measure(model, tokenizer, prompt_batches(tokenizer), GEN, seed=3, num_samples=2,
                                  reference=reference, entropy=True)
        assert [r["kl"] for r in rows] == [0.0] * 10
    other = perturbed(model)
    rows = sample_and_measure(other, tokenizer, prompt_batches(tokenizer), GEN, seed=3, reference=model)
    assert any(r["kl"] != 0.0 for r in rows)
    for row in rows:  # log pi and log pi_ref of the reply, summed, from a plain transformers forward at T = 0.7
        ids = torch.tensor([tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"] + row["response_ids"]])
        n = len(row["response_ids"])
        logp = {}
        for name, m in (("pi", other), ("ref", model)):
            logits = m(input_ids=ids).logits[0, -n - 1:-1].float() / GEN.temperature
            logp[name] = torch.log_softmax(logits, -1).gather(-1, ids[0, -n:, None]).sum().item()
        assert row["logp"] == pytest.approx(logp["pi"], abs=1e-4)
        assert row["kl"] == pytest.approx(logp["pi"] - logp["ref"], abs=1e-4)


def test_common_random_numbers_across_models_and_sample_counts(llama):
    model, tokenizer = llama
    other = perturbed(model, scale=0.05)
    keys = ("prompt_index", "sample", "seed", "response_ids", "response", "ended")

    def draw(m, seed=0, samples=2):
        return [{k: r[k] for k in keys} for r in sample_and_measure(m, tokenizer, prompt_batches(tokenizer), GEN,
                                                                     seed=seed, num_samples=samples, policy=False)]

    alone = draw(model)
    beside = draw(other)  # another model drawn first must not change the baseline's draws
    assert draw(model) == alone
    assert draw(model, samples=1) == [r for r in alone if r["sample"] == 0]  # sample j does not depend on n
    assert [r["response_ids"] for r in beside] != [r["response_ids"] for r in alone]
    shared = sum(a["response_ids"][0] == b["response_ids"][0] for a, b in zip(alone, beside))
    assert shared >= len(alone) // 2  # a nearby model with the same randomness draws mostly the same first token
    assert draw(model, seed=1) != alone


def test_judges_score_the_drawn_rollouts(llama):
    model, tokenizer = llama
    penalty = build_component(RewardSpec("length_penalty", params={"coef": -1.0}), tokenizer, torch.device("cpu"))
    validity = build_component(RewardSpec("format_validity"), tokenizer, torch.device("cpu"))
    rows = sample_and_measure(model, tokenizer, prompt_batches(tokenizer, size=3), GEN, seed=0, num_samples=2,
                              judges={"tokens": penalty, "valid": validity}, policy=False)
    assert len(rows) == 10
    for row in rows:
        assert row["tokens"] == row["length"]  # -(-1) * max(0, L - 0)
        assert row["valid"] == float(bool(row["response"].strip()))


def test_implicit_reward_accuracy_is_one_half_for_the_reference(llama, llama_chat_dir):
    model, tokenizer = llama
    pairs = [{"prompt": chat, "chosen": [{"role": "assistant", "content": "Sure, here it is."}],
              "rejected": [{"role": "assistant", "content": "No."}]} for chat in CHATS]
    pair_batches = batches(pairs, "pairs", tokenizer, size=2)
    reference = load_policy(str(llama_chat_dir), "float32", torch.device("cpu"))
    rows = preference_rows(pair_logps(model, pair_batches), pair_logps(reference, pair_batches))
    assert [r["implicit_margin"] for r in rows] == [0.0] * 5
    assert preference_summary(rows)["implicit_acc"] == 0.5
    moved = preference_rows(pair_logps(perturbed(model), pair_batches), pair_logps(reference, pair_batches))
    assert all(r["implicit_acc"] in (0.0, 1.0) for r in moved)  # no tie once the policy moved


def test_a_lora_adapter_without_tokenizer_files_is_judged_as_peft_loads_it(llama, llama_chat_dir, tmp_path):
    model, tokenizer = llama
    base = load_policy(str(llama_chat_dir), "float32", torch.device("cpu"))
    lora = peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")  # adapter weights only, no tokenizer
    adapted = load_policy(str(tmp_path / "adapter"), "float32", torch.device("cpu"))
    assert load_policy_tokenizer(str(tmp_path / "adapter")).get_vocab() == tokenizer.get_vocab()  # its base's
    rows = sample_and_measure(adapted, tokenizer, prompt_batches(tokenizer), GEN, seed=0, reference=model)
    assert any(r["kl"] != 0.0 for r in rows)  # the adapter is on
    plain = peft.PeftModel.from_pretrained(load_policy(str(llama_chat_dir), "float32", torch.device("cpu")),
                                           str(tmp_path / "adapter"))
    again = sample_and_measure(plain, tokenizer, prompt_batches(tokenizer), GEN, seed=0, reference=model)
    assert [r["response_ids"] for r in again] == [r["response_ids"] for r in rows]
    assert [r["kl"] for r in again] == pytest.approx([r["kl"] for r in rows], abs=1e-4)
