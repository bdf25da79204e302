"""The online core: scoring on any padding, the engine's groups, advantage estimators and policy losses by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefopt.config import ModelConfig, build_run_config
from prefopt.errors import ConfigError
from prefopt.models import load_tokenizer
from prefopt.registry import ADVANTAGES, POLICY_LOSSES
from prefopt.rl.advantages import AdvantageInputs
from prefopt.rl.algorithm import OnlineConfig
from prefopt.rl.decoding import prefill
from prefopt.rl.engine import GenerationConfig, generate, repeat_prompts, rollout_inputs
from prefopt.rl.losses import PolicyLossInputs
from prefopt.scoring import TokenScorer, grouped_token_logps, token_logps
from prefopt.tasks import TASK_REWARD
from prefopt.types import PromptBatch

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("fixture", ["gpt2_real_dir", "llama_chat_dir"])
def test_token_logps_of_a_left_padded_row_equal_the_row_alone(fixture, request):
    """Positions come from the attention mask: padding on the left changes nothing (absolute and rotary positions)."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32).eval()
    row = torch.tensor([[11, 40, 7, 99, 23, 5, 61]])
    padded = torch.cat([torch.full((1, 3), 2), row], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(row)], 1)
    score_mask = mask.clone()
    score_mask[:, 3] = 0  # the first real token has nothing before it to be predicted from
    with torch.no_grad():
        alone, alone_entropy = token_logps(model, row, torch.ones_like(row), torch.ones_like(row), with_entropy=True)
        left, left_entropy = token_logps(model, padded, mask, score_mask, with_entropy=True)
    torch.testing.assert_close(left[:, 3:][:, 1:], alone[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(left_entropy[:, 4:], alone_entropy[:, 1:], atol=1e-5, rtol=0)
    assert (left[:, :4] == 0).all()  # padding and the first real token are not scored


# ----------------------------------------------------------------------------------------- engine


def test_engine_samples_g_responses_per_prompt_with_group_ids(gpt2_real_dir):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(gpt2_real_dir)))
    model = AutoModelForCausalLM.from_pretrained(gpt2_real_dir)
    texts = ["\n\nHuman: hi there\n\nAssistant:", "\n\nHuman: what is the weather like today?\n\nAssistant:"]
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    batch = PromptBatch(encoded["input_ids"], encoded["attention_mask"], texts, [{"id": 0}, {"id": 1}])
    rollout = generate(model, tokenizer, batch, GenerationConfig(max_new_tokens=6), num_samples=3, seed=0)
    assert rollout.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert rollout.prompts == [texts[0]] * 3 + [texts[1]] * 3 and [m["id"] for m in rollout.meta] == [0] * 3 + [1] * 3
    assert torch.equal(rollout.prompt_ids, batch.input_ids.repeat_interleave(3, 0))
    assert len({tuple(r) for r in rollout.response_ids[:3].tolist()}) > 1  # the samples of one prompt differ
    score_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], 1)
    with torch.no_grad():
        logps, _ = token_logps(model.eval(), rollout.sequences, rollout.attention_mask, score_mask)
    torch.testing.assert_close(logps[:, rollout.prompt_ids.shape[1]:], rollout.logprobs, atol=1e-4, rtol=0)


def two_prompts(model_dir):
    """Tokenizer, fp32 model and a left-padded batch of two prompts of different lengths."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = ["\n\nHuman: hi there, how are you doing today?\n\nAssistant:", "\n\nHuman: what?\n\nAssistant:"]
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    return tokenizer, model, PromptBatch(encoded["input_ids"], encoded["attention_mask"], texts, [{}, {}])


@pytest.mark.parametrize("fixture", ["gpt2_real_dir", "llama_chat_dir", "qwen2_window_dir"])
def test_a_prompt_prefilled_once_for_its_samples_gives_the_same_draw(fixture, request):
    """The prompts' KV cache computed once and repeated G times: the same tokens and log-probs as G copies."""
    tokenizer, model, batch = two_prompts(request.getfixturevalue(fixture))
    gen = GenerationConfig(max_new_tokens=24)
    with torch.no_grad():  # this model's cache is shared
        assert prefill(model, batch.input_ids, batch.attention_mask, 3, batch.input_ids.shape[1] + 24) is not None
    once = generate(model, tokenizer, batch, gen, num_samples=3, seed=5)
    copies = generate(model, tokenizer, repeat_prompts(batch, 3), gen, seed=5)
    assert torch.equal(once.response_ids, copies.response_ids)
    torch.testing.assert_close(once.logprobs, copies.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["gpt2_real_dir", "llama_chat_dir"])
