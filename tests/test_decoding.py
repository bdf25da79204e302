"""The decode loop of the generation engine (prefopt.rl.decoding): its sampler draws from the distribution it claims,
its KV cache is written in place, and every kind of cache layer decodes the same tokens as transformers' own cache.

The engine-level properties (behaviour log-probs equal a teacher-forced forward on every realistic fixture, a prompt
prefilled once equals G copies, seeded draws repeat) are in tests/test_rollout.py and tests/test_rl.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from prefopt.rl.decoding import PreallocatedLayer, draw, sample, sampling_warpers
from prefopt.rl.engine import GenerationConfig, generate
from prefopt.scoring import position_ids
from test_rl import two_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.3, 0, 0.8)])
def test_sample_draws_from_the_warped_softmax(temperature, top_k, top_p):
    """60,000 draws from one row of 6 logits: the frequencies are softmax(z / T) cut to the top k / nucleus p and
    renormalised, as transformers' warpers define it (within 4.5 standard errors)."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    draws = sample(logits.expand(60_000, -1) / temperature, sampling_warpers(top_k, top_p))
    frequency = torch.bincount(draws, minlength=6).double() / len(draws)
    expected = torch.softmax(logits[0].double() / temperature, -1)
    if top_k:
        expected[top_k:] = 0
    if top_p < 1:  # keep the smallest set of most likely tokens whose mass reaches p
        keep = (expected.cumsum(0) - expected) < top_p
        expected = expected * keep
    expected /= expected.sum()
    error = (expected * (1 - expected) / len(draws)).sqrt()
    assert ((frequency - expected).abs() <= 4.5 * error + 1e-12).all(), (frequency, expected)


def test_preallocated_layer_writes_in_place():
    """Keys and values land in one buffer made at the first update; each update returns views of the filled part
    (transformers' DynamicLayer concatenates, copying the whole cache at every token)."""
    layer = PreallocatedLayer(capacity=6)
    first, second = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 1, 5)
    layer.update(first, first + 1)
    buffer = layer.key_buffer.data_ptr()
    keys, values = layer.update(second, second + 1)
    assert keys.data_ptr() == buffer == layer.key_buffer.data_ptr() and layer.get_seq_length() == 5
    torch.testing.assert_close(keys, torch.cat([first, second], 2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([first, second], 2) + 1, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="full"):
        layer.update(torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2, 5))


@pytest.mark.parametrize("fixture", ["gpt2_real_dir", "llama_chat_dir", "qwen2_window_dir"])
def test_greedy_decode_equals_the_models_own_cache(fixture, request):
    """Greedy tokens of the engine (preallocated full-attention layers; Qwen2's sliding-window layers keep their own
    kind) equal a step-by-step loop over transformers' DynamicCache on the repeated prompts."""
    tokenizer, model, batch = two_prompts(request.getfixturevalue(fixture))
    model.eval()
    rollout = generate(model, tokenizer, batch, GenerationConfig(max_new_tokens=20, do_sample=False), num_samples=2)
    ids, mask = (x.repeat_interleave(2, 0) for x in (batch.input_ids, batch.attention_mask))
    cache, tokens = DynamicCache(config=model.config), []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), cache=cache, use_cache=True)
        for _ in range(rollout.response_ids.shape[1]):
            tokens.append(out.logits[:, -1].float().argmax(-1))
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=position_ids(mask)[:, -1:],
                        cache=cache, use_cache=True)
    expected = torch.stack(tokens, 1).masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id)
    assert torch.equal(rollout.response_ids, expected)


@pytest.mark.parametrize("do_sample,temperature,top_k,top_p", [(True, 0.7, 0, 1.0), (True, 1.0, 5, 0.9),
                                                                (False, 1.0, 0, 1.0)])
def test_draw_gives_the_log_prob_of_the_drawn_token_under_the_tempered_softmax(do_sample, temperature, top_k, top_p):
    """``draw``: the token ``sample`` gives from the same uniform variates (the argmax when greedy) and its behaviour
    log-prob log softmax(z / T)[y] computed in float64 (T = 1 when greedy; top-k / top-p do not enter it)."""
    logits = torch.randn(6, 50, dtype=torch.bfloat16) * 4
    gen = GenerationConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    warpers = sampling_warpers(top_k, top_p) if do_sample else []
    torch.manual_seed(1)
    tokens, logprobs = draw(logits, gen, warpers)
    torch.manual_seed(1)
    expected = sample(logits.float() / temperature, warpers) if do_sample else logits.float().argmax(-1)
    assert torch.equal(tokens, expected)
    reference = torch.log_softmax(logits.double() / gen.logprob_temperature, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_draw_refuses_logits_that_are_not_finite_with_the_message_stopping_reads(bad):
    """A diverged policy's nan or +inf logits (in one row) stop the sampling with torch.multinomial's words, which
    prefopt.stopping turns into the exit-3 divergence stop; an entry at -inf (a banned token) is fine."""
    from prefopt.stopping import SAMPLING_NAN

    logits = torch.randn(3, 10)
    logits[0, 4] = -float("inf")
    tokens, logprobs = draw(logits, GenerationConfig(temperature=0.7), [])
    assert (tokens[0] != 4).item() and bool(torch.isfinite(logprobs).all())
    logits[1, 2] = bad
    with pytest.raises(RuntimeError, match=SAMPLING_NAN):
        draw(logits, GenerationConfig(temperature=0.7), [])
