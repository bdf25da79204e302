"""The Sparrow trunk/top split (prefopt.sparrow) and the rule heads (prefopt.rules), on nano GPT-2 and Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.algorithms.sparrow_heads import fit_head
from prefopt.data.collate import prompt_batch
from prefopt.errors import DataError, PrefoptError
from prefopt.rl.engine import eos_ids
from prefopt.scoring import logps_from_hidden, position_ids
from prefopt.rules import (RULES, RuleBatch, RuleHead, label_rows, programmatic_ok, read_rule_rows, rule_batches,
                           rule_loss)
from prefopt.sparrow import PreferenceHead, SparrowActorCritic, ValueMLP, ValueTop, num_blocks, split_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["gpt2", "llama"])
def model_dir(request, tiny_model_dir, tiny_llama_dir):
    return tiny_model_dir if request.param == "gpt2" else tiny_llama_dir


def left_padded_batch(vocab: int = 500):
    """Three rows: two left-padded, one right-padded at its end; score the last 6 columns."""
    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :2] = 0
    mask[2, 10:] = 0
    score_mask = mask.clone()
    score_mask[:, :6] = 0
    return ids, mask, score_mask


def full_model_logps(lm, ids, mask, score_mask):
    """Reference numbers: the unsplit model's log-probs of token t from position t - 1."""
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    out = torch.zeros(ids.shape)
    out[:, 1:] = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return out * score_mask


def assert_split_reproduces(original, split, ids, mask, score_mask):
    """Policy and reference log-probs (trunk once + each top) equal the unsplit model's; -> (features, entropy)."""
    expected = full_model_logps(original, ids, mask, score_mask)
    features = split.trunk(ids, mask)
    policy_logps, entropy = split.policy(features, ids, score_mask)
    reference_logps, _ = split.reference(features, ids, score_mask, with_entropy=False)
    torch.testing.assert_close(policy_logps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference_logps, expected, atol=1e-5, rtol=0)
    return features, entropy


@pytest.mark.parametrize("trainable_layers", [1, 2])
def test_trunk_plus_top_reproduces_the_full_model(model_dir, trainable_layers):
    """Policy and reference (trunk once + top) give the unsplit model's log-probs, left padding included."""
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    split = split_model(AutoModelForCausalLM.from_pretrained(model_dir), trainable_layers)
    ids, mask, score_mask = left_padded_batch()
    features, entropy = assert_split_reproduces(original, split, ids, mask, score_mask)
    assert not features.hidden.requires_grad and torch.isfinite(features.hidden).all()
    assert float(entropy.detach()[score_mask.bool()].max()) <= math.log(original.config.vocab_size) + 1e-4


@pytest.mark.parametrize("trainable_layers", [1, 2])
def test_trunk_plus_top_keeps_the_sliding_window(qwen2_window_dir, trainable_layers):
    """Qwen2 with a 16-token sliding window on 40-token rows: every block gets the mask the model builds for its
    layer type, so the split model's log-probs are the model's past the window too (a full causal mask there
    was off by ~1 nat)."""
    original = AutoModelForCausalLM.from_pretrained(qwen2_window_dir)
    assert original.config.sliding_window == 16 and set(original.config.layer_types) == {"sliding_attention"}
    split = split_model(AutoModelForCausalLM.from_pretrained(qwen2_window_dir), trainable_layers)
    torch.manual_seed(0)
    ids = torch.randint(5, 500, (3, 40))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding, as in rollouts
    mask[2, 33:] = 0
    score_mask = mask.clone()
    score_mask[:, :10] = 0
    assert_split_reproduces(original, split, ids, mask, score_mask)


def test_generation_of_the_split_model_is_unchanged(model_dir):
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    split = split_model(AutoModelForCausalLM.from_pretrained(model_dir), 1)
    ids, mask, _ = left_padded_batch()
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=1)
    split.lm.eval()
    assert torch.equal(split.lm.generate(ids[:2, :8], attention_mask=mask[:2, :8], **kwargs),
                       original.generate(ids[:2, :8], attention_mask=mask[:2, :8], **kwargs))


