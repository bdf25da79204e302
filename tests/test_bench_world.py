"""prefopt.bench.world: the true reward, its prompt-blind bound, conditional accuracy, the labels (ties dropped,
agreement over the pairs used, KTO rows disjoint) and the start's demonstrations, checked by hand; and (slow) a
small policy learns the prompt-conditional skill within seconds."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from prefopt.bench.world import (GROUPS, WorldGoldReward, conditional_accuracy, demonstrations, gold_spec,
                                 implied_pairs, kto_rows, label_prompts, oracle_weight, plackett_luce_scores, prompt_group,
                                 true_reward, world_prompts)
from prefopt.config import ModelConfig
from prefopt.models import load_tokenizer


@dataclass
class FakeRollout:
    prompts: list[str]
    response_ids: torch.Tensor
    response_mask: torch.Tensor


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


def word_ids(tokenizer) -> list[list[int]]:
    return [[tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in group] for group in GROUPS]


def test_prompts_show_one_group_drawn_uniformly():
    assert len(GROUPS) >= 4 and len({w for g in GROUPS for w in g}) == sum(len(g) for g in GROUPS)
    prompts = world_prompts(4000, seed=3)
    counts = [0] * len(GROUPS)
    for prompt in prompts:
        counts[prompt_group(prompt)] += 1
        assert prompt.startswith("\n\nHuman: ") and prompt.endswith(".\n\nAssistant:")
    assert all(abs(c / 4000 - 1 / len(GROUPS)) < 0.03 for c in counts)
    p = world_prompts(1, seed=5)[0]
    shown = p.split("Words:")[1].split(".")[0].split()
    assert sorted(f" {w}" for w in shown) == sorted(GROUPS[prompt_group(p)])  # all of its group's words
    with pytest.raises(ValueError, match="not a prompt of the known-gold world"):
        prompt_group("\n\nHuman: hi\n\nAssistant:")


def test_true_reward_pays_own_words_per_budget_not_per_length(tokenizer):
    own = word_ids(tokenizer)
    prompts = world_prompts(60, seed=3)
    p0 = next(p for p in prompts if prompt_group(p) == 0)
    p1 = next(p for p in prompts if prompt_group(p) == 1)
    eos, other_token = tokenizer.eos_token_id, 300
    assert other_token not in {i for g in own for i in g}
    ids = torch.tensor([[own[0][0], own[0][1], own[1][0], other_token, eos],  # 2 own + 1 other group, 5 tokens
                        [own[0][2], eos, 0, 0, 0],                           # 1 own word, then stops
                        [own[0][2], other_token, other_token, other_token, eos],  # 1 own word, full length
                        [eos, 0, 0, 0, 0],                                   # empty
                        [other_token, other_token, other_token, other_token, eos]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    rollout = FakeRollout([p0] * 5, ids, mask)
    budget = 4
    reward = WorldGoldReward(tokenizer, torch.device("cpu"), budget=budget, penalty=0.5)
    # (min(own, T) - 0.5 other) / T with T = 4: a short and a long response with one own word earn the same 1/4
    assert reward(rollout).tolist() == pytest.approx([(2 - 0.5) / 4, 1 / 4, 1 / 4, 0.0, 0.0])
    details = reward.details(rollout)
    assert details["cond_acc"].tolist()[:3] == pytest.approx([2 / 3, 1.0, 1.0])
    assert all(math.isnan(v) for v in details["cond_acc"].tolist()[3:])
    assert details["rule"].tolist() == pytest.approx([3 / 4, 1 / 4, 1 / 4, 0.0, 0.0])  # every target word counts
    swapped = reward(FakeRollout([p1] * 5, ids, mask))  # the same responses under group 1's prompt
    assert swapped.tolist() == pytest.approx([(1 - 0.5 * 2) / 4, -0.5 / 4, -0.5 / 4, 0.0, 0.0])
    # the count is capped at the budget: 3 own words with T = 2 score 1, not 1.5
    assert true_reward(torch.tensor([3.0]), torch.tensor([0.0]), budget=2).tolist() == [1.0]
    assert gold_spec(12, 0.5) == {"name": "world_gold", "weight": 1.0, "params": {"budget": 12, "penalty": 0.5}}
    with pytest.raises(ValueError, match="budget"):
        WorldGoldReward(tokenizer, torch.device("cpu"), budget=0)


def test_a_prompt_blind_policy_scores_at_most_a_quarter_of_the_maximum(tokenizer):
    """Any fixed response, scored under a prompt of each group, averages <= max / len(GROUPS); copying the prompt's
    group reaches the maximum 1."""
    ids_by_group = word_ids(tokenizer)
    prompts = {prompt_group(p): p for p in world_prompts(60, seed=4)}
    budget, g = 6, torch.Generator().manual_seed(0)
    vocabulary = torch.tensor([i for group in ids_by_group for i in group] + [300, 301, 302])
    reward = WorldGoldReward(tokenizer, torch.device("cpu"), budget=budget)
    responses = vocabulary[torch.randint(len(vocabulary), (500, budget), generator=g)]
    responses[0] = torch.tensor(ids_by_group[2][:4] + ids_by_group[2][:2])  # all of one group: the best blind one
    mask = torch.ones_like(responses)
    per_group = torch.stack([reward(FakeRollout([prompts[k]] * 500, responses, mask)) for k in range(len(GROUPS))])
    blind = per_group.mean(0)  # uniform groups
    assert float(blind.max()) == pytest.approx(1 / len(GROUPS)) and float(blind[0]) == pytest.approx(0.25)
    copied = torch.tensor([(ids_by_group[k] * 2)[:budget] for k in range(len(GROUPS))])
    assert reward(FakeRollout([prompts[k] for k in range(len(GROUPS))], copied,
                              torch.ones_like(copied))).tolist() == [1.0] * len(GROUPS)


def test_conditional_accuracy():
    own, other = torch.tensor([3.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 2.0, 1.0, 0.0])
    got = conditional_accuracy(own, other).tolist()
    assert got[:3] == [0.75, 0.0, 0.5] and math.isnan(got[3])


def test_oracle_weight_is_the_proxys_slope_on_the_true_reward():
    rewards = [0.0, 0.25, 0.5, 0.75]
    assert oracle_weight(rewards, [5 * r + 1 for r in rewards]) == pytest.approx(5.0)  # proxy = 5 r + 1
    noise = [0.3, -0.3, -0.3, 0.3]  # mean 0 and orthogonal to r - mean(r) = [-3, -1, 1, 3] / 8: the slope stays 5
    assert oracle_weight(rewards, [5 * r + 1 + e for r, e in zip(rewards, noise)]) == pytest.approx(5.0)
    assert oracle_weight(rewards, [-r for r in rewards]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="constant"):
        oracle_weight([0.5, 0.5], [1.0, 2.0])


def test_labeller_ties_equal_rewards_and_orders_the_rest_by_bradley_terry():
    rng = random.Random(0)
    scores = plackett_luce_scores([0.5, 0.2, 0.2, 0.0], 1e-6, rng)  # tau ~ 0: the true order, ties equal
    assert scores == [2, 1, 1, 0]
    assert implied_pairs(scores) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]  # the (1, 2) tie is no pair
    assert kto_rows(scores) == (0, 3) and kto_rows([1, 1, 1]) is None
    tau, gap = 0.05, 0.05  # P(a > b) = sigmoid(gap / tau) = sigmoid(1) = 0.731
    wins = sum(plackett_luce_scores([gap, 0.0], tau, rng)[0] == 1 for _ in range(20000)) / 20000
    assert wins == pytest.approx(1 / (1 + math.exp(-gap / tau)), abs=0.01)


def test_labels_drop_ties_count_agreement_over_used_pairs_and_give_kto_one_label_per_response():
    out = label_prompts(["x", "y"], [["a", "b", "c", "d"], ["e", "e", " ", "f"]],
                        [[0.5, 0.2, 0.2, 0.0], [0.1, 0.1, 0.3, 0.1]], 1e-6, random.Random(0))
    # prompt y: "e" twice and the blank response are dropped, "e" and "f" tie: nothing to learn, no row
    assert [r["prompt"] for r in out["ranks"]] == ["x"]
    assert out["ranks"][0] == {"prompt": "x", "responses": ["a", "b", "c", "d"], "scores": [2, 1, 1, 0]}
    assert [(p["chosen"], p["rejected"]) for p in out["pairs"]] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"),
                                                                     ("c", "d")]
    assert out["kto"] == [{"prompt": "x", "completion": "a", "label": True},
                          {"prompt": "x", "completion": "d", "label": False}]
    summary = out["summary"]
    assert (summary["pairs_used"], summary["ties_dropped"], summary["empty_or_repeated_dropped"]) == (5, 2, 5)
    assert summary["label_agreement_over_pairs_used"] == 1.0 and summary["prompts_labelled"] == 1
    assert summary["kto_rows"] == {"desirable": 1, "undesirable": 1}
    assert summary["start_true_reward"] == pytest.approx((0.9 + 0.6) / 8)
    # noisy labels: agreement is counted over the pairs used (ties never are), and matches Bradley-Terry
    rng = random.Random(1)
    rewards = [[rng.choice([0.0, 0.05, 0.1]) for _ in range(4)] for _ in range(2000)]
    texts = [[f"r{j}" for j in range(4)] for _ in range(2000)]
    noisy = label_prompts([f"p{i}" for i in range(2000)], texts, rewards, 0.05, random.Random(2))
    by_prompt = dict(zip([f"p{i}" for i in range(2000)], rewards))
    used = [(by_prompt[p["prompt"]][int(p["chosen"][1])], by_prompt[p["prompt"]][int(p["rejected"][1])])
            for p in noisy["pairs"]]
    assert all(a != b for a, b in used)
    ties = sum(rw.count(v) * (rw.count(v) - 1) // 2 for rw in rewards for v in set(rw))  # equal-reward pairs
    assert noisy["summary"]["ties_dropped"] == ties and noisy["summary"]["pairs_used"] == 6 * 2000 - ties
    assert noisy["summary"]["label_agreement_over_pairs_used"] == pytest.approx(sum(a > b for a, b in used) / len(used))
    expected = sum(1 / (1 + math.exp(-abs(a - b) / 0.05)) for a, b in used) / len(used)
    assert noisy["summary"]["label_agreement_over_pairs_used"] == pytest.approx(expected, abs=0.02)
    labels = {}
    for k in noisy["kto"]:
        assert labels.setdefault((k["prompt"], k["completion"]), k["label"]) == k["label"]  # never both
    assert len(noisy["kto"]) == 2 * noisy["summary"]["prompts_labelled"]


def test_demonstrations_insert_the_prompt_groups_words():
    prompts = world_prompts(50, seed=9)
    reply = "Sure, here we go now with my garden"  # no target word in it
    rows = demonstrations(prompts, [reply], random.Random(0), words=4, reply_words=5)
    for prompt, row in zip(prompts, rows):
        words = row["completion"].split()
        group = GROUPS[prompt_group(prompt)]
        assert row["prompt"] == prompt and row["completion"].startswith(" ")
        assert len([w for w in words if f" {w}" in group]) == 4  # 4 words of the prompt's own group ...
        assert [w for w in words if f" {w}" not in group] == reply.split()[:5]  # ... inserted into the reply
    with pytest.raises(ValueError, match="no non-empty reply"):
        demonstrations(prompts, [" "], random.Random(0))


# ------------------------------------------------------------------------------------------------ learning


def _train(recipe: dict, out) -> None:
    from prefopt.config import build_run_config
    from prefopt.trainer import Trainer

    recipe["train"] = {"output_dir": str(out), "progress": False, "warmup_steps": 5, "seed": 0, **recipe["train"]}
    Trainer(build_run_config(recipe)).fit()


def _skill(model_dir, prompts: list[str]) -> tuple[float, float, float]:
    """(pooled conditional accuracy, mean true reward, mean length) of one seeded sample per prompt."""
    from prefopt.config import DataConfig
    from prefopt.data import build_dataloader
    from prefopt.models import load_causal_lm
    from prefopt.rl.engine import GenerationConfig, generate

    cfg = ModelConfig(name_or_path=str(model_dir))
    tokenizer, model = load_tokenizer(cfg), load_causal_lm(cfg, trainable=False)
    data = DataConfig(path="<prompts>", max_length=64, max_prompt_length=40, eval_fraction=0.0)
    loader, _ = build_dataloader([{"prompt": p, "meta": {}} for p in prompts], "prompts", tokenizer, data, 128,
                                 shuffle=False, seed=0)
    gold = WorldGoldReward(tokenizer, torch.device("cpu"), budget=12)
    own = other = reward = length = 0.0
    for b, batch in enumerate(loader):
        rollout = generate(model, tokenizer, batch, GenerationConfig(max_new_tokens=12), seed=1234 + b)
        o, q = gold.counts(rollout)
        own, other = own + float(o.sum()), other + float(q.sum())
        reward += float(gold(rollout).sum())
        length += float(rollout.response_mask.sum())
    return own / max(own + other, 1.0), reward / len(prompts), length / len(prompts)


@pytest.mark.slow
def test_ppo_on_the_true_reward_sharpens_the_conditional_skill_in_seconds(tiny_model_dir, hh_path, hh_head, tmp_path):
    """The bench's start in small: a nano model, 60 steps of HH dialogues (pt), 200 steps of world demonstrations
    (4 words of the prompt's group in an HH reply) gives a weak copy skill; 20 PPO updates of 16 prompts on the true
    reward sharpen it. Measured (~20 CPU-s for this test, 27 for the pytest process; 136 s wall at load 7 on 2
    cores): start cond. accuracy 0.469, gold 0.137, length 11.8; after PPO 0.820, gold 0.544, length 12.0."""
    import gzip
    import json

    from prefopt.data.hh import split_hh

    with gzip.open(hh_path, "rt", encoding="utf-8") as rows:
        replies = [split_hh(json.loads(line)["chosen"])[1] for line in rows]
    demos = tmp_path / "demos.jsonl"
    rows = demonstrations(world_prompts(3200, seed=11), replies, random.Random(0))
    demos.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in world_prompts(512, seed=12)))
    lengths = {"max_length": 64, "max_prompt_length": 40, "eval_fraction": 0.0}
    _train({"algorithm": {"name": "pt"}, "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"path": str(hh_head(400)), **lengths},
            "train": {"max_steps": 60, "batch_size": 16, "learning_rate": 3e-3}}, tmp_path / "pt")
    _train({"algorithm": {"name": "sft"}, "model": {"name_or_path": str(tmp_path / "pt" / "model")},
            "data": {"path": str(demos), **lengths},
            "train": {"max_steps": 200, "batch_size": 16, "learning_rate": 3e-3}}, tmp_path / "start")
    eval_prompts = world_prompts(128, seed=13)
    start = _skill(tmp_path / "start" / "model", eval_prompts)
    _train({"algorithm": {"name": "ppo", "rewards": [gold_spec(12)], "generation": {"max_new_tokens": 12},
                          "kl_coef": 0.05, "epochs": 1, "num_minibatches": 1, "vf_coef": 0.1},
            "model": {"name_or_path": str(tmp_path / "start" / "model")},
            "data": {"path": str(prompts), "format": "prompts", **lengths},
            "train": {"max_steps": 20, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 2}},
           tmp_path / "ppo")
    end = _skill(tmp_path / "ppo" / "model", eval_prompts)
    print(f"start cond_acc {start[0]:.3f} gold {start[1]:.3f} length {start[2]:.1f}; "
          f"ppo cond_acc {end[0]:.3f} gold {end[1]:.3f} length {end[2]:.1f}")
    assert 0.3 < start[0] < 0.75  # the start holds the skill weakly (blind: 1/4)
    assert end[0] > start[0] + 0.15 and end[1] > 2 * start[1]  # sharpened: conditional accuracy and true reward
    assert end[2] > 10  # no collapse to short responses (12 is the budget)


def test_the_world_reward_is_listed_without_importing_the_bench():
    import json
    import subprocess
    import sys

    code = ("import json, sys; from prefopt.registry import REWARDS; names = REWARDS.available(); "
            "bench = sorted(m for m in sys.modules if m.startswith('prefopt.bench')); "
            "print(json.dumps(['world_gold' in names, bench]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    listed, bench_modules = json.loads(out.splitlines()[-1])
    assert listed and bench_modules == ["prefopt.bench", "prefopt.bench.world"]
