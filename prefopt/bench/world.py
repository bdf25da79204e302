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
rankings; offline algorithms train on the C(K, 2) pairs the same rankings imply (pairs of equal text or equal true
reward dropped), KTO on one label per response (the top ranked desirable, the bottom ranked undesirable). Online
algorithms optimise the proxy RM; every algorithm is judged by r.

Everything here is pure maths on texts, token ids and numbers (no files, no models): prefopt.bench.stages samples
the responses and writes the labels. The reward component ``world_gold`` is registered when the registry loads its
built-in modules (prefopt.registry.BUILTIN_MODULES), so ``prefopt list`` shows it and a ``prefopt train`` recipe
can optimise it.
"""

from __future__ import annotations

import itertools
import math
import random
import re
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

    def counts(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        """Per response: tokens of the prompt's own group, of the other groups, and all tokens (EOS included)."""
        ids, mask = rollout.response_ids, rollout.response_mask.float()
        own = torch.tensor([prompt_group(p) for p in rollout.prompts], device=ids.device)
        hits = torch.stack([torch.isin(ids, g.to(ids.device)).float() * mask for g in self.groups])  # [G, B, T]
        counts = hits.sum(-1)  # [G, B]
        mine = counts.gather(0, own[None]).squeeze(0)
        return mine, counts.sum(0) - mine, mask.sum(-1)

    def __call__(self, rollout: Rollout) -> Tensor:
        mine, others, length = self.counts(rollout)
        return ((mine - self.penalty * others) / length.clamp(min=1)).to(self.device)

    def details(self, rollout: Rollout) -> dict[str, Tensor]:
        """``cond_acc`` = own / (own + other) target words (NaN for a response with none) and ``rule``, the
        prompt-blind rule's score (all target words / |y|)."""
        mine, others, length = self.counts(rollout)
        hits = mine + others
        cond_acc = torch.where(hits > 0, mine / hits.clamp(min=1), torch.full_like(hits, math.nan))
        return {"cond_acc": cond_acc.to(self.device), "rule": (hits / length.clamp(min=1)).to(self.device)}


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


def label_prompts(prompts: list[str], responses: list[list[str]], rewards: list[list[float]], temperature: float,
                  rng: random.Random) -> dict[str, Any]:
    """The labels of K responses per prompt (module docstring): a Plackett-Luce ranking per prompt, the pairs it
    implies (pairs of equal true reward dropped: their label is a coin flip), one KTO label per response (the top
    ranked desirable, the bottom ranked undesirable) and the summary: label agreement with the true reward over the
    pairs used."""
    ranks, pairs, kto = [], [], []
    used = ties = agree = 0
    for prompt, texts, values in zip(prompts, responses, rewards):
        ranking = plackett_luce(values, temperature, rng)
        ranks.append({"prompt": prompt, "responses": texts, "ranking": ranking})
        for a, b in itertools.combinations(ranking, 2):  # a ranked above b
            if texts[a] == texts[b] or not texts[a].strip() or not texts[b].strip():
                continue
            if values[a] == values[b]:
                ties += 1
                continue
            used += 1
            agree += values[a] > values[b]
            pairs.append({"prompt": prompt, "chosen": texts[a], "rejected": texts[b]})
        top, bottom = ranking[0], ranking[-1]
        if texts[top].strip() and texts[bottom].strip() and texts[top] != texts[bottom]:
            kto += [{"prompt": prompt, "completion": texts[top], "label": True},
                    {"prompt": prompt, "completion": texts[bottom], "label": False}]
    flat = [r for values in rewards for r in values]
    summary = {"prompts": len(prompts), "responses": len(flat), "pairs_used": used, "ties_dropped": ties,
               "label_agreement_over_pairs_used": agree / max(used, 1),
               "kto_rows": {"desirable": len(kto) // 2, "undesirable": len(kto) // 2},
               "start_true_reward": sum(flat) / max(len(flat), 1)}
    return {"ranks": ranks, "pairs": pairs, "kto": kto, "summary": summary}