def captured_rollout(model_dir, num_samples: int, max_new_tokens: int = 20, eos_logit: float = 3.0):
    """(split model, rollout with the trunk features captured in generation) of eight left-padded chat prompts.

    The policy head gets a bias of ``eos_logit`` on each EOS id, so that rows end at different steps (random
    weights almost never sample EOS): padding after EOS, rows finished early and rows cut at max_new_tokens.
    """
    from prefopt.rl.engine import GenerationConfig, generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = split_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), 1)
    head = split.lm.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    eos = eos_ids(tokenizer, split.lm)
    bias[torch.tensor(eos)] = eos_logit - math.log(len(eos))  # the same EOS mass with one or two EOS ids
    head.bias = nn.Parameter(bias)
    texts = [f"Human: tell me about item {i}{' please' * 3 * (i % 4)}" for i in range(8)]  # 8 rows: some end, some are cut
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = prompt_batch([{"prompt_ids": r, "prompt": t, "meta": {}} for r, t in zip(rows, texts)],
                         tokenizer.pad_token_id)
    rollout = generate(split.lm, tokenizer, batch, GenerationConfig(max_new_tokens=max_new_tokens), num_samples,
                       seed=0, capture=split.trunk.blocks[-1])
    return split, rollout


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("fixture", ["gpt2_real_dir", "llama_chat_dir", "qwen2_window_dir"])
def test_trunk_features_captured_in_generation_equal_a_trunk_pass(fixture, num_samples, request):
    """The trunk output recorded while generating (prompt prefill, once per prompt for its G samples; one column
    per decoding step; one trunk step on the last sampled token) is ``Trunk.forward`` on the sampled sequences at
    every attended position, past qwen2-window's 16-token window too, and 0 where nothing attends."""
    split, rollout = captured_rollout(request.getfixturevalue(fixture), num_samples)
    lengths = rollout.response_mask.sum(-1)
    assert rollout.ended.any() and (lengths < 20).any() and (lengths == 20).any()  # early ends and cut rows
    assert rollout.sequences.shape[1] > 16 + 16
    fresh = split.trunk(rollout.sequences, rollout.attention_mask).hidden
    attended = rollout.attention_mask.bool()
    assert rollout.hidden.shape == fresh.shape
    torch.testing.assert_close(rollout.hidden[attended], fresh[attended], atol=1e-5, rtol=0)
    assert not rollout.hidden[~attended].any()
    captured = split.trunk.as_features(rollout.hidden, rollout.attention_mask)
    ids, mask = rollout.sequences, torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], 1)
    expected = full_model_logps(split.lm, ids, rollout.attention_mask, mask)  # the policy (no trunk split)
    torch.testing.assert_close(split.policy(captured, ids, mask)[0], expected, atol=1e-5, rtol=0)
    reference = split.reference(split.trunk(ids, rollout.attention_mask), ids, mask)[0]  # its head has no bias
    torch.testing.assert_close(split.reference(captured, ids, mask)[0], reference, atol=1e-5, rtol=0)
    # the sampling-time log-probs: the same policy, token by token with the KV cache
    torch.testing.assert_close(expected[:, rollout.prompt_ids.shape[1]:], rollout.logprobs, atol=1e-5, rtol=0)


def test_capturing_a_module_outside_the_model_is_refused(tiny_model_dir):
    from prefopt.rl.engine import GenerationConfig, generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = prompt_batch([{"prompt_ids": [5, 6, 7], "prompt": "x", "meta": {}}], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="Linear is not a module of the generating model"):
        generate(lm, tokenizer, batch, GenerationConfig(max_new_tokens=2), capture=nn.Linear(2, 2))


