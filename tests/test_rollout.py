"""The generation engine: shapes, EOS masks, behaviour log-probs equal to a teacher-forced forward, seeds."""

from __future__ import annotations

import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers import GenerationConfig as TransformersGenerationConfig

from prefopt.config import DataConfig, ModelConfig
from prefopt.data import build_dataloader, load_rows
from prefopt.errors import ConfigError
from prefopt.models import load_tokenizer
from prefopt.rl import decoding
from prefopt.rl.engine import GenerationConfig, generate, response_mask
from prefopt.rl.rewards import RewardModelReward
from prefopt.scoring import position_ids
from prefopt.types import PromptBatch


pytestmark = pytest.mark.usefixtures("one_thread")


def load(model_dir: Path):
    return load_tokenizer(ModelConfig(name_or_path=str(model_dir))), AutoModelForCausalLM.from_pretrained(model_dir)


@lru_cache(maxsize=1)
def short_hh_records(hh_path: Path) -> tuple[dict, ...]:
    """60 short HH prompt records of increasing length."""
    records = load_rows(DataConfig(path=str(hh_path), format="hh", eval_fraction=0.0), "prompts").train[:200]
    return tuple(sorted(records, key=lambda r: len(r["prompt"]))[:60])


def hh_prompts(tokenizer, hh_path: Path, rows: int = 6) -> PromptBatch:
    """Left-padded short HH prompts of different lengths, from the data layer."""
    records = list(short_hh_records(hh_path)[::10][:rows])
    cfg = DataConfig(path=str(hh_path), format="hh", eval_fraction=0.0)
    loader, _ = build_dataloader(records, "prompts", tokenizer, cfg, batch_size=rows, shuffle=False, seed=0)
    return next(iter(loader))


def teacher_forced_logps(model, rollout, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each response token from ONE plain forward over prompt + response."""
    sequences, mask = rollout.sequences, rollout.attention_mask
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask)).logits
    logps = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    logps = logps.gather(-1, sequences[:, 1:, None]).squeeze(-1)
    return logps[:, rollout.prompt_ids.shape[1] - 1:] * rollout.response_mask


def test_response_mask_keeps_the_first_eos_and_nothing_after():
    eos = [0]
    ids = torch.tensor([[5, 6, 0, 1, 1],  # EOS at 2, then padding
                        [5, 0, 0, 0, 0],  # pad == eos tokenizers: only the first EOS counts
                        [5, 6, 7, 8, 9]])  # cut at max_new_tokens: no EOS
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(response_mask(ids, eos), expected)
    assert torch.equal(response_mask(torch.tensor([[3, 9, 4]]), [9, 4]), torch.tensor([[1, 1, 0]]))


def test_position_ids_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_generate_shapes_masks_texts_and_stats(tiny_model_dir, hh_path):
    tokenizer, model = load(tiny_model_dir)
    batch = hh_prompts(tokenizer, hh_path)
    assert batch.attention_mask[:, 0].min() == 0 and batch.attention_mask[:, -1].min() == 1  # left-padded
    # a random model rarely samples the one real EOS; many EOS ids make most rows stop early
    model.generation_config.eos_token_id = list(range(2, 60))
    gen = GenerationConfig(max_new_tokens=24)
    rollout = generate(model, tokenizer, batch, gen, seed=0)
    B, Tr = rollout.response_ids.shape
    assert B == 6 and Tr <= 24
    assert rollout.prompt_ids is batch.input_ids and rollout.prompts == batch.prompts and rollout.meta == batch.meta
    assert rollout.logprobs.shape == rollout.response_mask.shape == (B, Tr)
    stops = torch.isin(rollout.response_ids, torch.arange(2, 60))
    lengths = rollout.response_mask.sum(-1)
    assert stops.any()  # some row stopped at an EOS
    for i in range(B):
        n = int(lengths[i])
        assert rollout.response_mask[i, :n].all() and not rollout.response_mask[i, n:].any()  # 1...1 0...0
        ended = bool(stops[i, n - 1])
        assert ended or n == gen.max_new_tokens  # a row ends at its first EOS or at the token budget
        assert not stops[i, :n - 1].any()  # no EOS before the last unmasked token
        assert (rollout.response_ids[i, n:] == tokenizer.pad_token_id).all()
        assert (rollout.logprobs[i, n:] == 0).all() and (rollout.logprobs[i, :n] < 0).all()
        assert rollout.responses[i] == tokenizer.decode(rollout.response_ids[i, :n], skip_special_tokens=True)
    assert rollout.new_tokens == int(lengths.sum()) and rollout.seconds > 0 and rollout.tokens_per_s > 0


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_llama_dir", "gpt2_real_dir", "llama_chat_dir",
                                     "qwen2_window_dir"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_a_teacher_forced_forward(fixture, temperature, hh_path, request):
    tokenizer, model = load(request.getfixturevalue(fixture))
    batch = hh_prompts(tokenizer, hh_path)
    rollout = generate(model, tokenizer, batch, GenerationConfig(max_new_tokens=16, temperature=temperature), seed=1)
    expected = teacher_forced_logps(model, rollout, temperature)
    # llama-chat loads as bf16 and computes in it: the KV-cached and the full forward round differently (~3e-3)
    atol = 1e-2 if model.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(rollout.logprobs, expected, atol=atol, rtol=0)


def test_checkpoint_generation_settings_do_not_reshape_the_samples(tiny_model_dir, hh_path):
    """A checkpoint's repetition penalty, n-gram blocking, ... would sample from something other than the policy."""
    tokenizer, model = load(tiny_model_dir)
    batch = hh_prompts(tokenizer, hh_path, rows=4)
    gen = GenerationConfig(max_new_tokens=24)
    plain = generate(model, tokenizer, batch, gen, seed=3)
    model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=30, typical_p=0.2,
                                   suppress_tokens=list(range(2, 200)))
    assert torch.equal(generate(model, tokenizer, batch, gen, seed=3).response_ids, plain.response_ids)


