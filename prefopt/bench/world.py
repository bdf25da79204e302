"""The known-gold preference world: Gao et al. 2022's gold/proxy protocol (arXiv 2210.10760) with an EXACT gold.

Prompts are short HH-style questions that name a word group: ``"... Words: the and of.\\n\\nAssistant:"``. The
16 target words of prefopt.tasks are split into two groups of 8 (G_0 = every even one, G_1 = every odd one); a
prompt shows three words of its group G(x). The true (gold) reward of a response y is

    r(x, y) = ( #{t : y_t in G(x)} - lambda * #{t : y_t in G_other(x)} ) / |y|          (EOS counted in |y|)

so it depends on the prompt, a tiny model can learn to satisfy it (copy the words the prompt shows), and a proxy
that learns only "target words are good" is exploitable: pushing it emits the other group's words, which the gold
reward does not pay for (lambda = 0, the default) or penalises (lambda > 0) (over-optimisation). With lambda = 0.5 a
nano proxy RM stays near chance on held-out pairs (0.55 accuracy; 0.62 with lambda = 0), so the default is 0.

Labels: for each labelled prompt, K responses are sampled from the start and ranked by Plackett-Luce on
r / tau (Gumbel-max: sort by r / tau + Gumbel noise), so any two of them are ordered by Bradley-Terry,
P(a > b) = sigmoid((r(a) - r(b)) / tau); tau is the stated label noise. The proxy RM trains on the K-wise
rankings; offline algorithms train on the C(K, 2) pairs the same rankings imply (ties in text dropped). Online
algorithms optimise the proxy RM; every algorithm is judged by r.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefopt.registry import REWARDS
from prefopt.tasks import TARGET_WORDS, _MOODS, _QUESTIONS, _TOPICS, token_ids
from prefopt.types import Rollout

GROUPS = (TARGET_WORDS[0::2], TARGET_WORDS[1::2])
"""The two word groups (each a list of single-token words)."""
_HINT = re.compile(r"Words:((?: \w+){3})\.")


def world_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts, each a question and three words of one group (the group drawn uniformly)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        group = GROUPS[rng.randrange(len(GROUPS))]
        hint = "".join(rng.sample(group, 3))
        question = rng.choice(_MOODS) + rng.choice(_QUESTIONS).format(rng.choice(_TOPICS))
        out.append(f"\n\nHuman: {question} Words:{hint}.\n\nAssistant:")
    return out


def prompt_group(prompt: str) -> int:
    """Index of the group a prompt names (its hint words); ValueError for a prompt of another world."""
    match = _HINT.search(prompt)
    words = match.group(1).split() if match else []
    for index, group in enumerate(GROUPS):
        if words and all(f" {w}" in group for w in words):
            return index
    raise ValueError(f"not a prompt of the known-gold world (no 'Words: a b c.' of one group): {prompt[-80:]!r}")


@REWARDS.register("world_gold")
class WorldGoldReward:
    """The world's true reward r(x, y) (module docstring); ``penalty`` is lambda."""

    def __init__(self, tokenizer, device, penalty: float = 0.0):
        self.groups = [torch.tensor(token_ids(tokenizer, list(group))) for group in GROUPS]
        self.penalty = float(penalty)
        self.device = device

    def __call__(self, rollout: Rollout) -> Tensor:
        ids, mask = rollout.response_ids, rollout.response_mask.float()
        own = torch.tensor([prompt_group(p) for p in rollout.prompts], device=ids.device)
        hits = torch.stack([torch.isin(ids, g.to(ids.device)).float() * mask for g in self.groups])  # [G, B, T]
        counts = hits.sum(-1)  # [G, B]
        mine = counts.gather(0, own[None]).squeeze(0)
        others = counts.sum(0) - mine
        return ((mine - self.penalty * others) / mask.sum(-1).clamp(min=1)).to(self.device)