def mlp_widths(*tops) -> list[int]:
    """A list that records the number of columns entering the MLP of each top's last block, call by call."""
    widths: list[int] = []
    for top in tops:
        top.blocks[-1].mlp.register_forward_hook(lambda module, args, output: widths.append(args[0].shape[1]))
    return widths


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("fixture", ["gpt2_real_dir", "llama_chat_dir", "qwen2_window_dir"])
def test_tops_compute_only_the_columns_they_need(fixture, padded, request):
    """A top's last block run from column ``start`` (the columns before it only as keys and values) gives the full
    top's outputs there and the same gradients; the policy log-probs, values and reward heads use it. Its MLP sees
    only the columns start.., with left/right padding and without (where transformers builds no mask for SDPA,
    the whole block used to run); qwen2-window's 40 columns are past its 16-token window."""
    model_dir = request.getfixturevalue(fixture)
    split = split_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), 2)
    torch.manual_seed(0)
    ids = torch.randint(5, 500, (3, 40))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :7] = 0  # left padding, as in rollouts; row 2 ends early (right padding)
        mask[2, 33:] = 0
    score_mask = mask.clone()
    score_mask[:, :22] = 0
    features = split.trunk(ids, mask)
    assert (features.masks[split.policy.top.types[-1]] is None) == (not padded and "qwen2" not in fixture)
    top = split.policy.top
    value = ValueTop(split.copy_top(True), split.hidden_size)
    head = PreferenceHead(split.copy_top(), split.hidden_size)  # from column 32 (row 2's last token) or 39
    widths = mlp_widths(top, value.top, head.top)
    full = top(features)
    for start in (1, 21, 39):
        torch.testing.assert_close(top(features, start), full[:, start:], atol=1e-5, rtol=0)
    assert widths == [40, 39, 19, 1]
    logps, _ = split.policy(features, ids, score_mask)  # from column 21
    assert widths[-1] == 19
    expected, _ = logps_from_hidden(top(features), split.policy.head, ids, score_mask, with_entropy=False)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    grads = [torch.autograd.grad(x.sum(), list(top.parameters())) for x in (logps, expected)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.nn.init.normal_(value.head.weight)
    del widths[:]
    _, _, values = SparrowActorCritic(split.policy, value)(features, ids, score_mask)
    assert widths == [19, 19]  # the policy's top, then the value's
    state_values = value.head(value.top(features)).squeeze(-1)
    torch.testing.assert_close(values[:, 22:], (state_values[:, 21:-1] * score_mask[:, 22:]).detach(), atol=1e-5,
                               rtol=0)
    torch.nn.init.normal_(head.score.weight)
    last = torch.tensor([39, 39, 32] if padded else [39, 39, 39])
    expected = head.score(head.top(features)[torch.arange(3), last]).squeeze(-1)
    del widths[:]
    torch.testing.assert_close(head(features), expected, atol=1e-5, rtol=0)
    assert widths == [40 - int(last.min())]


def test_only_the_top_trains_and_the_tied_head_is_untied(tiny_model_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert lm.lm_head.weight is lm.transformer.wte.weight  # the tiny GPT-2 ties its head
    split = split_model(lm, 1)
    trainable = {name for name, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in lm.named_parameters()
                         if name.startswith(("transformer.h.1.", "transformer.ln_f.", "lm_head."))}
    assert lm.lm_head.weight is not lm.transformer.wte.weight  # the policy trains its own output embedding
    assert split.reference.head.weight is lm.transformer.wte.weight  # the reference reads the frozen one: no copy
    assert all(not p.requires_grad for p in split.reference.parameters())
    assert all(not p.requires_grad for p in split.trunk.parameters())
    assert lm.config.tie_word_embeddings is False


def test_frozen_lm_head_stays_shared(tiny_model_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    split = split_model(lm, 1, train_lm_head=False)
    assert split.policy.head is split.reference.head and not lm.lm_head.weight.requires_grad
    assert lm.lm_head.weight is lm.transformer.wte.weight


def test_trainable_layers_out_of_range(tiny_model_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert num_blocks(lm) == 2
    with pytest.raises(PrefoptError, match="trainable_layers=3.*choose 1..2"):
        split_model(lm, 3)


def test_saved_policy_loads_as_a_plain_transformers_model(tiny_model_dir, tmp_path):
    split = split_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 1)
    with torch.no_grad():
        split.lm.lm_head.weight.add_(0.5)  # as if trained: the untied head must be saved on its own
    split.lm.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask, score_mask = left_padded_batch()
    torch.testing.assert_close(full_model_logps(loaded, ids, mask, score_mask),
                               full_model_logps(split.lm, ids, mask, score_mask))


def test_heads_are_independent_copies_with_zero_initial_scores(tiny_model_dir):
    split = split_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 1)
    ids, mask, score_mask = left_padded_batch()
    features = split.trunk(ids, mask)
    head = PreferenceHead(split.copy_top(), split.hidden_size)
    assert torch.equal(head(features), torch.zeros(3))
    policy_params = {id(p) for p in split.policy.parameters()}
    assert not policy_params & {id(p) for p in head.top.parameters()}
    for value in (ValueMLP(split.hidden_size, 32), ValueTop(split.copy_top(True), split.hidden_size)):
        model = SparrowActorCritic(split.policy, value)
        logps, entropy, values = model(features, ids, score_mask)
        assert logps.shape == entropy.shape == values.shape == ids.shape
        assert torch.equal(values, torch.zeros_like(values))  # zero-initialised last layer
        assert torch.equal(values != 0, torch.zeros_like(values, dtype=torch.bool))


def test_preference_head_learns_a_keyword_on_the_frozen_trunk(tiny_model_dir):
    """Bradley-Terry + centering on the trunk: responses with a marker word are preferred."""
    from prefopt.algorithms.reward import ranking_loss
    from prefopt.types import RankBatch

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    split = split_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 1)
    head = PreferenceHead(split.copy_top(), split.hidden_size)
    good = [f"Human: question {i}? Assistant: thanks, happy to help" for i in range(8)]
    bad = [f"Human: question {i}? Assistant: no way" for i in range(8)]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in good + bad]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    batch = RankBatch(ids, mask, pairs=torch.tensor([[i, i + 8] for i in range(8)]), pair_group=torch.arange(8))
    trunk_before = [p.clone() for p in split.trunk.parameters()]
    history = fit_head(split.trunk, head, [batch], lambda s, b: ranking_loss(s, b, 0.01), steps=30, lr=3e-3)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero scores: -log sigmoid(0)
    assert history[-1]["rm/accuracy"] == 1.0 and history[-1]["loss"] < 0.2
    assert all(torch.equal(a, b) for a, b in zip(trunk_before, split.trunk.parameters()))
    assert not any(p.requires_grad for p in head.parameters())  # frozen again after fitting