def test_greedy_logprobs_are_at_temperature_one(tiny_model_dir, hh_path):
    tokenizer, model = load(tiny_model_dir)
    batch = hh_prompts(tokenizer, hh_path, rows=3)
    gen = GenerationConfig(max_new_tokens=8, do_sample=False, temperature=0.5)
    rollout = generate(model, tokenizer, batch, gen)
    torch.testing.assert_close(rollout.logprobs, teacher_forced_logps(model, rollout, 1.0), atol=1e-4, rtol=0)
    assert torch.equal(rollout.response_ids, generate(model, tokenizer, batch, gen).response_ids)


def test_seeded_generation_is_reproducible_and_leaves_the_global_rng_alone(tiny_model_dir, hh_path):
    tokenizer, model = load(tiny_model_dir)
    batch = hh_prompts(tokenizer, hh_path, rows=4)
    gen = GenerationConfig(max_new_tokens=12)
    torch.manual_seed(123)
    first = generate(model, tokenizer, batch, gen, seed=7)
    after_first = torch.rand(3)
    torch.manual_seed(123)
    second = generate(model, tokenizer, batch, gen, seed=7)
    assert torch.equal(first.response_ids, second.response_ids) and first.responses == second.responses
    assert torch.equal(torch.rand(3), after_first)  # the seeded draw did not consume the global RNG
    other = generate(model, tokenizer, batch, gen, seed=8)
    assert not torch.equal(first.response_ids[:, :4], other.response_ids[:, :4])
    torch.manual_seed(5)
    unseeded = generate(model, tokenizer, batch, gen)
    torch.manual_seed(5)
    assert torch.equal(unseeded.response_ids, generate(model, tokenizer, batch, gen).response_ids)


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_the_model_mode(tiny_model_dir, hh_path, training):
    tokenizer, model = load(tiny_model_dir)
    model.train(training)
    generate(model, tokenizer, hh_prompts(tokenizer, hh_path, rows=2), GenerationConfig(max_new_tokens=4))
    assert model.training is training


@pytest.mark.parametrize("key, value", [("max_new_tokens", 0), ("temperature", 0.0), ("top_p", 1.5), ("top_k", -1)])
def test_generation_config_is_validated(key, value):
    with pytest.raises(ConfigError, match=f"generation.{key}"):
        GenerationConfig(**{key: value})


