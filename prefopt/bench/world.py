"""The known-gold preference world: Gao et al. 2022's gold/proxy protocol (arXiv 2210.10760) with an EXACT gold.

Prompts are short HH-style questions that show the words of one group: ``"\\n\\nHuman: What is chess? Words: it is I
and.\\n\\nAssistant:"``.
The 16 target words of prefopt.tasks form ``len(GROUPS)`` = 4 groups of 4 (``GROUPS``); a prompt's group G(x) is
drawn uniformly and its words are shown in a random order. For a response y of at most T tokens (T, the
``budget``, is the world's fixed response length, ``max_new_tokens``) let

    own(x, y)   = #{t : y_t in G(x)},        other(x, y) = #{t : y_t in a group other than G(x)}.

The true (gold) reward is

    r(x, y) = ( min(own, T) - lambda * other ) / T                                            (1)

and the conditional accuracy of a response with own + other > 0 is  c(x, y) = own / (own + other).

Why this form:
* r is normalised by the FIXED budget T, not by |y|: a response earns 1/T per own-group word, so it can only
  lose by stopping early, and no length is paid for. (The density own/|y| gave an empty response 0 but a
  one-word response the maximum 1: with the summed per-token KL penalty PPO on the true reward shrank its
  responses from 11.7 to 4.6 tokens and lost to PPO on the proxy.) Length is recorded beside every point anyway.
* the skill is prompt-conditional: for uniform groups a policy that ignores the prompt has
  E_x[own] = sum_g P(g) E[#G_g words] <= T / len(GROUPS), so it scores at most 1/4 of the maximum 1 (less with
  lambda > 0). Copying the shown words scores 1.
* a proxy that learns only "target words are good" (the prompt-blind rule: count all 16 words) is exploitable:
  pushing it emits the other groups' words, which r does not pay for (lambda = 0) or penalises (lambda > 0).

Labels (``label_prompts``): for each labelled prompt, K responses are sampled from the start and ranked by
Plackett-Luce on r / tau: every DISTINCT value of r among the K gets one Gumbel draw, and levels are sorted by
r / tau + Gumbel (Gumbel-max), so any two responses with different r are ordered by Bradley-Terry,
P(a > b) = sigmoid((r(a) - r(b)) / tau), and responses with EQUAL r are tied (the labeller says so: no coin flip
enters the data). The ranking is written as scores (the level's place, higher is better, ties equal), so the proxy
RM's K-wise loss, the offline algorithms' pairs (``implied_pairs``: every pair of different score) and the label
agreement (the share of those pairs that r orders the same way) all read the same pairs.
Empty responses are not labelled. KTO (``kto_rows``) gets one label per response: the first response of the
top level desirable, the first of the bottom level undesirable (none when all K are tied), so no response is
ever both. Online algorithms optimise the proxy RM; every algorithm is judged by r.

Everything here is pure maths on texts, token ids and numbers (no files, no models): prefopt.bench.stages samples
the replies and writes the labels, prefopt.bench.data the start's demonstrations. The reward component
``world_gold`` is registered when the registry loads its built-in modules (prefopt.registry.BUILTIN_MODULES), so
``prefopt list`` shows it and a ``prefopt train`` recipe can optimise it without importing the bench.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Collection
from itertools import combinations
from typing import Any

import torch
from torch import Tensor

from prefopt.registry import REWARDS
from prefopt.tasks import TARGET_WORDS, _TOPICS, token_ids
from prefopt.types import Rollout

GROUPS: tuple[tuple[str, ...], ...] = tuple(tuple(TARGET_WORDS[g::4]) for g in range(4))
"""The word groups (each word one token of the tiny HH tokenizers)."""
_QUESTIONS = ("{}?", "What is {}?", "Tell me about {}.", "Help with {}.")  # short: ~26 prompt tokens in all
_HINT = re.compile(r"Words:((?: \w+)+)\.\n\nAssistant:$")


# ------------------------------------------------------------------------------------------------ prompts


PROMPT_SPACE = len(_QUESTIONS) * len(_TOPICS) * len(GROUPS) * math.factorial(len(GROUPS[0]))
"""How many distinct prompts there are (templates x topics x groups x orders of the shown words)."""


def world_prompts(n: int, seed: int = 0, exclude: Collection[str] = (), distinct: bool = True) -> list[str]:
    """``n`` prompts, each a question and the words of one group in a random order (the group drawn uniformly),
    none of them in ``exclude``; ``distinct``: no prompt twice (the labelled and evaluated sets), else repeats
    allowed (the start's demonstrations). ValueError when fewer than ``n`` distinct prompts are left."""
    excluded = set(exclude)
    if n > 0 and (PROMPT_SPACE <= len(excluded) or distinct and n > PROMPT_SPACE - len(excluded)):
        raise ValueError(f"world_prompts: {n} distinct prompts asked, {PROMPT_SPACE - len(excluded)} left "
                         f"({PROMPT_SPACE} in the world, {len(excluded)} excluded)")
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        group = list(GROUPS[rng.randrange(len(GROUPS))])
        rng.shuffle(group)
        question = rng.choice(_QUESTIONS).format(rng.choice(_TOPICS))
        prompt = f"\n\nHuman: {question} Words:{''.join(group)}.\n\nAssistant:"
        if prompt in excluded or (distinct and prompt in seen):
            continue
        seen.add(prompt)
        out.append(prompt)
    return out


def prompt_group(prompt: str) -> int:
    """Index of the group a prompt shows; ValueError for a prompt of another world."""
    match = _HINT.search(prompt)
    words = {f" {w}" for w in match.group(1).split()} if match else set()
    for index, group in enumerate(GROUPS):
        if words and words <= set(group):
            return index
    raise ValueError(f"not a prompt of the known-gold world (no 'Words: ...' of one group before the assistant "
                     f"turn): {prompt[-80:]!r}")


# ------------------------------------------------------------------------------------------------ the true reward


def group_counts(response_ids: Tensor, response_mask: Tensor, own_group: Tensor,
                 group_ids: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(own [B], other [B]): tokens of each response (under the mask) in its prompt's group and in any other group.

    ``own_group`` [B] is each row's group index, ``group_ids[g]`` the token ids of group g."""
    mask = response_mask.float()
    hits = torch.stack([torch.isin(response_ids, ids.to(response_ids.device)).float() * mask for ids in group_ids])
    counts = hits.sum(-1)  # [G, B]
    own = counts.gather(0, own_group.to(counts.device)[None]).squeeze(0)
    return own, counts.sum(0) - own


def true_reward(own: Tensor, other: Tensor, budget: int, penalty: float = 0.0) -> Tensor:
    """Equation (1): ``(min(own, T) - lambda * other) / T`` with T = ``budget``."""
    return (own.clamp(max=budget) - penalty * other) / budget


def conditional_accuracy(own: Tensor, other: Tensor) -> Tensor:
    """``own / (own + other)`` per response; NaN where the response holds no target word."""
    total = own + other
    return torch.where(total > 0, own / total.clamp(min=1), torch.full_like(total, float("nan")))


@REWARDS.register("world_gold")
class WorldGoldReward:
    """The world's true reward r(x, y) (equation (1) of prefopt.bench.world): ``budget`` is T, ``penalty`` lambda.

    ``details(rollout)`` gives the evaluation's extra columns: ``cond_acc`` (NaN without target words) and
    ``rule``, the prompt-blind rule's score (own + other) / T."""

    def __init__(self, tokenizer, device, budget: int, penalty: float = 0.0):
        if budget < 1:
            raise ValueError(f"world_gold: budget={budget!r} must be >= 1 (the world's response length)")
        self.group_ids = [torch.tensor(token_ids(tokenizer, list(group))) for group in GROUPS]
        self.budget, self.penalty, self.device = int(budget), float(penalty), device

    def counts(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """(own [B], other [B]) target words of each response."""
        own_group = torch.tensor([prompt_group(p) for p in rollout.prompts])
        return group_counts(rollout.response_ids, rollout.response_mask, own_group, self.group_ids)

    def __call__(self, rollout: Rollout) -> Tensor:
        own, other = self.counts(rollout)
        return true_reward(own, other, self.budget, self.penalty).to(self.device)

    def details(self, rollout: Rollout) -> dict[str, Tensor]:
        own, other = self.counts(rollout)
        return {"cond_acc": conditional_accuracy(own, other).to(self.device),
                "rule": ((own + other) / self.budget).to(self.device)}


def gold_spec(budget: int, penalty: float = 0.0) -> dict[str, Any]:
    """The true reward as a RewardSpec mapping."""
    return {"name": "world_gold", "weight": 1.0, "params": {"budget": budget, "penalty": penalty}}


def oracle_weight(true_rewards: list[float], proxy_scores: list[float]) -> float:
    """The weight a of the oracle's reward a * r: the least-squares slope of the proxy's score on r over the same
    responses (the start's samples), a = cov(proxy, r) / var(r), so that the true reward is in the proxy's units
    and one KL coefficient is the same trade-off for the oracle and for the runs on the proxy (module docstring)."""
    n = len(true_rewards)
    if n != len(proxy_scores) or n < 2:
        raise ValueError(f"oracle_weight: {n} true rewards and {len(proxy_scores)} proxy scores (need >= 2 of each)")
    mean_r, mean_p = sum(true_rewards) / n, sum(proxy_scores) / n
    var = sum((r - mean_r) ** 2 for r in true_rewards) / n
    if var == 0:
        raise ValueError("oracle_weight: the true reward is constant over these responses")
    return sum((r - mean_r) * (p - mean_p) for r, p in zip(true_rewards, proxy_scores)) / n / var


# ------------------------------------------------------------------------------------------------ labels


def plackett_luce_scores(rewards: list[float], temperature: float, rng: random.Random) -> list[int]:
    """The labeller's weak ranking of K responses as scores (higher is better, equal r -> equal score).

    The distinct values of r are sorted by r / tau + Gumbel noise (one draw per value, in increasing order of r);
    a response's score is the number of values ranked below its own."""
    levels = sorted(set(rewards))
    keys = {r: r / temperature - math.log(-math.log(min(max(rng.random(), 1e-12), 1 - 1e-12))) for r in levels}
    place = {r: i for i, r in enumerate(sorted(levels, key=lambda r: keys[r]))}  # worst first
    return [place[r] for r in rewards]


def implied_pairs(scores: list[float]) -> list[tuple[int, int]]:
    """Every (better, worse) index pair of a weak ranking: the pairs of different score (ties dropped)."""
    return [(a, b) if scores[a] > scores[b] else (b, a)
            for a, b in combinations(range(len(scores)), 2) if scores[a] != scores[b]]


def kto_rows(scores: list[float]) -> tuple[int, int] | None:
    """(desirable, undesirable) response indices: the first of the top score and the first of the bottom score;
    None when every response is tied."""
    if len(set(scores)) < 2:
        return None
    return scores.index(max(scores)), scores.index(min(scores))


def label_prompts(prompts: list[str], responses: list[list[str]], rewards: list[list[float]], temperature: float,
                  rng: random.Random) -> dict[str, Any]:
    """The labels of K responses per prompt (module docstring): per prompt its distinct non-empty responses with
    the labeller's scores (``ranks`` rows ``{prompt, responses, scores}``), the pairs they imply (``pairs``, ties
    dropped), one KTO label per response (``kto``), and the ``summary``: counts, the ties dropped and the label
    agreement with r over the pairs used."""
    ranks, pairs, kto = [], [], []
    agree = ties = other = 0
    for prompt, texts, values in zip(prompts, responses, rewards):
        kept: dict[str, float] = {}
        for text, r in zip(texts, values):
            if text.strip() and text not in kept:
                kept[text] = r
        kept_texts, kept_values = list(kept), list(kept.values())
        other += len(texts) * (len(texts) - 1) // 2 - len(kept) * (len(kept) - 1) // 2
        scores = plackett_luce_scores(kept_values, temperature, rng)
        implied = implied_pairs(scores)
        ties += len(kept) * (len(kept) - 1) // 2 - len(implied)
        if not implied:
            continue
        ranks.append({"prompt": prompt, "responses": kept_texts, "scores": scores})
        pairs += [{"prompt": prompt, "chosen": kept_texts[a], "rejected": kept_texts[b]} for a, b in implied]
        agree += sum(kept_values[a] > kept_values[b] for a, b in implied)
        good, bad = kto_rows(scores)
        kto += [{"prompt": prompt, "completion": kept_texts[good], "label": True},
                {"prompt": prompt, "completion": kept_texts[bad], "label": False}]
    flat = [r for values in rewards for r in values]
    summary = {"prompts": len(prompts), "prompts_labelled": len(ranks), "responses": len(flat),
               "pairs_used": len(pairs), "ties_dropped": ties, "empty_or_repeated_dropped": other,
               "label_agreement_over_pairs_used": agree / max(len(pairs), 1),
               "kto_rows": {"desirable": len(kto) // 2, "undesirable": len(kto) // 2},
               "label_temperature": temperature, "start_true_reward": sum(flat) / max(len(flat), 1)}
    return {"ranks": ranks, "pairs": pairs, "kto": kto, "summary": summary}


# ------------------------------------------------------------------------------------------------ the start


def demonstrations(prompts: list[str], replies: list[str], rng: random.Random, words: int = 4,
                   reply_words: int = 10) -> list[dict[str, str]]:
    """The start's world demonstrations: per prompt, the first ``reply_words`` words of a reply drawn from
    ``replies`` (e.g. HH assistant turns) with ``words`` words of the prompt's group inserted at random places.
    A start fine-tuned on them copies the shown words some of the time (module docstring: the weak skill the
    algorithms are measured on sharpening)."""
    pool = [reply.split() for reply in replies if reply.split()]
    if not pool:
        raise ValueError("demonstrations: no non-empty reply to build on")
    rows = []
    for prompt in prompts:
        group = GROUPS[prompt_group(prompt)]
        text = list(rng.choice(pool)[:reply_words])
        for _ in range(words):
            text.insert(rng.randrange(len(text) + 1), rng.choice(group).strip())
        rows.append({"prompt": prompt, "completion": " " + " ".join(text)})
    return rows
