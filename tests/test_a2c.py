"""A2C (Sparrow): the loss by hand, the shared trunk run once per step, frozen parts without gradients,
the Trainer end to end, and (slow) learning the known-reward task of prefopt.tasks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from prefopt.algorithms.a2c import A2C, HEADS_FILE, A2CConfig, TrunkScored
from prefopt.config import build_run_config, describe_fields, load_config
from prefopt.data.collate import prompt_batch
from prefopt.errors import ConfigError
from prefopt.models import load_tokenizer
from prefopt.rl.advantages import discounted_returns, nstep_returns
from prefopt.rl.algorithm import MicroBatch, OnlineConfig
from prefopt.rl.kl import kl_shaped_rewards
from prefopt.rules import label_rows
from prefopt.tasks import write_task_prompts
from prefopt.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ the math


def test_nstep_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[10.0, 20.0, 30.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # n = 1: r_t + 0.5 V_{t+1};  n = 2: r_t + 0.5 r_{t+1} + 0.25 V_{t+2};  V past the end is 0
    assert nstep_returns(rewards, values, mask, 0.5, 1).tolist() == [[11.0, 17.0, 3.0, 0.0]]
    assert nstep_returns(rewards, values, mask, 0.5, 2).tolist() == [[9.5, 3.5, 3.0, 0.0]]
    assert nstep_returns(rewards, values, mask, 0.5, 0).tolist() == [[2.75, 3.5, 3.0, 0.0]]  # Monte-Carlo
    assert torch.equal(nstep_returns(rewards, values, mask, 0.5, 9), discounted_returns(rewards, mask, 0.5))


def hand_scored(**algorithm) -> tuple[A2C, TrunkScored, torch.Tensor, torch.Tensor]:
    """An A2C (not built: its stages below need no model) and a scored rollout of one response of two tokens (and
    one pad), written by hand as A2C's score stage leaves it: k1 KL 0.1, 0.2; R = 1; per-token rewards with the
    KL shaping of kl_in/kl_coef computed here, not by prefopt."""
    run = build_run_config({"algorithm": {"name": "a2c", "whiten_advantages": False, **algorithm}})
    a2c = A2C(run.algorithm, run, None)
    logps = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    values = torch.tensor([[0.5, 0.25, 0.0]], requires_grad=True)
    entropy = torch.tensor([[1.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.0]])
    beta = run.algorithm.kl_coef if run.algorithm.kl_in == "reward" else 0.0
    rewards = torch.tensor([[-beta * 0.1, -beta * 0.2 + 1.0, 0.0]])
    rollout = SimpleNamespace(group=torch.tensor([0]), logprobs=logps.detach().clone(), seconds=0.0,
                              tokens_per_s=0.0, ended=torch.tensor([True]))
    scored = TrunkScored(rollout=rollout, mask=mask, old_logps=None, ref_logps=logps.detach() - kl,
                         scores=torch.tensor([1.0]), components={}, kl=kl, rewards=rewards, kl_coef=beta,
                         values=values.detach(), forward=(logps, entropy, values))
    return a2c, scored, logps, values


def a2c_update_loss(a2c: A2C, scored: TrunkScored) -> tuple[torch.Tensor, dict[str, float]]:
    """A2C's own advantages and loss stages on the whole rollout (one micro-batch, as training runs it)."""
    advantages = a2c.advantages(scored)
    return a2c.loss(scored, advantages, MicroBatch(torch.arange(1), 0, 1, float(scored.mask.sum()),
                                                   float(scored.mask.sum())))


