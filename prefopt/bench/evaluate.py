"""The bench's evaluation, on the ONE evaluation core (prefopt.judge, the code of ``prefopt eval``): every policy on
the same prompt sets and pairs, sampled with the same seeds.

``Evaluation`` is one world draw's context, built once per worker process: the tokenizer, the start pi_0 (the
reference of every KL and implicit reward), the judges (``gold``: the true reward or the gold RM, with the world's
``cond_acc`` and ``rule`` columns; ``proxy``: the draw's proxy RM), the tokenized prompt sets and held-out pairs.

* ``samples(model, set)``: prefopt.judge.sample_and_measure with reply b of a set seeded ``eval.seed + b`` (val:
  ``+ 100000``), the same for every policy (common random numbers): one row per prompt i with its response, the
  judges' scores, ``kl`` to pi_0, ``logp``, ``length`` and ``entropy`` (prefopt.judge.sampling states each);
* ``preference(model)``: prefopt.judge.preference_rows on the held-out pairs: the implicit-reward margin
  (log pi(y_w)/pi_0(y_w) - log pi(y_l)/pi_0(y_l)) and accuracies per pair;
* ``best_of_n(n, draw_seed)``: n replies per eval prompt from the start (seed ``eval.seed + 7919 draw_seed``), judged;
* ``pair_accuracy(judge, pairs)``: how often a judge (a reward model, the true reward, the rule) ranks the labelled
  chosen reply first (ties 1/2), with its 95% interval over pairs (prefopt.judge.mean_interval).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from prefopt.config import DataConfig, ModelConfig
from prefopt.data import build_dataloader
from prefopt.judge import mean_interval, pair_logps, paired_wins, preference_rows, sample_and_measure
from prefopt.models import load_causal_lm, load_tokenizer
from prefopt.rl.engine import GenerationConfig
from prefopt.rl.rewards import RewardSpec, build_component
from prefopt.types import Rollout

SET_OFFSET = {"eval": 0, "val": 100000}
"""Sampling-seed offset of each prompt set."""
COLUMNS = ("gold", "proxy", "cond_acc", "rule", "kl", "logp", "length", "entropy", "response")
"""The columns of a sample row (eval.jsonl, start.jsonl) besides step, set and i."""


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


def _number(value: Any) -> Any:
    """NaN (a judge's "no score", e.g. cond_acc of a reply without target words) as None, like the files."""
    return None if isinstance(value, float) and math.isnan(value) else value


def judges(gold: Any, proxy: Any | None) -> dict[str, Any]:
    """The judges of a draw: gold (and the columns of its ``details``, e.g. the world's cond_acc), proxy."""
    out = {"gold": gold}
    if hasattr(gold, "details"):
        for name in ("cond_acc", "rule"):
            out[name] = lambda rollout, name=name: gold.details(rollout)[name]
    if proxy is not None:
        out["proxy"] = proxy
    return out


def pair_accuracy(judge: Any, tokenizer, pairs: list[dict[str, Any]], batch_size: int = 256) -> dict[str, Any]:
    """How often ``judge`` scores the chosen reply of a labelled pair above the rejected one (ties 1/2), with the
    95% interval over pairs: {n_pairs, accuracy, ci95}."""
    wins: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [p["prompt"] for p in chunk]
        chosen = judge(text_rollout(tokenizer, prompts, [p["chosen"] for p in chunk])).float().tolist()
        rejected = judge(text_rollout(tokenizer, prompts, [p["rejected"] for p in chunk])).float().tolist()
        wins += paired_wins(chosen, rejected)
    accuracy, low, high = mean_interval(wins, 0.95, (0.0, 1.0))
    return {"n_pairs": len(pairs), "accuracy": accuracy, "ci95": [low, high]}


class Evaluation:
    """One draw's evaluation context (module docstring)."""

    def __init__(self, start: str, gold: dict[str, Any], proxy: dict[str, Any] | None, generation: GenerationConfig,
                 prompts: dict[str, list[dict[str, Any]]], pairs: list[dict[str, Any]], lengths: tuple[int, int],
                 batch_size: int, seed: int):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(ModelConfig(name_or_path=start))
        self.start, self.shell, self.shell_config = start, None, None
        self.reference = self.load(start)
        self.gold = build_component(RewardSpec(**gold), self.tokenizer, self.device)
        self.proxy = build_component(RewardSpec(**proxy), self.tokenizer, self.device) if proxy else None
        self.judges = judges(self.gold, self.proxy)
        self.generation, self.seed, self.batch_size = generation, seed, batch_size
        self.data = DataConfig(path="<eval>", eval_fraction=0.0, max_length=lengths[0], max_prompt_length=lengths[1])
        self.sets = {name: self._batches(rows, "prompts") for name, rows in prompts.items() if rows}
        self.pairs = pairs
        self.pair_batches = self._batches(pairs, "pairs") if pairs else []
        self.reference_pairs = pair_logps(self.reference, self.pair_batches) if pairs else None

    def _batches(self, rows: list[dict[str, Any]], kind: str) -> list[Any]:
        loader, _ = build_dataloader(rows, kind, self.tokenizer, self.data, self.batch_size, shuffle=False, seed=0)
        return list(loader)

    def load(self, path: str | Path) -> torch.nn.Module:
        return load_causal_lm(ModelConfig(name_or_path=str(path)), trainable=False).to(self.device)

    def checkpoint(self, path: str | Path) -> torch.nn.Module:
        """A checkpoint of a run as a policy: its weights loaded into one model kept for this draw (a saved model of
        the start's architecture, its tied weights left out), else ``load`` (a different config, an adapter)."""
        path = Path(path)
        if self.shell is None:
            self.shell = self.load(self.start)
            self.shell_config = json.loads((Path(self.start) / "config.json").read_text())
        weights = path / "model.safetensors"
        if weights.is_file() and json.loads((path / "config.json").read_text()) == self.shell_config:
            state = load_file(weights, device=str(self.device))
            current = self.shell.state_dict(keep_vars=True)
            storage = {}
            for name, tensor in current.items():
                storage.setdefault(tensor.data_ptr(), []).append(name)
            missing = set(current) - set(state)
            tied = all(any(other in state for other in storage[current[name].data_ptr()]) for name in missing)
            if tied and set(state) <= set(current):
                self.shell.load_state_dict(state, strict=False)
                return self.shell
        return self.load(path)

    def samples(self, model: torch.nn.Module, prompt_set: str) -> list[dict[str, Any]]:
        """One seeded reply per prompt of a set, judged and measured; row i answers prompt i."""
        rows = sample_and_measure(model, self.tokenizer, self.sets[prompt_set], self.generation,
                                  self.seed + SET_OFFSET[prompt_set], judges=self.judges, reference=self.reference,
                                  entropy=True)
        return [{"i": row["prompt_index"], **{k: _number(row.get(k)) for k in COLUMNS}} for row in rows]

    def preference(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Per held-out pair k: the policy's summed log-probs of chosen and rejected, the implicit-reward margin and
        whether it (and the plain log-probs) rank the chosen first."""
        chosen, rejected = pair_logps(model, self.pair_batches)
        rows = preference_rows((chosen, rejected), self.reference_pairs)
        return [{"k": row["pair_index"], "chosen": c, "rejected": r, **{k: v for k, v in row.items()
                                                                       if k != "pair_index"}}
                for row, c, r in zip(rows, chosen.tolist(), rejected.tolist())]

    def best_of_n(self, n: int, draw_seed: int) -> list[dict[str, Any]]:
        """n replies per eval prompt from the start, judged: rows {i, j, gold, proxy, length, cond_acc}."""
        rows = sample_and_measure(self.reference, self.tokenizer, self.sets["eval"], self.generation,
                                  self.seed + 7919 * draw_seed, num_samples=n, judges=self.judges, policy=False)
        return [{"i": row["prompt_index"], "j": row["sample"], "length": row["length"],
                 **{k: _number(row.get(k)) for k in ("gold", "proxy", "cond_acc")}} for row in rows]

    def start_pairs(self) -> list[dict[str, Any]]:
        """The held-out pairs with the start's summed log-probs and the gold judge's score of each reply."""
        if not self.pairs:
            return []
        prompts = [p["prompt"] for p in self.pairs]
        gold = [self.gold(text_rollout(self.tokenizer, prompts, [p[side] for p in self.pairs])).float().tolist()
                for side in ("chosen", "rejected")]
        ref_chosen, ref_rejected = (t.tolist() for t in self.reference_pairs)
        return [{"k": k, "prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                 "ref_chosen": ref_chosen[k], "ref_rejected": ref_rejected[k], "gold_chosen": gold[0][k],
                 "gold_rejected": gold[1][k]} for k, p in enumerate(self.pairs)]


def evaluate_policy(evaluation: Evaluation, path: str | Path, step: int, prompt_set: str | None,
                    with_pairs: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One checkpoint: its sample rows on ``prompt_set`` and its pair rows (eval.jsonl, pref.jsonl)."""
    model = evaluation.checkpoint(path)
    rows = [{"step": step, "set": prompt_set, **row} for row in evaluation.samples(model, prompt_set)] \
        if prompt_set else []
    pairs = [{"step": step, **row} for row in evaluation.preference(model)] if with_pairs and evaluation.pairs else []
    return rows, pairs


def evaluate_start(evaluation: Evaluation, n_max: int, draw_seed: int) -> dict[str, list[dict[str, Any]]]:
    """The start on every prompt set (start.jsonl), its best-of-n replies and the held-out pairs (pairs.jsonl)."""
    start = [{"step": 0, "set": name, **row} for name in evaluation.sets
             for row in evaluation.samples(evaluation.reference, name)]
    return {"start": start, "best_of_n": evaluation.best_of_n(n_max, draw_seed) if n_max else [],
            "pairs": evaluation.start_pairs()}
