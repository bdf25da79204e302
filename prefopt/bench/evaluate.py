"""The shared evaluation: every policy on the same eval prompts and pairs, sampled with the same seeds.

For a policy pi, the start policy pi_0 (the SFT checkpoint every algorithm trained from) and the gold scorer
g (the gold RM, or the known task reward):

* responses y_i ~ pi(.|x_i) for the eval prompts, drawn by the ONE generation engine (prefopt.rl.engine) with
  batch b seeded ``eval.seed + b`` (the same draws of randomness for every policy);
* ``gold_reward``     = mean_i g(x_i, y_i)  (and ``proxy_reward`` with the proxy RM, task hh);
* ``kl``              = mean_i sum_t [log pi(y_it | x_i, y_i<t) - log pi_0(y_it | x_i, y_i<t)], the sequence-level
  Monte-Carlo estimate of KL(pi || pi_0) on the sampled tokens (both log-probs from a teacher-forced forward at
  the sampling temperature, so pi_0 scores 0 exactly);
* ``win_rate``        = mean_i [g(x_i, y_i) > g(x_i, y0_i)] + 0.5 [=], y0_i the start's sample for the same prompt
  and seed;
* ``pref_acc``        = accuracy of the IMPLICIT reward on eval pairs: log pi(y_w)/pi_0(y_w) > log pi(y_l)/pi_0(y_l)
  (ties count 1/2, so the start itself scores 0.5); ``pref_acc_logprob`` = plain log-prob ranking
  log pi(y_w) > log pi(y_l);
* ``length``          = mean response tokens (EOS included);
* ``entropy``         = mean over eval samples of the policy's mean per-token entropy (nats) on its own sample.

Prompt sets: ``eval`` (reported) and, in the world task, ``val`` (learning-rate and KL-knob selection), each
batch b of a set seeded ``eval.seed + b`` (val: ``eval.seed + 100000 + b``).

Best-of-n (``best_of_n_samples``): n_max responses per eval prompt from the start, draw j of prompt batch b seeded
``eval.seed + 7919 (seed + 1) + 104729 j + b``, each with its gold and proxy score; best-of-n for n <= n_max is
the first n draws' argmax under the proxy (prefopt.bench.frontier), with analytic KL log n - (n - 1) / n
(Stiennon et al. 2020; Gao et al. 2022).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from prefopt.bench.config import BenchConfig
from prefopt.bench.data import write_jsonl
from prefopt.config import DataConfig, ModelConfig
from prefopt.data import build_dataloader
from prefopt.models import load_causal_lm, load_tokenizer
from prefopt.rl.engine import generate, rollout_inputs
from prefopt.rl.rewards import RewardSpec, build_component
from prefopt.scoring import sequence_logps, token_logps


@dataclass
class PolicyEval:
    """One policy's evaluation: the metrics and one row per eval prompt (prompt, response, scores)."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]]