def test_a2c_loss_by_hand():
    """r = [-0.5*0.1, -0.5*0.2 + 1] = [-0.05, 0.9]; gamma = lam = 1: G = [0.85, 0.9], A = G - V = [0.35, 0.65].

    policy = -(0.35 * -1 + 0.65 * -2) / 2 = 0.825; value = 0.5 * (0.35^2 + 0.65^2) / 2 = 0.13625;
    entropy = 1.5; loss = 0.825 + 1 * 0.13625 - 0.1 * 1.5 = 0.81125. No ratio: dL/dlogp = -A / 2.
    """
    knobs = {"kl_coef": 0.5, "gamma": 1.0, "lam": 1.0, "vf_coef": 1.0, "entropy_coef": 0.1}
    a2c, scored, logps, values = hand_scored(**knobs)
    # the score stage's KL shaping gives the rewards written by hand
    torch.testing.assert_close(kl_shaped_rewards(scored.scores, scored.kl, scored.mask, 0.5), scored.rewards)
    loss, metrics = a2c_update_loss(a2c, scored)
    torch.testing.assert_close(scored.returns, torch.tensor([[0.85, 0.9, 0.0]]))
    assert float(loss.detach()) == pytest.approx(0.81125)
    assert metrics["loss/policy"] == pytest.approx(0.825)
    assert metrics["loss/value"] == pytest.approx(0.13625)
    assert metrics["entropy"] == pytest.approx(1.5)
    rollout_metrics = a2c.rollout_metrics(scored)
    assert rollout_metrics["kl"] == pytest.approx(0.3)
    assert rollout_metrics["reward/total"] == pytest.approx(1.0 - 0.5 * 0.3)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.175, -0.325, 0.0]]))
    torch.testing.assert_close(values.grad, torch.tensor([[-0.175, -0.325, 0.0]]))  # (V - G) / 2
    # n-step with n = 0 (Monte-Carlo) gives the same targets as GAE with lambda = 1
    nstep, _ = a2c_update_loss(*hand_scored(**{**knobs, "advantage": "nstep", "lam": 0.5})[:2])
    assert float(nstep.detach()) == pytest.approx(0.81125)
    # whitened over the response tokens: A = [0.35, 0.65], mean 0.5, unbiased std sqrt(2 * 0.15^2) -> -+ 1/sqrt(2)
    a2c, scored, _, _ = hand_scored(**knobs, whiten_advantages=True)
    torch.testing.assert_close(a2c.advantages(scored), torch.tensor([[-0.70710678, 0.70710678, 0.0]]))


def test_kl_as_a_loss_term_adds_beta_k3():
    no_kl, _ = a2c_update_loss(*hand_scored(kl_coef=0.0)[:2])
    as_loss, _ = a2c_update_loss(*hand_scored(kl_coef=0.5, kl_in="loss")[:2])
    k3 = [math.exp(-x) - 1 + x for x in (0.1, 0.2)]
    assert float((as_loss - no_kl).detach()) == pytest.approx(0.5 * sum(k3) / 2, rel=1e-5)


def test_config_checks():
    with pytest.raises(ConfigError, match="algorithm.trainable_layers"):
        A2CConfig(trainable_layers=0)
    with pytest.raises(ConfigError, match="algorithm.lam"):
        A2CConfig(lam=1.5)


@pytest.mark.parametrize("key, value", [("num_samples", 4), ("epochs", 2), ("num_minibatches", 2),
                                        ("loss_type", "grpo"), ("epsilon", 0.1), ("prefix_sharing", True)])
def test_knobs_a2c_fixes_are_refused_and_unlisted(key, value):
    """A2CConfig is an OnlineConfig whose on-policy, one-update knobs are pinned: a recipe cannot set them, and
    ``prefopt list`` shows only the knobs a recipe may set, each with its docstring."""
    with pytest.raises(ConfigError, match=f"algorithm.{key}"):
        build_run_config({"algorithm": {"name": "a2c", key: value}})
    listed = {name: doc for name, _, _, doc in describe_fields(A2CConfig)}
    assert key not in listed and all(listed.values())
    assert {"gamma", "lam", "n_step", "entropy_coef", "kl_coef", "kl_in", "whiten_advantages", "vf_coef"} <= set(listed)


@pytest.mark.parametrize("name", ["a2c_hh_tiny.yaml", "a2c_known_reward.yaml"])
def test_recipes_validate(name):
    config = load_config(RECIPES / name)
    assert config.algorithm_name == "a2c" and config.algorithm.trainable_layers >= 1


# ------------------------------------------------------------------------------------------------ the shared trunk


