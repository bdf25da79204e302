"""A task with a known programmatic reward, small enough for a tiny random-init model to learn in CPU-minutes.

The true reward of a response is the fraction of its tokens that are target tokens, by default 16 common
English words (" the", " a", " and", ..., each one token of the tiny HH tokenizers):
``r(y) = #{t : y_t in S} / |y|``, EOS counted in |y|, 0 for an empty response. A random model scores about
|S| / vocabulary size (~0.03 for the 512-token tiny models); a policy that learned the task scores near 1.
(One target word alone is too sparse for a random model: ~1 hit per 64 x 8 sampled tokens, and PPO did not
move it in 60 steps.) The prompts are short synthetic HH-style questions; the reward ignores them.

Because the reward is a sum of per-token terms 1/L, the KL-regularised optimum is known in closed form
(pi*(y_t) ~ pi_ref(y_t) exp(1 / (L beta)) on S), which makes it a check of the KL-penalised objective too.
PPO's learning test, A2C's, and the benchmark's synthetic mode use this task.

    from prefopt.tasks import TASK_REWARD, write_task_prompts
    write_task_prompts("prompts.jsonl", 256)        # data: {path: prompts.jsonl, format: prompts}
    rewards = [TASK_REWARD]                          # algorithm: {rewards: [...]}
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefopt.errors import ConfigError
from prefopt.registry import REWARDS
from prefopt.types import Rollout

TARGET_WORDS = [" the", " a", " and", " to", " of", " I", " you", " is", " it", " that", " in", " be", " not",
                " for", " are", " this"]
TASK_REWARD: dict[str, Any] = {"name": "target_token", "weight": 1.0, "params": {"token": TARGET_WORDS}}
"""The task's reward as a RewardSpec mapping (for ``algorithm.rewards``)."""

_QUESTIONS = ["Tell me about {}.", "What do you think of {}?", "How do I start with {}?", "Why is {} hard?",
              "Can you explain {} to me?", "Is {} a good idea?", "Write a sentence about {}.", "What is {}?"]
_MOODS = ["", "Quick question: ", "Please help. ", "I wonder. ", "Hi! ", "Honestly, ", "Hey, ", "So, "]
_TOPICS = ["cooking", "the weather", "my garden", "chess", "the ocean", "music", "running", "a new job", "cats",
           "history", "math homework", "the moon", "coffee", "a birthday party", "painting", "trains"]


def task_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` short synthetic HH-style prompts, ``"\\n\\nHuman: ...\\n\\nAssistant:"``, drawn with ``seed``."""
    rng = random.Random(seed)
    questions = [rng.choice(_MOODS) + rng.choice(_QUESTIONS).format(rng.choice(_TOPICS)) for _ in range(n)]
    return [f"\n\nHuman: {question}\n\nAssistant:" for question in questions]


def write_task_prompts(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write ``task_prompts(n, seed)`` as ``{"prompt": ...}`` JSON lines (the data layer's ``prompts`` format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task_prompts(n, seed)))
    return path


def token_ids(tokenizer, token: str | int | list[str | int]) -> list[int]:
    """The ids of one target token or of several: ints are ids, strings must encode to exactly one token."""
    ids = []
    for item in token if isinstance(token, list) else [token]:
        if isinstance(item, int):
            ids.append(item)
            continue
        encoded = tokenizer(item, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ConfigError(f"target_token {item!r} is {len(encoded)} tokens {encoded} in this tokenizer; "
                              "choose a string that is one token, or give the token id")
        ids.append(encoded[0])
    return ids


@REWARDS.register("target_token")
class TargetTokenReward:
    """The task's true reward: the fraction of response tokens (EOS included) that are ``token``.

    ``token`` is a string that is one token, a token id, or a list of them (any of which counts; default
    ``TARGET_WORDS``).
    """

    def __init__(self, tokenizer, device, token: str | int | list[str | int] = TARGET_WORDS):
        self.ids = torch.tensor(token_ids(tokenizer, token))
        self.device = device

    def __call__(self, rollout: Rollout) -> Tensor:
        mask = rollout.response_mask.float()
        hits = torch.isin(rollout.response_ids, self.ids.to(rollout.response_ids.device)).float() * mask
        return (hits.sum(-1) / mask.sum(-1).clamp(min=1)).to(self.device)
