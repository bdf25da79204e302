"""A synthetic bench run directory written from /work/team/bench_schema.md (tests of prefopt.bench.report).

World: gold of prompt i = start_i + gain(KL) + noise, gain = a sqrt(KL) - 0.02 KL (a per label: dpo 0.12, ppo 0.10,
the oracle ppo@true 0.14); KL at step t = value x 4 log2(1 + t) / 7 (so the knob value scales the KL reached at the
last checkpoint, 4 x value x 8 / 7... ); best-of-n from 16 start samples per prompt whose proxy = gold + noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

STEPS = [1, 2, 4, 8, 16, 32, 64, 128]
LABELS = {"ppo": ("ppo", "kl_coef", "proxy", 0.10), "dpo": ("dpo", "beta", "proxy", 0.12),
          "ppo@true": ("ppo", "kl_coef", "true", 0.14)}
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
    _write(root / "bench.json", {"profile": f"{task}_test", "task": task, "seeds": list(range(seeds)),
                                 "frontier": {"kl_levels": [1.0, 3.0], "kl_budget": 4.0, "best_of_n": [1, 2, 4, 8, 16]}})
    selection = {name: {"learning_rate": {"grid": [1e-5, 3e-5, 1e-4], "chosen": chosen_lr},
                        "knob": {"name": knob, "grid": VALUES, "chosen": 2.0}} for name, (_, knob, _, _) in labels.items()}
    _write(root / "manifest.json", {"versions": {"python": "3.11", "prefopt": "test"}, "selection": selection})
    start = 0.3 + 0.1 * rng.standard_normal((draws, prompts))
    for d in range(draws):
        folder = root / "draws" / f"draw{d}"
        _write(folder / "labels.json", {"prompts": 40, "pairs_used": 120, "ties_dropped": 10})
        _write(folder / "proxy.json", {"val_pairs": 200, "val_accuracy": proxy_accuracy,
                                       "prompt_blind_rule_val_accuracy": 0.68, "true_reward_val_accuracy": 0.8})
        if task == "hh":
            _write(folder / "gold.json", {"held_out_pairs": 600, "held_out_accuracy": 0.66,
                                          "proxy_held_out_accuracy": 0.58})
        _jsonl(folder / "start.jsonl", [{"set": "eval", "i": i, "gold": start[d, i], "proxy": start[d, i],
                                         "kl": 0.0, "length": 10.0, "entropy": 2.0, "cond_acc": 0.5}
                                        for i in range(prompts)])
        samples = start[d][:, None] + 0.1 * rng.standard_normal((prompts, 16))
        _jsonl(folder / "best_of_n.jsonl", [{"i": i, "j": j, "gold": samples[i, j], "length": 10.0 + j % 3,
                                             "proxy": samples[i, j] + 0.05 * rng.standard_normal(), "cond_acc": 0.5}
                                            for i in range(prompts) for j in range(16)])
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
                                                            **({"error": "RuntimeError: loss is nan"} if failed else {})})
                    if failed:
                        continue
                    rows = []
                    for step in STEPS:
                        kl = value * 4 * math.log2(1 + step) / 7
                        gain = slope * math.sqrt(kl) - 0.02 * kl + 0.01 * rng.standard_normal()
                        for set_name, count in (("eval", prompts), ("val", 4)):
                            for i in range(count):
                                gold = (start[d, i] if set_name == "eval" else 0.3) + gain + 0.05 * rng.standard_normal()
                                rows.append({"step": step, "set": set_name, "i": i, "gold": gold, "proxy": gold + 0.1,
                                             "kl": kl * (1 + 0.1 * rng.standard_normal()), "length": 10 - kl / 2,
                                             "entropy": 2.0, "cond_acc": 0.5 + gain, "logp": -5.0, "response": "a b"})
                    _jsonl(root / row["dir"] / "eval.jsonl", rows)
                    _jsonl(root / row["dir"] / "metrics.jsonl", [{"step": t, "train/loss": 1 / t} for t in STEPS])
                    if algorithm == "dpo":
                        _write(root / row["dir"] / "pref.json", [{"step": t, "accuracy": 0.5 + t / 512, "pairs": 100}
                                                                 for t in STEPS])
    _write(root / "plan.json", plan)
    return root
