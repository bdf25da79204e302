"""A synthetic bench run directory in the layout of /work/team/bench_schema.md v1 (tests of prefopt.bench.report,
until bench-wing's tests/bench_rundir.py is in main).

Gold of eval prompt i = start_i + gain(KL) + noise, gain = a sqrt(KL) - 0.02 KL (a: dpo 0.12, ppo 0.10, the oracle
ppo_true 0.14); KL at step t = value x 4 log2(1 + t) / 7 (knob values 1, 2, 4; the chosen one 2); best-of-n from 16
start samples per prompt whose proxy = gold + noise; held-out pairs whose margin grows with the step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

STEPS = [1, 2, 4, 8, 16, 32, 64, 128]
LABELS = {"ppo": ("ppo", "kl_coef", "proxy", 0.10), "dpo": ("dpo", "beta", "proxy", 0.12),
          "ppo_true": ("ppo", "kl_coef", "true", 0.14)}
VALUES = [1.0, 2.0, 4.0]


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_run_dir(root: Path, draws: int = 3, seeds: int = 2, prompts: int = 12, task: str = "world",
                  proxy_accuracy: float = 0.75, chosen_lr: float = 3e-5, fail: str | None = None,
                  oracle: bool = True, seed: int = 0) -> Path:
    """Write the run directory under ``root``; ``fail``: a run id written as failed (no eval)."""
    rng = np.random.default_rng(seed)
    labels = {k: v for k, v in LABELS.items() if oracle or v[2] == "proxy"}
    _write(root / "bench.json", {"profile": f"{task}_test", "task": task, "config": {
        "seeds": list(range(seeds)), "select": {"kl_budget": 4.0},
        "frontier": {"kl_levels": [1.0, 3.0], "best_of_n": [1, 2, 4, 8, 16]}}})
    selection = {name: {"knob": knob, "learning_rates": [1e-5, 3e-5, 1e-4], "chosen_learning_rate": chosen_lr,
                        "knob_values": VALUES, "chosen_value": 2.0} for name, (_, knob, reward, _) in labels.items()
                 if reward == "proxy"}
    _write(root / "manifest.json", {"versions": {"python": "3.11", "prefopt": "test"}, "selection": selection})
    start = 0.3 + 0.1 * rng.standard_normal((draws, prompts))
    if task == "hh":
        _write(root / "gold.json", {"n_pairs": 600, "accuracy": 0.66, "ci95": [0.622, 0.697]})
    for d in range(draws):
        folder = root / "draws" / f"draw{d}"
        _write(folder / "proxy.json", {"n_pairs": 200, "val_accuracy": proxy_accuracy, "rule_val_accuracy": 0.68,
                                       "accuracy": 0.58})
        _jsonl(folder / "start.jsonl", [{"step": 0, "set": "eval", "i": i, "gold": start[d, i], "proxy": start[d, i],
                                         "kl": 0.0, "length": 10.0, "entropy": 2.0, "cond_acc": 0.5}
                                        for i in range(prompts)])
        samples = start[d][:, None] + 0.1 * rng.standard_normal((prompts, 16))
        _jsonl(folder / "best_of_n.jsonl", [{"i": i, "j": j, "gold": samples[i, j], "length": 10.0 + j % 3,
                                             "proxy": samples[i, j] + 0.05 * rng.standard_normal(), "cond_acc": 0.5}
                                            for i in range(prompts) for j in range(16)])
        _jsonl(folder / "pairs.jsonl", [{"k": k, "ref_chosen": -10.0, "ref_rejected": -11.0, "gold_chosen": 0.5,
                                         "gold_rejected": 0.2 if k % 4 else 0.9} for k in range(8)])
    plan = []
    for name, (algorithm, knob, reward, slope) in labels.items():
        for value in VALUES:
            for d in range(draws):
                for s in range(seeds):
                    run_id = f"{name}/{knob}={value:g}/draw{d}/seed{s}"
                    row = {"id": run_id, "label": name, "algorithm": algorithm, "knob": knob, "value": value,
                           "draw": d, "seed": s, "learning_rate": chosen_lr, "dir": f"runs/{run_id}", "reward": reward,
                           "phase": "oracle" if reward == "true" else "main", "policy_class": "full"}
                    plan.append(row)
                    cost = {"wall_s": 10.0, "cpu_s": 9.0, "peak_rss_mb": 500.0, "updates": 128, "tokens": 128 * 640,
                            "samples": 0 if algorithm == "dpo" else 128 * 8, "flops": 1e12,
                            "labels_consumed": 120 if algorithm == "dpo" else 0, "epochs_over_pairs": 1.0}
                    failed = run_id == fail
                    _write(root / row["dir"] / "run.json", {**row, "status": "failed" if failed else "done", "cost": cost,
                                                            "error": "RuntimeError: loss is nan" if failed else None})
                    if failed:
                        continue
                    rows = []
                    for step in STEPS:
                        kl = value * 4 * math.log2(1 + step) / 7
                        gain = slope * math.sqrt(kl) - 0.02 * kl + 0.01 * rng.standard_normal()
                        for i in range(prompts):
                            gold = start[d, i] + gain + 0.05 * rng.standard_normal()
                            rows.append({"step": step, "set": "eval", "i": i, "gold": gold, "proxy": gold + 0.1,
                                         "kl": kl * (1 + 0.1 * rng.standard_normal()), "length": 10 - kl / 2,
                                         "entropy": 2.0, "cond_acc": 0.5 + gain, "logp": -5.0, "response": "a b"})
                    _jsonl(root / row["dir"] / "eval.jsonl", rows)
                    _jsonl(root / row["dir"] / "metrics.jsonl", [{"step": t, "train/loss": 1 / t} for t in STEPS])
                    _jsonl(root / row["dir"] / "pref.jsonl", [{"step": t, "k": k, "chosen": -10 + t / 64,
                                                               "rejected": -11.0} for t in STEPS for k in range(8)])
    _write(root / "plan.json", {"labels": {name: {"algorithm": a, "knob": knob, "reward": reward,
                                                  "oracle_of": "ppo" if reward == "true" else None}
                                           for name, (a, knob, reward, _) in labels.items()}, "runs": plan})
    return root
