"""A complete bench run directory with KNOWN numbers, written without any model (for the report's tests).

``make_run_dir(path)`` writes every file of the run-directory layout (prefopt/bench/files.py's docstring lists
them) for a small world bench whose numbers are planted, so a test can check what the report computes against the
truth it was built from:

* prompt sets: ``n_val`` val and ``n_eval`` eval prompts, prompt i of group ``i % 4``;
* the start's gold on eval prompt i:  s_i = 0.25 + 0.1 sin(i)  (every draw; start.jsonl);
* a run of (label, value) in draw d with seed s at step t of T:
      gold = s_i + effect * t / T + u_d + v_ds + e_dsti,    kl = kl_max * t / T  (the same for every prompt)
  with u_d ~ N(0, sd_draw), v_ds ~ N(0, sd_seed), e ~ N(0, sd_noise) drawn from ``seed`` (numpy), and
  (effect, kl_max) = ``labels[label]["values"][value]``; so the TRUE difference between two settings at their
  last step is the difference of their effects;
* proxy = gold + 0.5 kl / kl_max_of_label (a proxy that keeps rising), length = 10 - 4 t / T, entropy = 2 - t / T,
  cond_acc = min(1, 0.5 + gold), logp = -kl - 10;
* best-of-n draws from the start: gold_ij = s_i + 0.05 z_ij, proxy_ij = gold_ij + 0.05 z'_ij;
* held-out pairs: ref log-probs -10 (chosen) and -11 (rejected); a main / oracle run's policy log-probs at its last
  step T move the implicit reward margin to ``margin`` (``labels[label]["margin"]``, default 0.5);
* the selection grid: for each label, learning rates (1e-3, 3e-3, 1e-2) at the middle knob value, then each knob
  value at the chosen rate; val gold = s + effect of the value - 0.05 |log10(lr / 3e-3)|, so 3e-3 and the value of
  highest effect are chosen (manifest ``selection``).

Everything else (costs, times, versions) is plausible filler with the documented keys.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from prefopt.bench.files import write_json, write_jsonl

LABELS: dict[str, dict[str, Any]] = {
    "ppo": {"algorithm": "ppo", "kind": "prompts", "knob": "kl_coef", "reward": "proxy",
            "values": {0.01: (0.30, 8.0), 0.05: (0.20, 4.0), 0.2: (0.10, 1.0)}},
    "ppo_true": {"algorithm": "ppo", "kind": "prompts", "knob": "kl_coef", "reward": "true", "oracle_of": "ppo",
                 "values": {0.01: (0.40, 8.0), 0.05: (0.25, 4.0), 0.2: (0.12, 1.0)}},
    "dpo": {"algorithm": "dpo", "kind": "pairs", "knob": "beta", "reward": "labels", "margin": 2.0,
            "values": {0.05: (0.15, 6.0), 0.1: (0.12, 3.0), 0.5: (0.05, 0.5)}},
}
LEARNING_RATES = (1e-3, 3e-3, 1e-2)


def checkpoints(steps: int, count: int) -> list[int]:
    from prefopt.bench.plan import checkpoint_steps

    return checkpoint_steps(steps, count)


def make_run_dir(path: Path, labels: dict[str, dict[str, Any]] | None = None, draws: int = 3,
                 seeds: tuple[int, ...] = (0, 1, 2, 3), steps: int = 24, n_checkpoints: int = 8, n_val: int = 16,
                 n_eval: int = 32, n_pairs: int = 16, bon_n: int = 16, sd_draw: float = 0.02, sd_seed: float = 0.02,
                 sd_noise: float = 0.1, seed: int = 0, select_seed: int = 999) -> Path:
    """Write the run directory (module docstring) under ``path``; returns ``path``."""
    from prefopt.bench.config import BenchConfig
    from prefopt.config import from_dict

    labels = labels or LABELS
    path = Path(path)
    rng = np.random.default_rng(seed)
    algorithms = {label: {"algorithm": {"name": spec["algorithm"]}} for label, spec in labels.items()
                  if not spec.get("oracle_of")}
    cfg = from_dict(BenchConfig, {
        "name": "fixture", "task": "world", "draws": draws, "seeds": list(seeds), "output_dir": str(path),
        "algorithms": algorithms, "oracles": sorted({s["oracle_of"] for s in labels.values() if s.get("oracle_of")}),
        "select": {"learning_rates": list(LEARNING_RATES), "seeds": [select_seed]},
        "frontier": {"knob_values": {label: sorted(spec["values"]) for label, spec in labels.items()
                                     if label in algorithms}, "checkpoints": n_checkpoints,
                     "best_of_n": [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= bon_n],
                     "kl_levels": [1.0, 2.0]},
        "eval": {"num_prompts": n_eval, "num_pairs": n_pairs}})
    write_json(path / "bench.json", {"profile": cfg.name, "task": cfg.task, "config": dataclasses.asdict(cfg)})
    sets = {"val": n_val, "eval": n_eval}
    write_jsonl(path / "prompts.jsonl", [
        {"set": name, "i": i, "prompt": f"\n\nHuman: q{name}{i} Words: w{i % 4}.\n\nAssistant:", "group": i % 4}
        for name, n in sets.items() for i in range(n)])
    start_gold = {name: 0.25 + 0.1 * np.sin(np.arange(n)) for name, n in sets.items()}
    steps_at = checkpoints(steps, n_checkpoints)

    def sample_row(step: int, name: str, i: int, gold: float, kl: float, frac: float, kl_max: float) -> dict:
        return {"step": step, "set": name, "i": i, "gold": float(gold), "proxy": float(gold + 0.5 * kl / kl_max),
                "kl": float(kl), "length": int(round(10 - 4 * frac)), "entropy": 2.0 - frac,
                "cond_acc": float(min(1.0, 0.5 + gold)), "rule": 0.5, "logp": float(-kl - 10.0),
                "response": f" w{i % 4}" * 3}

    plan: list[dict[str, Any]] = []
    draw_shift = rng.normal(0, sd_draw, draws)
    for d in range(draws):
        directory = path / "draws" / f"draw{d}"
        write_json(directory / "draw.json", {"draw": d, "seed": 1 + d, "key": f"draw{d}", "start_key": "fixture",
                                             "labels_key": f"l{d}", "proxy_key": f"p{d}"})
        write_json(directory / "labels.json", {"label_temperature": 0.05, "responses_per_prompt": 4, "parts": {
            part: {"prompts": 100, "responses": 400, "pairs_used": 480, "ties_dropped": 120,
                   "label_agreement_over_pairs_used": 0.8, "kto_rows": {"desirable": 100, "undesirable": 100},
                   "start_true_reward": 0.25} for part in ("policy_train", "val", "eval")}})
        write_json(directory / "proxy.json", {"n_pairs": 200, "val_accuracy": 0.7, "val_accuracy_ci95": [0.64, 0.76],
                                              "val_accuracy_true": 0.8,
                                              "rule_val_accuracy": 0.62, "ceiling_val_accuracy": 0.8, "steps": 60,
                                              "seed": 1 + d, "oracle_slope": 5.0, "oracle_weight": 5.0})
        write_jsonl(directory / "start.jsonl", [sample_row(0, name, i, start_gold[name][i], 0.0, 0.0, 1.0)
                                                for name in sets for i in range(sets[name])])
        bon = []
        for i in range(n_eval):
            for j in range(bon_n):
                gold = start_gold["eval"][i] + 0.05 * rng.standard_normal()
                bon.append({"i": i, "j": j, "gold": float(gold), "proxy": float(gold + 0.05 * rng.standard_normal()),
                            "length": 10, "cond_acc": float(min(1.0, 0.5 + gold))})
        write_jsonl(directory / "best_of_n.jsonl", bon)
        write_jsonl(directory / "pairs.jsonl", [{"k": k, "prompt": f"p{k}", "chosen": " a", "rejected": " b",
                                                 "ref_chosen": -10.0, "ref_rejected": -11.0, "gold_chosen": 0.5,
                                                 "gold_rejected": 0.2} for k in range(n_pairs)])
        for s in seeds:
            seed_shift = rng.normal(0, sd_seed)
            for label, spec in labels.items():
                kl_top = max(kl for _, kl in spec["values"].values())
                for value, (effect, kl_max) in spec["values"].items():
                    row = _row(spec, label, "oracle" if spec.get("oracle_of") else "main", d, s + 1000 * d, value,
                               3e-3, steps, steps_at, "eval")
                    rows = []
                    for t in steps_at:
                        frac = t / steps
                        noise = rng.normal(0, sd_noise, n_eval)
                        gold = start_gold["eval"] + effect * frac + draw_shift[d] + seed_shift + noise
                        rows += [sample_row(t, "eval", i, gold[i], kl_max * frac, frac, kl_top) for i in range(n_eval)]
                    _write_run(path, row, rows, n_pairs, spec.get("margin", 0.5), steps_at, steps)
                    plan.append(row)
    selection = {}
    for label, spec in labels.items():
        if spec.get("oracle_of"):
            continue
        values = sorted(spec["values"])
        middle = values[len(values) // 2]
        table = []
        for lr, value in [(lr, middle) for lr in LEARNING_RATES] + [(3e-3, v) for v in values if v != middle]:
            effect, kl_max = spec["values"][value]
            row = _row(spec, label, "select", 0, select_seed, value, lr, steps, [steps], "val")
            val_gold = start_gold["val"] + effect - 0.05 * abs(math.log10(lr / 3e-3))
            rows = [sample_row(steps, "val", i, val_gold[i], kl_max, 1.0, kl_max) for i in range(n_val)]
            _write_run(path, row, rows, n_pairs, spec.get("margin", 0.5), [steps], steps)
            plan.append(row)
            table.append({"learning_rate": lr, "value": value, "seeds": [select_seed],
                          "val_gold": float(val_gold.mean()), "val_kl": kl_max})
        best = max(values, key=lambda v: spec["values"][v][0])
        selection[label] = {"knob": spec["knob"], "learning_rates": list(LEARNING_RATES), "knob_values": values,
                            "chosen_learning_rate": 3e-3, "chosen_value": best, "criterion": "max mean val gold",
                            "kl_budget": None, "on_edge": ["knob"] if best in (values[0], values[-1]) else [],
                            "extended": {"learning_rate": [], "knob": []}, "table": table}
        probe = _row(spec, label, "probe", 0, seeds[0], values[0], 3e-3, 4, [], None)
        _write_run(path, probe, [], 0, 0.0, [], 4, flops=1e9)
        plan.append(probe)
    write_json(path / "plan.json", {"labels": {label: {"algorithm": s["algorithm"], "kind": s["kind"],
                                                       "knob": s["knob"], "policy_class": "full",
                                                       "reward": s["reward"], "oracle_of": s.get("oracle_of")}
                                               for label, s in labels.items()}, "runs": plan})
    write_json(path / "manifest.json", {
        "written_at": "2026-01-01T00:00:00", "command": ["fixture"], "versions": {"python": "3.11", "torch": "x"},
        "git": {"commit": None, "dirty": None},
        "host": {"platform": "fixture", "cpu_count": 2, "threads": 1, "workers": 2, "device": "cpu",
                 "load_average_start": [0.0, 0.0, 0.0], "load_average_end": [0.0, 0.0, 0.0]},
        "splits": {"salt": "fixture", "fractions": {"policy_train": 0.7, "val": 0.1, "eval": 0.2},
                   "parts": {"eval": {"count": n_eval, "ids_sha256": "0"}}},
        "seeds": {"main": list(seeds), "train": [s + 1000 * d for d in range(draws) for s in seeds],
                  "select": [select_seed]}, "skipped_labels": {},
        "draws": [{"draw": d, "seed": 1 + d} for d in range(draws)], "selection": selection,
        "stages": [{"stage": "init", "draw": None, "key": "0", "dir": "cache/init-0", "cached": False, "wall_s": 1.0,
                    "cpu_s": 1.0, "summary": {}}],
        "times": {"main": {"wall_s": 1.0, "cpu_s": 1.0}}})
    return path


def _row(spec: dict[str, Any], label: str, phase: str, draw: int, seed: int, value: float, lr: float, steps: int,
         steps_at: list[int], eval_set: str | None) -> dict[str, Any]:
    knob = f"{spec['knob']}={value:g}"
    run_id = {"select": f"select/{label}/lr={lr:g}/{knob}/seed{seed}", "probe": f"probe/{label}"}.get(
        phase, f"{label}/{knob}/draw{draw}/seed{seed % 1000}")
    return {"id": run_id, "label": label, "algorithm": spec["algorithm"], "kind": spec["kind"], "phase": phase,
            "draw": draw, "seed": seed, "knob": spec["knob"], "value": value, "learning_rate": lr,
            "dir": f"runs/{run_id}", "reward": spec["reward"], "policy_class": "full", "max_steps": steps,
            "checkpoints": list(steps_at), "eval_set": eval_set, "oracle_of": spec.get("oracle_of"), "key": run_id}


def _write_run(path: Path, row: dict[str, Any], rows: list[dict[str, Any]], n_pairs: int, margin: float,
               steps_at: list[int], steps: int, flops: float | None = None) -> None:
    directory = path / row["dir"]
    online = row["kind"] == "prompts"
    tokens = steps * 16 * 20
    cost = {"wall_s": 2.0, "cpu_s": 2.0, "eval_wall_s": 1.0, "eval_cpu_s": 1.0, "peak_rss_mb": 500.0, "updates": steps,
            "rows": steps * 16,
            "samples": steps * 16 if online else 0, "tokens": tokens,
            "flops": flops if flops is not None else tokens * 1e9 / (4 * 16 * 20),
            "flops_method": "counted" if flops is not None else "probe-per-token",
            "labels_consumed": 0 if row["reward"] == "true" else 480, "epochs_over_pairs": 0.0 if online else 1.0}
    write_json(directory / "run.json", {**row, "status": "done", "error": None, "final_step": steps,
                                        "finished_at": "2026-01-01T00:00:00", "cost": cost})
    write_jsonl(directory / "eval.jsonl", rows)
    last = [steps] if row["phase"] in ("main", "oracle") else []  # pref rows: the last step of main and oracle runs
    write_jsonl(directory / "pref.jsonl", [{"step": t, "k": k, "chosen": -10.0 + margin * t / steps / 2,
                                            "rejected": -11.0 - margin * t / steps / 2,
                                            "implicit_margin": margin * t / steps,
                                            "implicit_acc": 1.0 if margin > 0 else 0.5, "logprob_acc": 1.0}
                                           for t in last for k in range(n_pairs)])
    write_jsonl(directory / "metrics.jsonl", [{"step": t, "train/loss": 1.0 / t} for t in range(1, steps + 1)])


ROW = {"id", "label", "algorithm", "kind", "phase", "draw", "seed", "knob", "value", "learning_rate", "dir", "reward",
       "policy_class", "max_steps", "checkpoints", "eval_set", "oracle_of", "key"}
COST = {"wall_s", "cpu_s", "eval_wall_s", "eval_cpu_s", "peak_rss_mb", "updates", "rows", "samples", "tokens", "flops",
        "flops_method", "labels_consumed", "epochs_over_pairs"}
SAMPLE = {"step", "set", "i", "gold", "proxy", "cond_acc", "rule", "kl", "logp", "length", "entropy", "response"}
SELECTION = {"knob", "learning_rates", "knob_values", "chosen_learning_rate", "chosen_value", "criterion", "kl_budget",
             "on_edge", "extended", "table"}


def check_run_dir(path: Path) -> None:
    """Assert that ``path`` holds the run-directory layout of prefopt/bench/files.py, file by file and key by key
    (the same check for this fixture and for a real bench, so the two cannot drift apart)."""
    from prefopt.bench.files import read_json, read_jsonl

    path = Path(path)
    bench = read_json(path / "bench.json")
    assert set(bench) == {"profile", "task", "config"} and bench["task"] in ("world", "hh")
    manifest = read_json(path / "manifest.json")
    assert {"written_at", "command", "versions", "git", "host", "splits", "seeds", "draws", "selection",
            "skipped_labels", "stages", "times"} <= set(manifest)
    assert {"cpu_count", "threads", "workers", "device", "load_average_start", "load_average_end"} <= set(
        manifest["host"])
    assert set(manifest["seeds"]) == {"main", "train", "select"} and not set(manifest["seeds"]["train"]) & set(
        manifest["seeds"]["select"])
    assert all(set(entry) == SELECTION for entry in manifest["selection"].values())
    plan = read_json(path / "plan.json")
    assert set(plan) == {"labels", "runs"}
    assert all(set(label) == {"algorithm", "kind", "knob", "policy_class", "reward", "oracle_of"}
               for label in plan["labels"].values())
    assert len({row["id"] for row in plan["runs"]}) == len(plan["runs"])
    prompts = read_jsonl(path / "prompts.jsonl")
    assert all(set(row) == {"set", "i", "prompt", "group"} for row in prompts)
    places = {(row["set"], row["i"]) for row in prompts}
    for d, _ in enumerate(manifest["draws"]):
        draw = path / "draws" / f"draw{d}"
        assert {"draw", "seed", "key", "start_key", "labels_key", "proxy_key"} <= set(read_json(draw / "draw.json"))
        start = read_jsonl(draw / "start.jsonl")
        assert all(set(row) == SAMPLE and row["step"] == 0 for row in start)
        assert {(row["set"], row["i"]) for row in start} == places
        assert all(set(row) == {"i", "j", "gold", "proxy", "length", "cond_acc"} for row in read_jsonl(
            draw / "best_of_n.jsonl"))
        assert all(set(row) == {"k", "prompt", "chosen", "rejected", "ref_chosen", "ref_rejected", "gold_chosen",
                                "gold_rejected"} for row in read_jsonl(draw / "pairs.jsonl"))
        proxy = read_json(draw / "proxy.json")
        if bench["task"] == "world":
            assert {"n_pairs", "val_accuracy", "val_accuracy_ci95", "val_accuracy_true", "rule_val_accuracy",
                    "ceiling_val_accuracy", "steps", "seed", "oracle_slope", "oracle_weight"} <= set(proxy)
            parts = read_json(draw / "labels.json")["parts"]
            assert all({"prompts", "responses", "pairs_used", "ties_dropped", "label_agreement_over_pairs_used",
                        "kto_rows", "start_true_reward"} <= set(part) for part in parts.values())
        else:
            assert {"n_pairs", "accuracy", "ci95", "steps", "seed"} <= set(proxy)
    if bench["task"] == "hh":
        assert {"n_pairs", "accuracy", "ci95", "method", "part", "key"} <= set(read_json(path / "gold.json"))
    for row in plan["runs"]:
        assert set(row) == ROW and row["dir"] == f"runs/{row['id']}"
        directory = path / row["dir"]
        info = read_json(directory / "run.json")
        assert {k: info[k] for k in ROW} == row and info["status"] in ("done", "failed")
        if info["status"] != "done":
            continue
        assert set(info["cost"]) == COST and (directory / "metrics.jsonl").is_file()
        rows = read_jsonl(directory / "eval.jsonl")
        assert all(set(r) == SAMPLE and r["set"] == row["eval_set"] for r in rows)
        assert sorted({r["step"] for r in rows}) == row["checkpoints"]
        pref = read_jsonl(directory / "pref.jsonl")
        assert all(set(r) == {"step", "k", "chosen", "rejected", "implicit_margin", "implicit_acc", "logprob_acc"}
                   and r["step"] == row["max_steps"] for r in pref)
        assert bool(pref) == (row["phase"] in ("main", "oracle") and bool(read_jsonl(
            path / "draws" / f"draw{row['draw']}" / "pairs.jsonl")))