def test_the_samples_of_a_prompt_share_its_forward_with_the_same_logps(fixture, request):
    """Left-padded prompts, G = 3 responses each: scoring with the prompt once per group changes nothing."""
    tokenizer, model, batch = two_prompts(request.getfixturevalue(fixture))
    rollout = generate(model, tokenizer, batch, GenerationConfig(max_new_tokens=9), num_samples=3, seed=0)
    scorer = TokenScorer(model.eval())
    inputs = rollout_inputs(rollout)
    with torch.no_grad():
        plain = grouped_token_logps(scorer, *inputs, group=None, temperature=0.7, with_entropy=True)
        shared = grouped_token_logps(scorer, *inputs, group=rollout.group, temperature=0.7, with_entropy=True)
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=0)
    assert (plain[0][:, rollout.prompt_ids.shape[1]:] != 0).any()


# ----------------------------------------------------------------------------------------- advantages


def sequence_inputs(rewards: list[float], groups: list[int]) -> AdvantageInputs:
    """One reward per row, at the last of 2 response tokens (the first token carries a KL term of -0.1 + 0.1)."""
    per_token = torch.tensor([[-0.1, r + 0.1] for r in rewards])
    return AdvantageInputs(per_token, torch.ones_like(per_token), torch.tensor(groups))


@pytest.mark.parametrize("scale, expected", [
    ("none", [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]),
    # group 0: std(1, 0, 0, 1) = sqrt(1/3) (unbiased); group 1 has std 0, so its advantages are 0 / 1e-4 = 0
    ("group", [a * 0.5 / (3 ** -0.5 + 1e-4) for a in (1, -1, -1, 1)] + [0.0] * 4),
    # batch std of (1, 0, 0, 1, 2, 2, 2, 2): mean 1.25, sum of squares 5.5, / 7 -> 0.886405
    ("batch", [a * 0.5 / (0.886405 + 1e-4) for a in (1, -1, -1, 1)] + [0.0] * 4)])
def test_grpo_advantages_by_hand(scale, expected):
    cfg = OnlineConfig(scale_rewards=scale)
    inputs = sequence_inputs([1, 0, 0, 1, 2, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1])
    advantages, _ = ADVANTAGES.get("grpo")(inputs, cfg)
    expected = torch.tensor(expected)
    torch.testing.assert_close(advantages, expected[:, None].expand(8, 2), atol=1e-5, rtol=0)


def test_rloo_advantages_are_leave_one_out():
    # group 0 (1, 0, 0, 1): the baseline of a 1 is (0 + 0 + 1) / 3, of a 0 is (1 + 0 + 1) / 3; group 1 (3, 0, 6)
    inputs = sequence_inputs([1, 0, 0, 1, 3, 0, 6], [0, 0, 0, 0, 5, 5, 5])
    advantages, _ = ADVANTAGES.get("rloo")(inputs, OnlineConfig(scale_rewards="none"))
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 3 - 3.0, 0 - 4.5, 6 - 1.5])
    torch.testing.assert_close(advantages[:, 0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        ADVANTAGES.get("rloo")(sequence_inputs([1, 2], [0, 1]), OnlineConfig())


def test_reinforce_pp_advantages_are_globally_normalised_returns_to_go():
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 0.5, 9.0]])  # 9.0 sits on padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = ADVANTAGES.get("reinforce_pp")(AdvantageInputs(rewards, mask, torch.arange(2)),
                                                         OnlineConfig(gamma=1.0))
    # returns to go: (0.8, 0.9, 1.0), (0.3, 0.5); mean 0.7, unbiased std sqrt(0.34 / 4) = 0.291548
    torch.testing.assert_close(returns, torch.tensor([[0.8, 0.9, 1.0], [0.3, 0.5, 0.0]]))
    expected = torch.tensor([[0.1, 0.2, 0.3], [-0.4, -0.2, 0.0]]) / 0.291548
    torch.testing.assert_close(advantages, expected * mask, atol=1e-4, rtol=0)