def test_every_generation_eos_ends_a_response(llama_chat_dir, hh_path, tmp_path):
    """Llama 3 ends a turn with <|eot_id|>, listed next to the tokenizer's EOS in generation_config.eos_token_id:
    a response ending in it is ended -- mask and padding stop there, and reward components see it as ended (the
    reward model gets EOS appended, as its training rows had)."""
    tokenizer, model = load(llama_chat_dir)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tokenizer.eos_token_id and eot in model.generation_config.eos_token_id
    batch = hh_prompts(tokenizer, hh_path, rows=6)
    with torch.no_grad():  # make <|eot_id|> likely: its output row along the mean final hidden state
        hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mean = hidden[batch.attention_mask.bool()].float().mean(0)
        model.get_output_embeddings().weight[eot] = (5 * mean / mean.norm() ** 2).to(model.dtype)  # logit 5: some rows
    rollout = generate(model, tokenizer, batch, GenerationConfig(max_new_tokens=12), seed=0)
    lengths = rollout.response_mask.sum(-1)
    last = rollout.response_ids.gather(1, (lengths - 1)[:, None])[:, 0]
    at_eot = last == eot
    assert at_eot.any() and not at_eot.all()
    for i in range(len(lengths)):
        n = int(lengths[i])
        assert (rollout.response_ids[i, n:] == tokenizer.pad_token_id).all()  # padding after the end
        assert not (rollout.response_ids[i, :n - 1] == eot).any()  # nothing sampled after an <|eot_id|> counts
    ended = at_eot | (last == tokenizer.eos_token_id)
    assert rollout.ended.tolist() == ended.tolist()

    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(llama_chat_dir, num_labels=1).save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    reward = RewardModelReward(tokenizer, "cpu", path=str(rm_dir))
    seen: list[bool] = []
    encode = reward.encode
    reward.encode = lambda prompt, response, done: seen.append(done) or encode(prompt, response, done)
    reward(rollout)
    assert seen == ended.tolist()


def test_a_checkpoints_generation_config_does_not_reshape_the_samples(gpt2_real_dir, hh_path, tmp_path):
    """A model folder whose generation_config.json forces EOS at the length limit, decays towards EOS, penalises
    repetition, ...: sampling uses the algorithm's settings only, so the samples are those of the same model
    without that file, and the behaviour log-probs are the policy's (a teacher-forced forward)."""
    tokenizer, plain_model = load(gpt2_real_dir)
    folder = tmp_path / "model"
    shutil.copytree(gpt2_real_dir, folder)
    eos = tokenizer.eos_token_id
    TransformersGenerationConfig(
        forced_eos_token_id=eos, exponential_decay_length_penalty=(2, 3.0), repetition_penalty=2.5,
        no_repeat_ngram_size=2, min_new_tokens=4, typical_p=0.3, min_p=0.2, temperature=0.3, top_k=5, top_p=0.5,
        do_sample=True, renormalize_logits=True, forced_bos_token_id=7, bad_words_ids=[[11], [12]], eos_token_id=eos,
    ).save_pretrained(folder)
    _, model = load(folder)
    assert model.generation_config.forced_eos_token_id == eos
    batch = hh_prompts(tokenizer, hh_path, rows=6)
    gen = GenerationConfig(max_new_tokens=10, temperature=0.9)
    rollout = generate(model, tokenizer, batch, gen, seed=4)
    plain = generate(plain_model, tokenizer, batch, gen, seed=4)
    assert torch.equal(rollout.response_ids, plain.response_ids)
    torch.testing.assert_close(rollout.logprobs, teacher_forced_logps(model, rollout, 0.9), atol=1e-4, rtol=0)
    assert model.generation_config.forced_eos_token_id == eos  # the model's own config is left as it was


@pytest.mark.parametrize("repeatable", [True, False])
def test_captured_features_stay_aligned_when_the_prompt_cache_cannot_be_shared(gpt2_real_dir, hh_path, repeatable,
                                                                             monkeypatch):
    """generate(capture=block, num_samples=2) records the block's output at every column; when the model's cache
    cannot be repeated over the G samples (the decode loop gives up after the prompts' forward and prefills the
    repeated prompts), the discarded prefill's output must not shift the recorded columns."""
    tokenizer, model = load(gpt2_real_dir)
    if not repeatable:  # a cache that cannot repeat
        repeated_cache = decoding.repeated_cache
        monkeypatch.setattr(decoding, "repeated_cache", lambda cache, n, width: None if n > 1 else
                            repeated_cache(cache, n, width))
    block = model.transformer.h[-1]
    rollout = generate(model, tokenizer, hh_prompts(tokenizer, hh_path, rows=3), GenerationConfig(max_new_tokens=6),
                       num_samples=2, seed=0, capture=block)
    fresh: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda _m, _a, out: fresh.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model.eval()(rollout.sequences, attention_mask=rollout.attention_mask,
                     position_ids=position_ids(rollout.attention_mask))
    handle.remove()
    attended = rollout.attention_mask.bool()
    torch.testing.assert_close(rollout.hidden[attended], fresh[0][attended], atol=1e-4, rtol=0)
