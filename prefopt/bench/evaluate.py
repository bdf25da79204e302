"""The bench's evaluation: every policy on the same prompt sets and pairs, sampled with the same seeds.

For a policy pi, the start pi_0 (the model every algorithm trained from) and the draw's scorers (gold: the true
reward or the gold RM; proxy: the draw's proxy RM), each sample row holds (prefopt/bench/runner.py: eval.jsonl):

* ``response`` y_i ~ pi(.|x_i), drawn by the ONE generation engine (prefopt.rl.engine) with batch b of a set seeded
  ``eval.seed + b`` (val: ``+ 100000``), the same draws of randomness for every policy (common random numbers);
* ``gold`` g(x_i, y_i), ``proxy``, and the gold scorer's ``details`` (world: ``cond_acc``, ``rule``);
* ``kl`` = sum_t [log pi(y_it | .) - log pi_0(y_it | .)], the sequence-level Monte-Carlo estimate of KL(pi || pi_0)
  (both from a teacher-forced forward at the sampling temperature, so pi_0 scores 0 exactly); ``logp`` = sum_t
  log pi(y_it | .); ``length`` (EOS included); ``entropy``: the mean token entropy of pi on its own sample.

Per held-out pair k: the summed log-probs of chosen and rejected under the policy (pref.jsonl), the reference's
once per draw (pairs.jsonl): implicit reward margin = (chosen - ref_chosen) - (rejected - ref_rejected).
Best-of-n: n_max responses per eval prompt from the start, chunk c of prompt batch b seeded
``eval.seed + 7919 draw_seed + 104729 c + b``, each scored by gold and proxy.

``Judge`` holds one draw's context (tokenizer, start, scorers, tokenized prompt sets and pairs), built once per
worker process and draw; the functions below it orchestrate a run's checkpoints and a draw's start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from prefopt.config import DataConfig, ModelConfig
from prefopt.data import build_dataloader
from prefopt.models import load_causal_lm, load_tokenizer
from prefopt.rl.engine import GenerationConfig, generate, rollout_inputs
from prefopt.rl.rewards import RewardSpec, build_component
from prefopt.scoring import sequence_logps, token_logps
from prefopt.types import Rollout

SET_OFFSET = {"eval": 0, "val": 100000}
"""Sampling-seed offset of each prompt set."""
BON_ROWS = 2048
"""Most sequences best-of-n samples per generate call."""


def text_rollout(tokenizer, prompts: list[str], responses: list[str]) -> Rollout:
    """A Rollout of given texts (each response ended by EOS), for scoring them with reward components."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(r, add_special_tokens=False, verbose=False)["input_ids"] + [eos] for r in responses]
    prompt_ids = [tokenizer(p, add_special_tokens=False, verbose=False)["input_ids"] for p in prompts]
    width, prompt_width = max(map(len, encoded)), max(map(len, prompt_ids))
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    left = torch.full((len(prompt_ids), prompt_width), pad, dtype=torch.long)
    left_mask = torch.zeros_like(left)
    for i, (row, prompt) in enumerate(zip(encoded, prompt_ids)):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        if prompt:
            left[i, -len(prompt):], left_mask[i, -len(prompt):] = torch.tensor(prompt), 1
    return Rollout(prompt_ids=left, prompt_mask=left_mask, response_ids=ids, response_mask=mask,
                   logprobs=torch.zeros(ids.shape), ended=torch.ones(len(encoded), dtype=torch.bool),
                   prompts=list(prompts), responses=list(responses))


def scores(scorer: Any, rollout: Rollout) -> dict[str, list[float]]:
    """The scorer's score of each response and its ``details`` columns (when it has them)."""
    out = {"score": scorer(rollout).float().tolist()}
    details = getattr(scorer, "details", None)
    if details is not None:
        out.update({name: values.float().tolist() for name, values in details(rollout).items()})
    return out