class Evaluator:
    """Holds the start (reference) policy, the scorers and the tokenized eval set; ``evaluate(model)``."""

    def __init__(self, cfg: BenchConfig, start_path: str, gold: dict[str, Any], proxy: dict[str, Any] | None,
                 prompts: list[dict[str, Any]], pairs: list[dict[str, Any]], device: torch.device | None = None,
                 val_prompts: list[dict[str, Any]] | None = None):
        self.cfg = cfg
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(ModelConfig(name_or_path=start_path))
        self.reference = self.load_policy(start_path)
        self.gold = build_component(RewardSpec(**gold), self.tokenizer, self.device)
        self.proxy = build_component(RewardSpec(**proxy), self.tokenizer, self.device) if proxy else None
        data = DataConfig(path="<eval>", eval_fraction=0.0, max_length=cfg.data.max_length,
                          max_prompt_length=cfg.data.max_prompt_length)
        size = cfg.eval.batch_size
        self.sets = {}
        for name, rows in (("eval", prompts), ("val", val_prompts or [])):
            if rows:
                loader, _ = build_dataloader(rows, "prompts", self.tokenizer, data, size, shuffle=False, seed=0)
                self.sets[name] = [batch.to(self.device) for batch in loader]
        self.prompt_batches = self.sets["eval"]
        self.pair_batches = []
        if pairs:
            loader, _ = build_dataloader(pairs, "pairs", self.tokenizer, data, size, shuffle=False, seed=0)
            self.pair_batches = [batch.to(self.device) for batch in loader]
        self.reference_pairs = [self.pair_logps(self.reference, b) for b in self.pair_batches]
        self.baseline: PolicyEval | None = None

    def load_policy(self, path: str) -> torch.nn.Module:
        return load_causal_lm(ModelConfig(name_or_path=str(path)), trainable=False).to(self.device)

    @torch.no_grad()
    def pair_logps(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs (chosen [B], rejected [B]) of a pair batch."""
        logps, _ = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
        return logps.chunk(2)

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, prompt_set: str = "eval") -> list[dict[str, Any]]:
        """One seeded response per prompt of a set, with its gold / proxy score, KL to the start, length and
        mean token entropy."""
        gen = self.cfg.eval.generation
        offset = self.cfg.eval.seed + (100000 if prompt_set == "val" else 0)
        rows: list[dict[str, Any]] = []
        for b, batch in enumerate(self.sets[prompt_set]):
            rollout = generate(model, self.tokenizer, batch, gen, seed=offset + b)
            sequences, attention_mask, score_mask = rollout_inputs(rollout)
            width = rollout.prompt_ids.shape[1]
            mask = rollout.response_mask.float()
            logps, entropy = (t[:, width:] for t in token_logps(model, sequences, attention_mask, score_mask,
                                                                   gen.logprob_temperature, with_entropy=True))
            ref_logps = token_logps(self.reference, sequences, attention_mask, score_mask,
                                    gen.logprob_temperature)[0][:, width:]
            kl = ((logps - ref_logps) * mask).sum(-1)
            entropy = (entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            gold = self.gold(rollout).float()
            proxy = self.proxy(rollout).float() if self.proxy is not None else None
            for i, (prompt, response) in enumerate(zip(rollout.prompts, rollout.responses)):
                row = {"prompt": prompt, "response": response, "gold": float(gold[i]), "kl": float(kl[i]),
                       "logp": float((logps[i] * mask[i]).sum()), "length": int(mask[i].sum()),
                       "entropy": float(entropy[i])}
                if proxy is not None:
                    row["proxy"] = float(proxy[i])
                rows.append(row)
        return rows

    @torch.no_grad()
    def best_of_n_samples(self, n_max: int, seed: int) -> list[dict[str, Any]]:
        """n_max responses per eval prompt from the start (module docstring): rows {i, j, gold, proxy, length}."""
        gen = self.cfg.eval.generation
        rows: list[dict[str, Any]] = []
        for j in range(n_max):
            i = 0
            for b, batch in enumerate(self.prompt_batches):
                rollout = generate(self.reference, self.tokenizer, batch, gen,
                                   seed=self.cfg.eval.seed + 7919 * (seed + 1) + 104729 * j + b)
                gold = self.gold(rollout).float()
                proxy = self.proxy(rollout).float() if self.proxy is not None else gold
                lengths = rollout.response_mask.sum(-1)
                for k, response in enumerate(rollout.responses):
                    rows.append({"i": i, "j": j, "gold": float(gold[k]), "proxy": float(proxy[k]),
                                 "length": int(lengths[k]), "response": response})
                    i += 1
        return rows

    @torch.no_grad()
    def preference(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.pair_batches:
            return {}
        implicit, logprob, total = 0.0, 0.0, 0
        for batch, (ref_chosen, ref_rejected) in zip(self.pair_batches, self.reference_pairs):
            chosen, rejected = self.pair_logps(model, batch)
            margin = (chosen - ref_chosen) - (rejected - ref_rejected)
            implicit += float((margin > 0).float().sum() + 0.5 * (margin == 0).float().sum())
            logprob += float((chosen > rejected).float().sum() + 0.5 * (chosen == rejected).float().sum())
            total += chosen.shape[0]
        return {"pref_acc": implicit / total, "pref_acc_logprob": logprob / total}

    def evaluate(self, model: torch.nn.Module) -> PolicyEval:
        """All metrics of the module docstring for ``model`` (the start's samples are drawn first)."""
        if self.baseline is None:
            self.baseline = self._evaluate(self.reference, None)
        return self._evaluate(model, self.baseline.samples)

    def evaluate_start(self) -> PolicyEval:
        if self.baseline is None:
            self.baseline = self._evaluate(self.reference, None)
        return self.baseline

    def _evaluate(self, model: torch.nn.Module, baseline: list[dict[str, Any]] | None) -> PolicyEval:
        rows = self.sample(model)
        n = len(rows)
        gold = [r["gold"] for r in rows]
        metrics = {"gold_reward": sum(gold) / n, "gold_reward_sem": _sem(gold),
                   "kl": sum(r["kl"] for r in rows) / n, "length": sum(r["length"] for r in rows) / n,
                   "entropy": sum(r["entropy"] for r in rows) / n}
        if self.proxy is not None:
            metrics["proxy_reward"] = sum(r["proxy"] for r in rows) / n
        if baseline is None:
            metrics["win_rate"] = 0.5
        else:
            wins = [1.0 if r["gold"] > b["gold"] else 0.5 if r["gold"] == b["gold"] else 0.0
                    for r, b in zip(rows, baseline)]
            metrics["win_rate"] = sum(wins) / n
            for r, b in zip(rows, baseline):
                r["start_gold"] = b["gold"]
        metrics.update(self.preference(model))
        metrics["eval_prompts"] = n
        metrics["eval_pairs"] = sum(b.completion_mask.shape[0] // 2 for b in self.pair_batches)
        return PolicyEval(metrics, rows)


def _sem(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


# ------------------------------------------------------------------------------------------------ bench runs


def evaluate_run(bench: Any, run: Any, snapshots: dict[int, str], final_step: int) -> None:
    """A run's policy at every snapshot and at its end on the eval prompts (and, for a main run, at its end on the
    val prompts; a sweep run on the val prompts only): ``eval.jsonl`` (one row per step and prompt) and
    ``eval.json`` (the run's key and the means per step)."""
    evaluator = bench._evaluator()
    points, rows = [], []
    models = [(step, path) for step, path in sorted(snapshots.items())] + [(final_step, str(run.model))]
    sets = ["val"] if run.phase == "lr_sweep" else ["eval"]
    for step, path in models:
        model = evaluator.load_policy(path)
        for prompt_set in sets + (["val"] if step == final_step and run.phase == "main"
                                  and "val" in evaluator.sets else []):
            samples = evaluator.sample(model, prompt_set)
            points.append({"step": step, "set": prompt_set, **summarise(samples)})
            rows += [{"step": step, "set": prompt_set, "i": i, **row} for i, row in enumerate(samples)]
        del model
    write_jsonl(run.directory / "eval.jsonl", rows)
    (run.directory / "eval.json").write_text(json.dumps({"key": run.key, "points": points}, indent=2))


def evaluate_start(bench: Any) -> None:
    """The start on every prompt set (eval/start.json, start.jsonl) and the best-of-n draws per seed
    (eval/best_of_n.jsonl), cached under a key of the eval settings, the start, the proxy and the seeds."""
    from prefopt.bench.start import stage_key

    path = bench.run_dir / "eval" / "start.json"
    key = stage_key("start-eval", {"eval": bench._eval_settings(), "start": str(bench.start.policy),
                                   "proxy": bench.reward_specs(), "bon": bench.cfg.frontier.best_of_n,
                                   "seeds": bench.cfg.seeds}, bench.known_paths())
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        bench.evals["start"] = json.loads(path.read_text())
        return
    started, cpu = time.perf_counter(), time.process_time()
    evaluator = bench._evaluator()
    result = evaluator.evaluate_start()
    rows = [{"step": 0, "set": "eval", "i": i, **row} for i, row in enumerate(result.samples)]
    points = [{"step": 0, "set": "eval", **summarise(result.samples)}]
    if "val" in evaluator.sets:
        val = evaluator.sample(evaluator.reference, "val")
        rows += [{"step": 0, "set": "val", "i": i, **row} for i, row in enumerate(val)]
        points.append({"step": 0, "set": "val", **summarise(val)})
    write_jsonl(path.with_name("start.jsonl"), rows)
    write_jsonl(path.with_name("start_samples.jsonl"), result.samples)
    n_max = max(bench.cfg.frontier.best_of_n, default=0)
    bon = [{"seed": seed, **row} for seed in bench.cfg.seeds for row in evaluator.best_of_n_samples(n_max, seed)] \
        if n_max else []
    write_jsonl(path.with_name("best_of_n.jsonl"), bon)
    record = {"key": key, "metrics": result.metrics, "points": points}
    path.write_text(json.dumps(record, indent=2))
    bench.times["eval/start"] = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}
    bench.evals["start"] = record


def summarise(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Means over one set's samples (gold_reward, proxy_reward, kl, length, entropy)."""
    n = max(len(samples), 1)
    out = {"gold_reward": sum(r["gold"] for r in samples) / n, "kl": sum(r["kl"] for r in samples) / n,
           "length": sum(r["length"] for r in samples) / n, "entropy": sum(r["entropy"] for r in samples) / n}
    if samples and "proxy" in samples[0]:
        out["proxy_reward"] = sum(r["proxy"] for r in samples) / n
    return out
