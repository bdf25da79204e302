"""prefopt.bench.world: the true reward, its conditional accuracy and the labels, checked by hand; the reward is a
registered component that ``prefopt list`` shows without the bench being imported."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from prefopt.bench.world import GROUPS, WorldGoldReward, label_prompts, plackett_luce, prompt_group, world_prompts


@dataclass
class FakeRollout:
    prompts: list[str]
    response_ids: torch.Tensor
    response_mask: torch.Tensor


def test_world_gold_reward_and_conditional_accuracy_by_hand(tiny_model_dir):
    from prefopt.config import ModelConfig
    from prefopt.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    prompts = world_prompts(40, seed=3)
    groups = [prompt_group(p) for p in prompts]
    assert set(groups) == set(range(len(GROUPS))) and all("Words:" in p for p in prompts)
    with pytest.raises(ValueError, match="not a prompt of the known-gold world"):
        prompt_group("\n\nHuman: hi\n\nAssistant:")
    own = {g: [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in GROUPS[g]] for g in (0, 1)}
    p0 = next(p for p, g in zip(prompts, groups) if g == 0)
    p1 = next(p for p, g in zip(prompts, groups) if g == 1)
    eos = tokenizer.eos_token_id
    # p0: 2 own + 1 other + 1 neutral + EOS = 5 tokens -> (2 - 0.5 * 1) / 5; p1: 1 own + EOS, pad after -> 1 / 2
    ids = torch.tensor([[own[0][0], own[0][1], own[1][0], 300, eos], [own[1][2], eos, 0, 0, 0], [300, eos, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    reward = WorldGoldReward(tokenizer, torch.device("cpu"), penalty=0.5)
    got = reward(FakeRollout([p0, p1, p0], ids, mask))
    assert got.tolist() == pytest.approx([1.5 / 5, 1 / 2, 0.0])
    details = reward.details(FakeRollout([p0, p1, p0], ids, mask))
    assert details["cond_acc"][:2].tolist() == pytest.approx([2 / 3, 1.0]) and math.isnan(details["cond_acc"][2])
    assert details["rule"].tolist() == pytest.approx([3 / 5, 1 / 2, 0.0])  # prompt-blind: every target word counts
    swapped = reward(FakeRollout([p1, p0, p1], ids, mask))  # the same responses under the other group's prompts
    assert swapped.tolist() == pytest.approx([(1 - 0.5 * 2) / 5, -0.5 / 2, 0.0])


def test_plackett_luce_labels_follow_bradley_terry():
    rng = random.Random(0)
    tau, gap = 0.05, 0.05
    wins = sum(plackett_luce([gap, 0.0], tau, rng)[0] == 0 for _ in range(20000)) / 20000
    assert wins == pytest.approx(1 / (1 + math.exp(-gap / tau)), abs=0.01)  # sigmoid(1) = 0.731
    assert plackett_luce([0.0, 5.0, 1.0, 3.0], 1e-3, rng) == [1, 3, 2, 0]


def test_labels_drop_ties_and_give_one_kto_label_per_response():
    # one prompt, K = 4: rewards 0.5, 0.2, 0.2 (a tie), 0.0; tau tiny, so the ranking is the true order
    out = label_prompts(["x"], [["a", "b", "c", "d"]], [[0.5, 0.2, 0.2, 0.0]], 1e-6, random.Random(0))
    assert out["ranks"][0]["ranking"][0] == 0 and out["ranks"][0]["ranking"][-1] == 3
    pairs = {(p["chosen"], p["rejected"]) for p in out["pairs"]}
    assert pairs == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")}  # b-c tied in true reward: dropped
    assert out["kto"] == [{"prompt": "x", "completion": "a", "label": True},
                          {"prompt": "x", "completion": "d", "label": False}]
    summary = out["summary"]
    assert (summary["pairs_used"], summary["ties_dropped"], summary["label_agreement_over_pairs_used"]) == (5, 1, 1.0)
    assert summary["kto_rows"] == {"desirable": 1, "undesirable": 1} and summary["start_true_reward"] == pytest.approx(0.225)
    noisy = label_prompts(["x"] * 400, [["a", "b"]] * 400, [[0.05, 0.0]] * 400, 0.05, random.Random(1))
    assert noisy["summary"]["label_agreement_over_pairs_used"] == pytest.approx(0.731, abs=0.04)


def test_the_world_reward_is_listed_without_importing_the_bench():
    code = ("import json, sys; from prefopt.registry import REWARDS; names = REWARDS.available(); "
            "print(json.dumps(['world_gold' in names, sorted(m for m in sys.modules if m.startswith('prefopt.bench'))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    listed, bench_modules = json.loads(out.splitlines()[-1])
    assert listed and bench_modules == ["prefopt.bench", "prefopt.bench.world"]