def write_rule_rows(path: Path) -> Path:
    dialogues = [("\n\nHuman: a link?\n\nAssistant:", f" https://site{i}.org") for i in range(4)]
    dialogues += [("\n\nHuman: a link?\n\nAssistant:", f" no, sorry {i}") for i in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in label_rows(dialogues, ["no_url"])))
    return path


def sparrow_run(model_dir: Path, hh_path: Path, tmp_path: Path, **algorithm):
    """A run with every reward term: preference head, a learned and a programmatic rule, two components."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return build_run_config({
        "algorithm": {"name": "a2c", "trainable_layers": 1, "generation": {"max_new_tokens": 6},
                      "preference_steps": 2, "rule_steps": 2, "rule_data": str(write_rule_rows(tmp_path / "r.jsonl")),
                      "rules": {"no_url": 1.0, "no_new_human_turn": 0.5},
                      "rewards": [{"name": "length_penalty", "weight": 1.0, "params": {"target": 4}},
                                  {"name": "format_validity", "weight": 0.5}], **algorithm},
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(hh_path), "max_examples": 16, "eval_fraction": 0.01, "max_length": 128,
                 "max_prompt_length": 96},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "eval_batch_size": 4, "max_steps": 2,
                  "max_eval_batches": 1, "progress": False, "log_every": 1},
    })


def built_a2c(run) -> A2C:
    tokenizer = load_tokenizer(run.model)
    algorithm = A2C(run.algorithm, run, tokenizer)
    algorithm.build()
    algorithm.setup(Accelerator(cpu=True), {})
    return algorithm


def prompts(tokenizer, n: int = 4):
    features = [{"prompt_ids": tokenizer(p, add_special_tokens=False)["input_ids"], "prompt": p, "meta": {}}
                for p in [f"\n\nHuman: tell me about item {i}{' please' * i}\n\nAssistant:" for i in range(n)]]
    return prompt_batch(features, tokenizer.pad_token_id)


@pytest.mark.parametrize("value_head", ["mlp", "blocks"])
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_llama_dir", "gpt2_real_dir", "qwen2_window_dir"])
def test_trunk_runs_once_per_step_and_frozen_parts_get_no_gradient(fixture, value_head, hh_path, tmp_path, request):
    model_dir = request.getfixturevalue(fixture)
    algorithm = built_a2c(sparrow_run(model_dir, hh_path, tmp_path, value_head=value_head))
    assert algorithm.learned_rules == ["no_url"] and algorithm.programmatic_rules == ["no_new_human_turn"]
    calls = {"trunk": 0, "policy_top": 0, "reference_top": 0}
    in_generation: dict[str, int] = {}

    def count(name):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    hooks = [algorithm.trunk.blocks[-1].register_forward_hook(count("trunk")),
             algorithm.model.policy.top.blocks[0].register_forward_hook(count("policy_top")),
             algorithm.reference.top.blocks[0].register_forward_hook(count("reference_top"))]
    collect = algorithm.collect

    def counted_collect(batch):  # generation runs trunk and top once per decoding step (KV cache)
        before = dict(calls)
        rollout = collect(batch)
        in_generation.update({name: calls[name] - before[name] for name in calls})
        return rollout

    algorithm.collect = counted_collect
    (out,) = list(algorithm.step(prompts(algorithm.tokenizer)))
    out.loss.backward()
    for hook in hooks:
        hook.remove()
    assert 1 <= in_generation["policy_top"] <= 6
    # one trunk step per decoding step, plus one on the last sampled token (its features; the top does not run)
    assert in_generation["trunk"] == in_generation["policy_top"] + 1
    assert calls["trunk"] - in_generation["trunk"] == 0  # no trunk pass after generation: its features are reused
    assert calls["policy_top"] - in_generation["policy_top"] == 1 and calls["reference_top"] == 1

    frozen = {"trunk": algorithm.trunk, "reference": algorithm.reference,
              "preference_head": algorithm.preference_head, "rule_head": algorithm.rule_head}
    for name, module in frozen.items():
        assert all(p.grad is None for p in module.parameters()), name
    trained = {"policy_top": algorithm.model.policy.top, "lm_head": algorithm.model.policy.head,
               "value": algorithm.model.value}
    for name, module in trained.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    trainable = {id(p) for p in algorithm.model.parameters() if p.requires_grad}
    assert not trainable & {id(p) for m in frozen.values() for p in m.parameters()}
    for key in ("reward/preference", "reward/rule/no_url", "reward/rule/no_new_human_turn",
                "reward/length_penalty", "reward/format_validity", "kl", "loss/value"):
        assert key in out.metrics, key
    assert out.metrics["logprob_gap"] < 1e-4  # on-policy: recomputed log-probs = behaviour log-probs


@pytest.mark.parametrize("fixture", ["gpt2_real_dir", "llama_chat_dir", "qwen2_window_dir"])
def test_scoring_on_captured_features_equals_scoring_on_a_trunk_pass(fixture, hh_path, tmp_path, request):
    """Log-probs, entropies, values, reference log-probs, KL, every reward term and the advantages of a rollout
    scored on the trunk features captured in generation equal those scored after a fresh trunk pass (fp32)."""
    model_dir = request.getfixturevalue(fixture)
    algorithm = built_a2c(sparrow_run(model_dir, hh_path, tmp_path, value_head="blocks",
                                      generation={"max_new_tokens": 20}))
    rollout = algorithm.collect(prompts(algorithm.tokenizer))
    assert rollout.hidden is not None and rollout.sequences.shape[1] > 16  # past qwen2-window's window
    with torch.no_grad():
        captured = algorithm.score(rollout)
        fresh = algorithm.score(dataclasses.replace(rollout, hidden=None))  # no capture: Trunk.forward
        advantages = [algorithm.advantages(scored) for scored in (captured, fresh)]
    assert rollout.hidden is None  # handed over to the features (samples.jsonl may keep the rollout)
    for name, got, expected in [*zip(("logps", "entropy", "values"), captured.forward, fresh.forward),
                                ("ref_logps", captured.ref_logps, fresh.ref_logps), ("kl", captured.kl, fresh.kl),
                                ("scores", captured.scores, fresh.scores), ("advantages", *advantages),
                                *[(k, captured.components[k], fresh.components[k]) for k in fresh.components]]:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert captured.components.keys() == fresh.components.keys() and len(fresh.components) == 5


def test_score_is_the_weighted_sum_of_its_terms(tiny_model_dir, hh_path, tmp_path):
    algorithm = built_a2c(sparrow_run(tiny_model_dir, hh_path, tmp_path, preference_weight=2.0))
    rollout = algorithm.collect(prompts(algorithm.tokenizer))
    features = algorithm.trunk(rollout.sequences, rollout.attention_mask)
    total, parts = algorithm.score_terms(features, rollout)
    expected = (2.0 * parts["preference"] + parts["rule/no_url"] + 0.5 * parts["rule/no_new_human_turn"]
                + parts["length_penalty"] + 0.5 * parts["format_validity"])
    torch.testing.assert_close(total, expected)
    assert ((parts["rule/no_url"] > 0) & (parts["rule/no_url"] < 1)).all()  # a probability from the rule head


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "llama_chat_dir"])
def test_trainer_end_to_end_saves_policy_and_heads(fixture, hh_path, tmp_path, request):
    model_dir = request.getfixturevalue(fixture)
    run = sparrow_run(model_dir, hh_path, tmp_path)
    final = Trainer(run).fit()
    assert math.isfinite(final["eval/reward/score"]) and "eval/kl" in final
    out = Path(run.train.output_dir)
    report = json.loads((out / "reward_heads.json").read_text())
    assert report["preference"]["steps"] == 2 and "eval_accuracy" in report["preference"]
    AutoModelForCausalLM.from_pretrained(out / "model")  # the policy is a plain transformers model
    saved = torch.load(out / "model" / HEADS_FILE, weights_only=True)
    assert saved["rule_names"] == ["no_url"] and saved["trainable_layers"] == 1
    # a later run loads the reward heads instead of training them
    reuse = built_a2c(sparrow_run(model_dir, hh_path, tmp_path / "again", reward_heads=str(out / "model")))
    assert not reuse.head_report
    for key, value in reuse.preference_head.state_dict().items():
        assert torch.equal(value, saved["preference"][key])
    with pytest.raises(ConfigError, match="trainable_layers=1, not 2"):
        built_a2c(sparrow_run(model_dir, hh_path, tmp_path / "x", reward_heads=str(out / "model"),
                              trainable_layers=2))


def test_accumulation_over_the_rollout_is_refused_when_the_recipe_is_read():
    """The one update of a rollout is split into G micro-batches of its rows: G > train.batch_size is refused by
    the config (check_run), not in setup after the models are loaded."""
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps"):
        build_run_config({"algorithm": {"name": "a2c"}, "train": {"batch_size": 2, "gradient_accumulation_steps": 4}})


def test_rollout_metrics_once_per_rollout_and_seeded_evaluation(tiny_model_dir, hh_path, tmp_path):
    """Without further reward components (self.reward None) A2C scores with its heads alone; with G = 2 the rollout's
    metrics (critic fit, logprob gap, rewards) come once, with the first micro-batch; evaluation draws with
    train.seed, so two evaluations of one policy agree whatever the training RNG did in between."""
    run = sparrow_run(tiny_model_dir, hh_path, tmp_path, rewards=[])
    run.train.gradient_accumulation_steps = 2
    algorithm = built_a2c(run)
    assert algorithm.reward is None
    batch = prompts(algorithm.tokenizer)
    first, second = list(algorithm.step(batch))
    for key in ("explained_variance", "logprob_gap", "values/mean", "reward/score", "kl"):
        assert key in first.metrics and key not in second.metrics, key
    assert "reward/length_penalty" not in first.metrics and "reward/preference" in first.metrics
    assert all(math.isfinite(out.metrics["loss/value"]) for out in (first, second))
    evaluation = algorithm.evaluate(batch)
    torch.rand(7)  # the training RNG moves on
    list(algorithm.step(batch))
    assert algorithm.evaluate(batch) == evaluation


def test_lora_is_refused(tiny_model_dir, hh_path, tmp_path):
    run = sparrow_run(tiny_model_dir, hh_path, tmp_path)
    run.model.lora.r = 4
    with pytest.raises(ConfigError, match="lora"):
        built_a2c(run)


# ------------------------------------------------------------------------------------------------ learning


TARGETS = [" the", " a", " to", " and", " of", " you", " I", " is"]


@pytest.mark.slow
def test_a2c_learns_the_known_reward_task(tiny_model_dir, tmp_path):
    """The target_token task of prefopt.tasks with eight target tokens S (start rate 8/512 = 1.6%; with one
    token the first hits are so rare that take-off alone needs ~40 steps).

    The reward (1/T) sum_t [y_t in S] is a sum over tokens, so with the per-token KL penalty beta the optimum is
    per token: pi*(y) ~ pi_0(y) exp([y in S] / (T beta)). For T = 12, beta = 0.02 (pi_0 ~ uniform over 512):
    pi*(S) = 0.51 and KL(pi* || pi_0) = 1.42 nats per token = 17 per response, against 12 * log(512/8) = 50 for
    the collapsed policy. A2C approaches it from below. Measured (nano GPT-2, 80 steps, train seeds 0-3): reward
    0.009-0.020 in the first 5 steps -> 0.24-0.30 over the last 20 (held-out 0.19-0.30); KL 5-10 nats per
    response; 15-17 s on an idle 2-core CPU.
    """
    data = write_task_prompts(tmp_path / "prompts.jsonl", 512, seed=0)
    run = build_run_config({
        "algorithm": {"name": "a2c", "trainable_layers": 1, "kl_coef": 0.02, "preference_weight": 0.0, "rules": {},
                      "rewards": [{"name": "target_token", "params": {"token": TARGETS}}],
                      "generation": {"max_new_tokens": 12}},
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(data), "format": "prompts", "eval_fraction": 0.1},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 80, "batch_size": 16, "eval_batch_size": 32,
                  "learning_rate": 2e-3, "log_every": 5, "progress": False, "save_model": False},
    })
    final = Trainer(run).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward/target_token" in r]
    start = train[0]["reward/target_token"]
    end = sum(r["reward/target_token"] for r in train[-4:]) / 4  # the last 20 steps
    kl = sum(r["kl"] for r in train[-4:]) / 4
    print(f"reward {start:.3f} -> {end:.3f} (eval {final['eval/reward/target_token']:.3f}), KL {kl:.2f}")
    assert start < 0.04
    assert end > 0.15 and end > 5 * start
    assert final["eval/reward/target_token"] > 0.12
    assert kl < 20 and final["eval/kl"] < 20  # bounded: near the KL-regularised optimum's 17, not 50


# ------------------------------------------------------------------------------------------------ accumulation


def test_accumulation_splits_the_one_update_of_a_rollout(gpt2_real_dir, tmp_path):
    """Accumulation 2 makes the update of accumulation 1 from the SAME rollout (two micro-batches of its rows,
    advantages whitened over all of them), not one update from two rollouts. Measured: the weights agree to
    1e-10; before the fix (two rollouts per update) they differed by 2e-3."""
    data = write_task_prompts(tmp_path / "prompts.jsonl", 16, seed=0)

    def weights(accumulation: int) -> dict[str, torch.Tensor]:
        out = tmp_path / f"g{accumulation}"
        Trainer(build_run_config({
            "algorithm": {"name": "a2c", "trainable_layers": 1, "preference_weight": 0.0, "rules": {},
                          "rewards": [{"name": "target_token", "params": {"token": TARGETS}}],
                          "generation": {"max_new_tokens": 12}},  # some target tokens sampled
            "model": {"name_or_path": str(gpt2_real_dir)},
            "data": {"path": str(data), "format": "prompts", "eval_fraction": 0.0},
            "train": {"output_dir": str(out), "max_steps": 1, "batch_size": 8, "learning_rate": 1e-3,
                      "gradient_accumulation_steps": accumulation, "progress": False, "mixed_precision": "no"},
        })).fit()
        return AutoModelForCausalLM.from_pretrained(out / "model").state_dict()

    plain, split = weights(1), weights(2)
    start = AutoModelForCausalLM.from_pretrained(gpt2_real_dir).state_dict()
    assert max(float((plain[k] - start[k]).abs().max()) for k in plain) > 5e-4  # the update moved the top
    for key in plain:
        torch.testing.assert_close(split[key], plain[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_a2c_trains_a_bf16_model(llama_chat_dir, tmp_path):
    """model.dtype bfloat16 (llama-chat ships bf16 weights): the value and reward heads run on bf16 features."""
    data = write_task_prompts(tmp_path / "prompts.jsonl", 8, seed=0)
    run = sparrow_run(llama_chat_dir, data, tmp_path, preference_weight=0.0, generation={"max_new_tokens": 4})
    run.model.dtype = "bfloat16"
    run.data.format, run.data.max_examples, run.data.eval_fraction = "prompts", None, 0.0
    Trainer(run).fit()
    rows = [json.loads(line) for line in (Path(run.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss/value" in row]
    assert len(train) == 2 and all(math.isfinite(row["loss/value"]) for row in train)
    assert 0 < train[0]["reward/rule/no_url"] < 1  # the learned rule head scored bf16 features


@pytest.mark.parametrize("old, new, value", [("ent_coef", "entropy_coef", 0.1), ("kl_mode", "kl_in", "loss")])
def test_a2c_knobs_have_the_online_core_names(old, new, value):
    """One name per knob across the online algorithms: A2C's entropy weight and KL placement are called as in
    OnlineConfig (entropy_coef, kl_in); an old recipe gets one line naming the new key."""
    with pytest.raises(ConfigError, match=f"^algorithm.{old} was renamed algorithm.{new}: write {new}: "):
        build_run_config({"algorithm": {"name": "a2c", old: value}})
    assert getattr(build_run_config({"algorithm": {"name": "a2c", new: value}}).algorithm, new) == value
    assert new in {f.name for f in dataclasses.fields(OnlineConfig)}