# ------------------------------------------------------------------------------------------------ rules


def test_programmatic_rules_by_hand():
    prompts = ["\n\nHuman: hi\n\nAssistant:"] * 4
    responses = [" Hello!", " Sure.\n\nHuman: and then?", " See https://example.com", " mail me: a.b@c.org"]
    ok = programmatic_ok(["no_new_human_turn", "no_url", "no_email"], prompts, responses)
    assert ok["no_new_human_turn"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert ok["no_url"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert ok["no_email"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert {"no_new_human_turn", "no_url", "no_email"} <= set(RULES.available())


def test_rule_rows_group_by_text_with_a_label_mask(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = label_rows([("Q:", " see www.x.com"), ("Q:", " fine")], ["no_url", "no_new_human_turn"])
    rows.append({"text": "Q: fine", "rule": "other_rule", "violated": True})  # not a rule of this head: left out
    path = tmp_path / "rules.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_rule_rows(path) == rows
    (batch,) = rule_batches(read_rule_rows(path), ["no_url", "no_email", "no_new_human_turn"], tokenizer,
                            batch_size=8, max_length=64)
    order = [tokenizer.decode(row[m.bool()][:-1]) for row, m in zip(batch.input_ids, batch.attention_mask)]
    url_row = order.index("Q: see www.x.com")
    assert batch.labels[url_row].tolist() == [1.0, 0.0, 0.0]
    assert batch.label_mask.tolist() == [[1.0, 0.0, 1.0]] * 2  # no_email has no rows
    assert (batch.input_ids[batch.attention_mask.bool()] == tokenizer.eos_token_id).sum() == 2  # EOS appended
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "rule": "no_url", "violated": "yes"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_rule_rows(bad)


def test_rule_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    batch = RuleBatch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), labels=torch.tensor([[1.0, 0.0],
                      [0.0, 1.0]]), label_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    loss, metrics = rule_loss(logits, batch)
    expected = (math.log(2) + math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(-1.0))) / 3
    assert float(loss) == pytest.approx(expected)
    assert float(metrics["rules/accuracy"]) == pytest.approx(1 / 3)  # only (row 1, rule 0) is right at P = 0.5


def test_rule_head_learns_a_programmatic_rule(tiny_model_dir):
    """Labels from ``no_url`` train the multi-label head; P(not violated) then separates the two kinds of text."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    split = split_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 1)
    names = ["no_url", "no_new_human_turn"]
    dialogues = [(f"\n\nHuman: where is item {i}?\n\nAssistant:", f" look at https://shop{i}.com/item")
                 for i in range(12)]
    dialogues += [(f"\n\nHuman: where is item {i}?\n\nAssistant:", f" it is in box {i}.\n\nHuman: ok")
                  for i in range(12)]
    batches = rule_batches(label_rows(dialogues, names), names, tokenizer, batch_size=8, max_length=64)
    head = RuleHead(split.copy_top(), split.hidden_size, names)
    history = fit_head(split.trunk, head, batches, rule_loss, steps=40, lr=3e-3)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        probs = torch.cat([head.p_not_violated(split.trunk(b.input_ids, b.attention_mask)) for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert ((probs < 0.5) == labels.bool()).float().mean() == 1.0