class Judge:
    """One draw's evaluation context (module docstring)."""

    def __init__(self, start: str, gold: dict[str, Any], proxy: dict[str, Any] | None, generation: GenerationConfig,
                 prompts: dict[str, list[dict[str, Any]]], pairs: list[dict[str, Any]], lengths: tuple[int, int],
                 batch_size: int, seed: int):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(ModelConfig(name_or_path=start))
        self.reference = self.load(start)
        self.gold = build_component(RewardSpec(**gold), self.tokenizer, self.device)
        self.proxy = build_component(RewardSpec(**proxy), self.tokenizer, self.device) if proxy else None
        self.generation, self.seed = generation, seed
        self.data = DataConfig(path="<eval>", eval_fraction=0.0, max_length=lengths[0], max_prompt_length=lengths[1])
        self.batch_size = batch_size
        self.sets = {name: self._batches(rows, "prompts") for name, rows in prompts.items() if rows}
        self.pairs = pairs
        self.pair_batches = self._batches(pairs, "pairs") if pairs else []

    def _batches(self, rows: list[dict[str, Any]], kind: str) -> list[Any]:
        loader, _ = build_dataloader(rows, kind, self.tokenizer, self.data, self.batch_size, shuffle=False, seed=0)
        return [batch.to(self.device) for batch in loader]

    def load(self, path: str | Path) -> torch.nn.Module:
        return load_causal_lm(ModelConfig(name_or_path=str(path)), trainable=False).to(self.device)

    def score(self, rollout: Rollout) -> list[dict[str, Any]]:
        """Per response: gold (+ its details; ``cond_acc`` None when the gold has none) and proxy."""
        gold = scores(self.gold, rollout)
        rows = [{"gold": g, "cond_acc": None, **{k: v[i] for k, v in gold.items() if k != "score"}}
                for i, g in enumerate(gold["score"])]
        if self.proxy is not None:
            for row, p in zip(rows, self.proxy(rollout).float().tolist()):
                row["proxy"] = p
        return rows

    @torch.no_grad()
    def samples(self, model: torch.nn.Module, prompt_set: str) -> list[dict[str, Any]]:
        """One seeded response per prompt of a set, scored (module docstring); row i = prompt i."""
        gen, rows = self.generation, []
        for b, batch in enumerate(self.sets[prompt_set]):
            rollout = generate(model, self.tokenizer, batch, gen, seed=self.seed + SET_OFFSET[prompt_set] + b)
            sequences, attention_mask, score_mask = rollout_inputs(rollout)
            width = rollout.prompt_ids.shape[1]
            mask = rollout.response_mask.float()
            logps, entropy = (t[:, width:] for t in token_logps(model, sequences, attention_mask, score_mask,
                                                                   gen.logprob_temperature, with_entropy=True))
            ref = token_logps(self.reference, sequences, attention_mask, score_mask, gen.logprob_temperature)[0]
            kl = ((logps - ref[:, width:]) * mask).sum(-1)
            entropy = (entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            for i, scored in enumerate(self.score(rollout)):
                rows.append({**scored, "response": rollout.responses[i], "kl": float(kl[i]),
                             "logp": float((logps[i] * mask[i]).sum()), "length": int(mask[i].sum()),
                             "entropy": float(entropy[i])})
        return rows

    @torch.no_grad()
    def pair_logps(self, model: torch.nn.Module) -> list[tuple[float, float]]:
        """Summed response log-probs (chosen, rejected) of every held-out pair."""
        out: list[tuple[float, float]] = []
        for batch in self.pair_batches:
            logps, _ = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
            chosen, rejected = logps.chunk(2)
            out += list(zip(chosen.tolist(), rejected.tolist()))
        return out

    @torch.no_grad()
    def best_of_n(self, n_max: int, draw_seed: int) -> list[dict[str, Any]]:
        """n_max responses per eval prompt from the start (module docstring): rows {i, j, gold, proxy, length, ...}."""
        rows: list[dict[str, Any]] = []
        first = 0
        for b, batch in enumerate(self.sets["eval"]):
            prompts = batch.input_ids.shape[0]
            chunk = max(1, min(n_max, BON_ROWS // prompts))
            for c, j0 in enumerate(range(0, n_max, chunk)):
                n = min(chunk, n_max - j0)
                rollout = generate(self.reference, self.tokenizer, batch, self.generation, num_samples=n,
                                   seed=self.seed + 7919 * draw_seed + 104729 * c + b)
                lengths = rollout.response_mask.sum(-1).tolist()
                for r, scored in enumerate(self.score(rollout)):
                    rows.append({"i": first + r // n, "j": j0 + r % n, "length": int(lengths[r]), **scored})
            first += prompts
        return sorted(rows, key=lambda row: (row["i"], row["j"]))


def evaluate_policy(judge: Judge, path: str | Path, step: int, prompt_set: str | None,
                    with_pairs: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One checkpoint: its sample rows on ``prompt_set`` and its pair rows (eval.jsonl, pref.jsonl)."""
    model = judge.load(path)
    samples = judge.samples(model, prompt_set) if prompt_set else []
    rows = [{"step": step, "set": prompt_set, "i": i, **row} for i, row in enumerate(samples)]
    pairs = [{"step": step, "k": k, "chosen": c, "rejected": r}
             for k, (c, r) in enumerate(judge.pair_logps(model))] if with_pairs else []
    return rows, pairs


def evaluate_start(judge: Judge, n_max: int, draw_seed: int) -> dict[str, list[dict[str, Any]]]:
    """The start on every prompt set (start.jsonl), its best-of-n draws and the held-out pairs with the reference's
    log-probs and their gold scores (pairs.jsonl)."""
    start = [{"step": 0, "set": name, "i": i, **row} for name in judge.sets
             for i, row in enumerate(judge.samples(judge.reference, name))]
    pairs = []
    if judge.pairs:
        prompts = [p["prompt"] for p in judge.pairs]
        chosen = judge.score(text_rollout(judge.tokenizer, prompts, [p["chosen"] for p in judge.pairs]))
        rejected = judge.score(text_rollout(judge.tokenizer, prompts, [p["rejected"] for p in judge.pairs]))
        for k, (pair, logps) in enumerate(zip(judge.pairs, judge.pair_logps(judge.reference))):
            pairs.append({"k": k, "prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
                          "ref_chosen": logps[0], "ref_rejected": logps[1], "gold_chosen": chosen[k]["gold"],
                          "gold_rejected": rejected[k]["gold"]})
    return {"start": start, "best_of_n": judge.best_of_n(n_max, draw_seed) if n_max else [], "pairs": pairs}


def pair_accuracy(scorer: Any, tokenizer, pairs: list[dict[str, Any]], batch_size: int = 256) -> dict[str, Any]:
    """How often ``scorer`` ranks chosen above rejected (ties 1/2) on labelled text pairs, with a 95% Wilson
    interval; also the scorer's ``details`` columns' accuracies (``<name>_accuracy``)."""
    wins: dict[str, float] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [p["prompt"] for p in chunk]
        chosen = scores(scorer, text_rollout(tokenizer, prompts, [p["chosen"] for p in chunk]))
        rejected = scores(scorer, text_rollout(tokenizer, prompts, [p["rejected"] for p in chunk]))
        for name in chosen:
            wins[name] = wins.get(name, 0.0) + sum(1.0 if a > b else 0.5 if a == b else 0.0
                                                   for a, b in zip(chosen[name], rejected[name]))
    n = len(pairs)
    accuracy = wins.get("score", 0.0) / max(n, 1)
    out = {"n_pairs": n, "accuracy": accuracy, "ci95": list(wilson(accuracy, n))}
    out.update({f"{name}_accuracy": value / max(n, 1) for name, value in wins.items() if name != "score"})
    return out


def wilson(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion p over n trials."""
    if n == 0:
        return math.nan, math.nan
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