def test_mc_advantages_subtract_the_critic():
    rewards, mask = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25], [1.0, 7.0]])
    advantages, returns = ADVANTAGES.get("mc")(AdvantageInputs(rewards, mask, torch.arange(2), values),
                                               OnlineConfig(gamma=0.5))
    torch.testing.assert_close(returns, torch.tensor([[0.5, 1.0], [2.0, 0.0]]))  # G_0 = 0 + 0.5 * 1
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.75], [1.0, 0.0]]))


# ----------------------------------------------------------------------------------------- policy losses


def test_clip_higher_and_the_clip_fraction_by_hand():
    ratio = torch.tensor([[1.25, 0.7, 1.1], [0.9, 1.5, 1.0]])
    advantages = torch.tensor([[1.0, -1.0, 2.0], [-2.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    inputs = PolicyLossInputs(ratio.log(), torch.zeros_like(ratio), advantages, mask, max_new_tokens=4)
    # eps_low 0.2, eps_high 0.28: -min(rho A, clip(rho, 0.8, 1.28) A) per token
    #   1.25 * 1 (inside)             -> -1.25      0.7, A -1: -min(-0.7, -0.8) = 0.8 (clipped low)
    #   1.1 * 2                       -> -2.2       0.9, A -2: -min(-1.8, -1.8) = 1.8
    #   1.5, A 1: -min(1.5, 1.28) = -1.28 (clipped high)
    per_token = torch.tensor([[-1.25, 0.8, -2.2], [1.8, -1.28, 0.0]])
    cfg = OnlineConfig(epsilon=0.2, epsilon_high=0.28)
    loss, metrics = POLICY_LOSSES.get("bnpo")(inputs, cfg)
    torch.testing.assert_close(loss, per_token.sum() / 5)
    torch.testing.assert_close(metrics["clip_fraction"], torch.tensor(2 / 5))
    loss, _ = POLICY_LOSSES.get("grpo")(inputs, cfg)
    torch.testing.assert_close(loss, (per_token[0].sum() / 3 + per_token[1].sum() / 2) / 2)
    loss, _ = POLICY_LOSSES.get("dr_grpo")(inputs, cfg)
    torch.testing.assert_close(loss, per_token.sum() / (2 * 4))
    loss, metrics = POLICY_LOSSES.get("bnpo")(inputs, OnlineConfig(epsilon=0.2))  # symmetric: 1.25 is clipped too
    assert float(metrics["clip_fraction"]) == pytest.approx(3 / 5)


def test_online_config_names_are_checked():
    with pytest.raises(ConfigError, match="algorithm.loss_type"):
        OnlineConfig(loss_type="grpp")
    with pytest.raises(ConfigError, match="algorithm.advantage"):
        build_run_config({"algorithm": {"name": "grpo", "advantage": "nope"}})
    with pytest.raises(ConfigError, match="kl_in"):
        build_run_config({"algorithm": {"name": "rloo", "kl_in": "both"}})
    cfg = build_run_config({"algorithm": {"name": "rloo", "rewards": [TASK_REWARD], "num_samples": 2}}).algorithm
    assert (cfg.advantage, cfg.loss_type, cfg.kl_in, cfg.num_samples) == ("rloo", "sequence", "reward", 2)


@pytest.mark.parametrize("algorithm, field, fixed", [
    ({"name": "grpo", "num_samples": 1}, "algorithm.num_samples", {"num_samples": 2}),  # every advantage 0
    ({"name": "rloo", "num_samples": 1}, "algorithm.num_samples", {"num_samples": 2}),  # no sample to compare with
    ({"name": "grpo", "advantage": "rloo"}, "algorithm.scale_rewards", {"scale_rewards": "batch"}),  # was "none"
    ({"name": "grpo", "n_step": -1}, "algorithm.n_step", {"n_step": 2}),
    ({"name": "rloo", "kl_in": "loss", "kl_coef": 0.1}, "algorithm.kl_in", {"kl_coef": 0.0}),  # sequence: no k3 term
    ({"name": "rloo", "top_entropy_quantile": 0.2}, "algorithm.top_entropy_quantile",  # sequence: no token mask
     {"top_entropy_quantile": 1.0}),
])
def test_online_config_refuses_settings_that_would_train_silently_wrong(algorithm, field, fixed):
    with pytest.raises(ConfigError, match=field):
        build_run_config({"algorithm": {"rewards": [TASK_REWARD], **algorithm}})
    build_run_config({"algorithm": {"rewards": [TASK_REWARD], **algorithm, **fixed}})


@pytest.mark.parametrize("advantage", ["gae", "nstep"])
def test_a_critic_free_algorithm_refuses_a_critic_estimator(advantage):
    with pytest.raises(ConfigError, match="algorithm.advantage='.*needs a critic"):  # step 1 failed before
        build_run_config({"algorithm": {"name": "grpo", "rewards": [TASK_REWARD], "advantage": advantage}})
    build_run_config({"algorithm": {"name": "grpo", "rewards": [TASK_REWARD], "advantage": "mc"}})


def test_an_estimator_declares_what_the_config_must_give_it():
    """A new estimator says it compares the samples of a prompt, or reads a critic, or takes some scale_rewards; the
    online config refuses what would make it silently wrong, with no estimator named in the skeleton (it knew three
    built-in names: a plugin group estimator ran at num_samples 1 with every advantage 0)."""
    from prefopt.rl.advantages import estimator

    @estimator("test_group_mean", needs_groups=True, scale_rewards=("none",))
    def group_mean_baseline(inputs, cfg):
        return inputs.rewards, None

    @estimator("test_critic_baseline", needs_critic=True)
    def critic_baseline(inputs, cfg):
        return inputs.rewards, None

    base = {"name": "grpo", "rewards": [TASK_REWARD], "scale_rewards": "none"}
    try:
        with pytest.raises(ConfigError, match="algorithm.num_samples=1: advantage=test_group_mean compares"):
            build_run_config({"algorithm": {**base, "advantage": "test_group_mean", "num_samples": 1}})
        with pytest.raises(ConfigError, match="algorithm.scale_rewards='group': advantage=test_group_mean takes none"):
            build_run_config({"algorithm": {**base, "advantage": "test_group_mean", "scale_rewards": "group"}})
        build_run_config({"algorithm": {**base, "advantage": "test_group_mean", "num_samples": 2}})
        with pytest.raises(ConfigError, match="algorithm.advantage='test_critic_baseline': needs a critic"):
            build_run_config({"algorithm": {**base, "advantage": "test_critic_baseline"}})
    finally:
        for name in ("test_group_mean", "test_critic_baseline"):
            ADVANTAGES._entries.pop(name)


def test_minibatches_keep_the_samples_of_a_prompt_together():
    """num_minibatches > 1 with G = 4: whole groups are shuffled, so each minibatch holds whole prompts (and scores
    each prompt once with prefix sharing); every row is used once per pass and the minibatch sizes are unchanged."""
    from prefopt.rl.algorithm import minibatches

    group = torch.arange(6).repeat_interleave(4)  # 6 prompts x G = 4
    torch.manual_seed(0)
    parts = list(minibatches(24, 3, 3, "cpu", group=group))
    assert [len(p) for p in parts] == [8] * 9
    for start in (0, 3, 6):
        assert sorted(torch.cat(parts[start:start + 3]).tolist()) == list(range(24))
    for part in parts:
        assert all((group[part] == g).sum() == 4 for g in group[part].unique())
    assert len({tuple(group[p].unique().tolist()) for p in parts}) > 3  # shuffled across passes