def gold_spec(penalty: float) -> dict[str, Any]:
    return {"name": "world_gold", "weight": 1.0, "params": {"penalty": penalty}}


def plackett_luce(rewards: list[float], temperature: float, rng: random.Random) -> list[int]:
    """A ranking (indices, best first) drawn from Plackett-Luce with utilities r / tau (Gumbel-max)."""
    keys = [r / temperature - _log_neg_log(rng.random()) for r in rewards]
    return sorted(range(len(rewards)), key=lambda i: -keys[i])


def _log_neg_log(u: float) -> float:
    import math

    u = min(max(u, 1e-12), 1 - 1e-12)
    return math.log(-math.log(u))


def implied_pairs(prompt: str, responses: list[str], ranking: list[int]) -> list[dict[str, str]]:
    """The C(K, 2) pairs a ranking implies (responses with the same text are not paired)."""
    out = []
    for a, b in itertools.combinations(ranking, 2):  # a ranked above b
        if responses[a] != responses[b] and responses[a].strip() and responses[b].strip():
            out.append({"prompt": prompt, "chosen": responses[a], "rejected": responses[b]})
    return out


def build_labels(directory: Path, start: str, prompt_files: dict[str, str], world: Any, generation: Any,
                 data_lengths: tuple[int, int], batch_size: int) -> dict[str, Any]:
    """Sample K responses per prompt of each part from the start, rank them (module docstring), write
    ``<part>.ranks.jsonl`` and ``<part>.pairs.jsonl``; return counts and the label agreement with r."""
    from prefopt.bench.data import read_jsonl, write_jsonl
    from prefopt.config import DataConfig, ModelConfig
    from prefopt.data import build_dataloader
    from prefopt.models import load_causal_lm, load_tokenizer
    from prefopt.rl.rewards import RewardSpec, build_component
    from prefopt.rl.engine import generate

    model_cfg = ModelConfig(name_or_path=start)
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, trainable=False)
    gold = build_component(RewardSpec(**gold_spec(world.penalty)), tokenizer, torch.device("cpu"))
    k = world.responses_per_prompt
    data_cfg = DataConfig(path="<prompts>", max_length=data_lengths[0], max_prompt_length=data_lengths[1],
                          eval_fraction=0.0)
    rng = random.Random(world.seed)
    report: dict[str, Any] = {}
    for part, path in prompt_files.items():
        records = [{"prompt": r["prompt"], "meta": {}} for r in read_jsonl(Path(path))]
        repeated = [r for r in records for _ in range(k)]
        loader, _ = build_dataloader(repeated, "prompts", tokenizer, data_cfg, batch_size * k, shuffle=False, seed=0)
        responses, scores = [], []
        for i, batch in enumerate(loader):
            rollout = generate(model, tokenizer, batch, generation, seed=world.seed + 7919 * (i + 1))
            responses += rollout.responses
            scores += gold(rollout).tolist()
        ranks, pairs, agree, ordered = [], [], 0, 0
        for j, record in enumerate(records):
            texts, values = responses[j * k:(j + 1) * k], scores[j * k:(j + 1) * k]
            ranking = plackett_luce(values, world.label_temperature, rng)
            ranks.append({"prompt": record["prompt"], "responses": texts, "ranking": ranking})
            for a, b in itertools.combinations(ranking, 2):
                if values[a] != values[b]:
                    ordered += 1
                    agree += values[a] > values[b]
            pairs += implied_pairs(record["prompt"], texts, ranking)
        write_jsonl(directory / f"{part}.ranks.jsonl", ranks)
        write_jsonl(directory / f"{part}.pairs.jsonl", pairs)
        report[part] = {"prompts": len(records), "responses": len(responses), "pairs": len(pairs),
                        "label_agreement_with_true_reward": agree / max(ordered, 1),
                        "pairs_with_distinct_true_reward": ordered, "start_true_reward": sum(scores) / len(scores)}
    (directory / "summary.json").write_text(json.dumps(report, indent=2))
    return report
