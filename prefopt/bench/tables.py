"""Every table of the report, computed from a bench directory's logs alone (``bench_tables(run_dir, cfg)``).

Tables: ``verdicts`` (prefopt.bench.frontier.verdict_table), ``frontier`` (seed means of every point, 95%
bootstrap over seeds), ``fits`` (Gao et al.'s a, b per label), ``final`` (the step-matched view: each label at
its val-selected knob value, last step, with its budget: updates, samples, tokens, FLOPs, wall and CPU time),
``compute`` (the compute-matched view: gold at the same training FLOPs F*, the smallest of the labels' median
run FLOPs, interpolated along each seed's checkpoints from the start at 0 FLOPs), ``per_seed`` (every main
run's last step), ``diagnostics`` (per run) and ``diagnostics_summary``, ``lr_sweep``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefopt.bench.diagnostics import diagnostics_summary, run_diagnostics
from prefopt.bench.frontier import (BON, best_values, bootstrap_mean_ci, final_matrix, frontier_table, gao_fit,
                                    seed_points, verdict_table)
from prefopt.bench.logs import Logs, read_logs

COST = ["updates", "samples_generated", "rows", "tokens", "flops", "wall_s", "cpu_s"]


def bench_tables(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """All tables (module docstring) plus ``logs``, ``best`` (label -> chosen knob value) and ``start_gold``."""
    frontier_cfg = cfg.frontier
    resamples = frontier_cfg.bootstrap
    logs = read_logs(run_dir, frontier_cfg.best_of_n)
    start = logs.start[logs.start["set"] == "eval"] if not logs.start.empty else logs.start
    start_gold = float(start["gold"].mean())
    out: dict[str, Any] = {"logs": logs, "start_gold": start_gold, "start": start}
    if logs.prompts.empty:
        return out | {"verdicts": pd.DataFrame(), "frontier": pd.DataFrame(), "fits": pd.DataFrame(),
                      "final": pd.DataFrame(), "compute": pd.DataFrame(), "per_seed": pd.DataFrame(),
                      "diagnostics": pd.DataFrame(), "diagnostics_summary": pd.DataFrame(), "best": {},
                      "lr_sweep": pd.DataFrame()}
    points = seed_points(logs.prompts)
    present = set(points["label"])
    labels = [label for label in cfg.labels if label in present] + ([BON] if BON in present else [])
    val_points = seed_points(logs.val[logs.val["step"] == logs.val.groupby(["label", "value", "seed"], dropna=False)[
        "step"].transform("max")]) if not logs.val.empty else pd.DataFrame(columns=["label", "value", "gold"])
    best = best_values(points, val_points) if not val_points.empty else _single_values(points)
    out["best"] = best
    out["frontier"] = frontier_table(points, resamples)
    best_label = "best (val-selected knob, last step)" if not val_points.empty else "last step (one knob value)"
    out["verdicts"] = verdict_table(logs.prompts, start, labels, list(frontier_cfg.kl_levels), best, resamples,
                                    best_label)
    out["fits"] = pd.DataFrame([{"label": label, "form": "d(a - b d)" if label == BON else "d(a - b log d)",
                                 **gao_fit(points[points["label"] == label], start_gold, "bon" if label == BON else "rl")}
                                for label in labels])
    out["per_seed"] = _per_seed(points, logs.runs)
    out["final"] = _final(logs, best, resamples)
    out["compute"] = _compute(logs, best, start_gold, resamples)
    out["diagnostics"] = run_diagnostics(logs.prompts, start, cfg.diagnostics)
    out["diagnostics_summary"] = diagnostics_summary(out["diagnostics"])
    out["lr_sweep"] = _lr_sweep(logs.sweep)
    return out


def _single_values(points: pd.DataFrame) -> dict[str, Any]:
    """Without a val set: labels run at one knob value only get a best point (no selection is made)."""
    out = {}
    for label, group in points[points["label"] != BON].groupby("label"):
        values = group["value"].drop_duplicates().tolist()
        if len(values) == 1:
            out[label] = values[0]
    return out


def _main_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["phase"] == "main") & (runs["status"] == "done")] if not runs.empty else runs


def _per_seed(points: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    last = points[points["label"] != BON]
    last = last[last["step"] == last.groupby(["label", "value", "seed"], dropna=False)["step"].transform("max")]
    cost = _main_runs(runs)[["label", "value", "seed", "learning_rate", *[c for c in COST if c in runs]]]
    merged = last.merge(cost, on=["label", "value", "seed"], how="left")
    return merged.sort_values(["label", "value", "seed"], kind="stable").reset_index(drop=True)


def _final(logs: Logs, best: dict[str, Any], resamples: int) -> pd.DataFrame:
    runs = _main_runs(logs.runs)
    out = []
    for label, value in best.items():
        gold = final_matrix(logs.prompts, label, value).mean(1)
        chosen = runs[(runs["label"] == label) & ((runs["value"] == value) | (pd.isna(value) & runs["value"].isna()))]
        rows = logs.prompts[(logs.prompts["label"] == label) & ((logs.prompts["value"] == value)
                                                                 | (pd.isna(value) & logs.prompts["value"].isna()))]
        last = rows[rows["step"] == rows["step"].max()]
        lo, hi = bootstrap_mean_ci(gold, resamples)
        row = {"label": label, "knob": chosen["knob"].iloc[0] if "knob" in chosen and len(chosen) else None,
               "value": value, "lr": chosen["learning_rate"].iloc[0] if len(chosen) else None,
               "n_seeds": len(gold), "gold": float(gold.mean()), "gold_lo": lo, "gold_hi": hi,
               "kl": float(last["kl"].mean())}
        for column in COST:
            if column in chosen:
                row[column] = float(chosen[column].mean())
        out.append(row)
    return pd.DataFrame(out)


def _compute(logs: Logs, best: dict[str, Any], start_gold: float, resamples: int) -> pd.DataFrame:
    runs = _main_runs(logs.runs)
    if "flops" not in runs or runs["flops"].isna().all():
        return pd.DataFrame()
    curves = {}
    for label, value in best.items():
        chosen = runs[(runs["label"] == label) & ((runs["value"] == value) | (pd.isna(value) & runs["value"].isna()))]
        if chosen["flops"].isna().any():
            continue
        per_seed = []
        for run in chosen.itertuples():
            rows = logs.prompts[(logs.prompts["label"] == label) & (logs.prompts["seed"] == run.seed)
                                & ((logs.prompts["value"] == value) | (pd.isna(value) & logs.prompts["value"].isna()))]
            steps = rows.groupby("step")["gold"].mean()
            flops = np.concatenate([[0.0], steps.index.to_numpy(dtype=float) / float(run.steps) * run.flops])
            per_seed.append((flops, np.concatenate([[start_gold], steps.to_numpy()])))
        curves[label] = (float(chosen["flops"].median()), per_seed)
    if not curves:
        return pd.DataFrame()
    budget = min(median for median, _ in curves.values())
    out = []
    for label, (median, per_seed) in curves.items():
        gold = np.array([np.interp(budget, flops, values) for flops, values in per_seed])
        lo, hi = bootstrap_mean_ci(gold, resamples)
        out.append({"label": label, "value": best[label], "flops_budget": budget, "run_flops_median": median,
                    "gold_at_budget": float(gold.mean()), "gold_lo": lo, "gold_hi": hi})
    return pd.DataFrame(out)


def compute_curves(logs: Logs) -> pd.DataFrame:
    """Seed-mean gold at each checkpoint against its FLOPs (step / steps x the run's FLOPs), per (label, value)."""
    runs = _main_runs(logs.runs)
    if "flops" not in runs:
        return pd.DataFrame()
    runs = runs[["label", "value", "seed", "flops", "steps"]]
    prompts = logs.prompts[logs.prompts["label"] != BON]
    means = prompts.groupby(["label", "value", "seed", "step"], dropna=False)["gold"].mean().reset_index()
    merged = means.merge(runs, on=["label", "value", "seed"], how="inner")
    merged["flops"] = merged["step"] / merged["steps"] * merged["flops"]
    return merged.groupby(["label", "value", "step"], dropna=False)[["gold", "flops"]].mean().reset_index()


def _lr_sweep(sweep: pd.DataFrame) -> pd.DataFrame:
    if sweep.empty:
        return sweep
    last = sweep[sweep["step"] == sweep.groupby(["label", "learning_rate"])["step"].transform("max")]
    table = last.groupby(["label", "value", "learning_rate"], dropna=False)[["gold", "kl"]].mean().reset_index()
    table["chosen"] = table.groupby("label")["gold"].transform("max") == table["gold"]
    return table
