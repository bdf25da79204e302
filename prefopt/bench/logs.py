"""Read a bench run directory's per-run logs into frames: everything in the report is computed from these.

* ``runs``: one row per run (``runs/**/run.json``): label, algorithm, phase, knob, value, seed, learning_rate,
  steps, updates, tokens, rows, samples_generated, wall_s, cpu_s, trainable_params, flops_counted;
* ``prompts``: one row per (main run, step, eval prompt) from the run's ``eval.jsonl`` (set ``eval``), plus
  the best-of-n rows derived from ``eval/best_of_n.jsonl`` (prefopt.bench.frontier.best_of_n_rows);
* ``val``: the same for the val set (last step of each main run);
* ``sweep``: val points of the learning-rate sweep runs;
* ``start``: the start's rows (``eval/start.jsonl``), per set.

FLOPs: ``flops`` of a run = its tokens x the FLOPs per token of its label's probe run (``flops_counted`` /
``tokens`` of ``runs/<label>/flops_probe``); NaN when no probe ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from prefopt.bench.frontier import best_of_n_rows


@dataclass
class Logs:
    runs: pd.DataFrame
    prompts: pd.DataFrame
    val: pd.DataFrame
    sweep: pd.DataFrame
    start: pd.DataFrame


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():  # split on "\n" only: a sampled text may hold U+2028 or U+0085 (str.splitlines breaks there)
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def read_logs(run_dir: Path, best_of_n: list[int]) -> Logs:
    run_dir = Path(run_dir)
    infos, prompts, val, sweep = [], [], [], []
    for info_path in sorted((run_dir / "runs").rglob("run.json")):
        info = json.loads(info_path.read_text())
        info["dir"] = str(info_path.parent.relative_to(run_dir))
        infos.append(info)
        if info.get("status") != "done" or info.get("phase") == "flops":
            continue
        ident = {"label": info["label"], "value": info.get("value"), "seed": info["seed"]}
        for row in _jsonl(info_path.parent / "eval.jsonl"):
            row = {**ident, **row}
            if info["phase"] == "lr_sweep":
                sweep.append({**row, "learning_rate": info["learning_rate"]})
            elif row["set"] == "eval":
                prompts.append(row)
            else:
                val.append(row)
    runs = pd.DataFrame(infos)
    if not runs.empty:
        runs = _flops(runs)
    prompts_frame = pd.DataFrame(prompts)
    draws = pd.DataFrame(_jsonl(run_dir / "eval" / "best_of_n.jsonl"))
    if not draws.empty and best_of_n:
        prompts_frame = pd.concat([prompts_frame, best_of_n_rows(draws, best_of_n)], ignore_index=True)
    return Logs(runs, prompts_frame, pd.DataFrame(val), pd.DataFrame(sweep),
                pd.DataFrame(_jsonl(run_dir / "eval" / "start.jsonl")))


def _flops(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    runs["flops"] = float("nan")
    if "flops_counted" not in runs:
        return runs
    probes = runs[(runs["phase"] == "flops") & runs["flops_counted"].notna()]
    per_token = {row.label: row.flops_counted / row.tokens for row in probes.itertuples() if row.tokens}
    runs["flops_per_token"] = runs["label"].map(per_token)
    runs["flops"] = runs["flops_per_token"] * runs["tokens"]
    return runs
