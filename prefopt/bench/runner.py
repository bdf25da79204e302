"""``prefopt bench``: plan the whole benchmark, run what is not finished, tabulate, plot, write the manifest.

Phases: the start's stages (cached across benches, prefopt.bench.start); the learning-rate sweep (one run per
algorithm and candidate, judged on the val prompts); the main runs, one per (algorithm, KL-knob value, seed),
each trained with snapshots along training (prefopt.bench.execute) and evaluated at every snapshot on the eval
prompts (and at its end on the val prompts); one short FLOP-counted probe run per algorithm; the start and the
best-of-n baseline; the report (prefopt.bench.report). One tqdm bar covers the plan (prefopt.bench.plan).

A run is finished when its ``eval.json`` holds the key of its recipe and of the evaluation settings; an
unfinished run is trained again from scratch (its snapshots are deleted once evaluated). A run that fails is
reported (its log's tail) and the others go on; the bench then exits with an error after writing the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prefopt.bench.config import BenchConfig, load_bench_config
from prefopt.bench.data import prepare_data, read_jsonl
from prefopt.bench.plan import Bench, Run
from prefopt.bench.report.v1 import write_report
from prefopt.bench.start import Stage, StageFailed, plan_start
from prefopt.errors import PrefoptError, UnknownNameError


def run_bench(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Run (or finish) the benchmark of a bench recipe; returns the path of its run directory."""
    try:  # stop on SIGTERM like on Ctrl-C: the running run saves a checkpoint, the next bench resumes it
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        return _run_bench(recipe, overrides)
    try:
        return _run_bench(recipe, overrides)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run_bench(recipe: str | Path, overrides: list[str] | tuple[str, ...]) -> str:
    started = time.perf_counter()
    cfg = load_bench_config(recipe, list(overrides))
    with _threads(cfg.threads):
        return _run(cfg, started)


@contextlib.contextmanager
def _threads(threads: int):
    """Run the bench's subprocesses (OMP_NUM_THREADS, MKL_NUM_THREADS) and its evaluation with ``threads``."""
    if not threads:
        yield
        return
    import torch

    saved_env = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    saved_threads = torch.get_num_threads()
    os.environ.update({name: str(threads) for name in saved_env})
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run(cfg: BenchConfig, started: float) -> str:
    from transformers.utils import logging as hf_logging

    from prefopt.bench.evaluate import evaluate_start

    hf_logging.disable_progress_bar()  # one bar: the plan's
    run_dir = Path(cfg.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, run_dir)
    bench = Bench(cfg, run_dir, data, plan_start(cfg, data))
    for label in cfg.labels:
        try:
            bench.knob_values(label)
        except UnknownNameError as exc:
            bench.skipped[label] = str(exc)
            tqdm.write(f"prefopt bench: skipping {label!r}: {exc}")
    labels = [label for label in cfg.labels if label not in bench.skipped]
    values = {label: len(bench.knob_values(label)[1]) for label in labels}
    total = (len(bench.start.stages) + len(labels) * len(cfg.lr_sweep.learning_rates)
             + sum(values.values()) * len(cfg.seeds) + len(labels) + 2)
    with tqdm(total=total, desc=f"bench {cfg.name}", unit="task", dynamic_ncols=True) as bar:
        def step(name: str, fn) -> None:
            bar.set_postfix_str(name)
            fn()
            bar.update(1)

        for stage in bench.start.stages:
            step(f"start/{stage.name}", lambda s=stage: build_stage(bench, s))
        _load_synthetic_eval_pairs(bench)
        step("eval/start", lambda: evaluate_start(bench))
        bench.plan_sweep()
        for run in bench.sweep_runs:
            step(f"lr_sweep/{run.label}/lr={run.learning_rate:g}", lambda r=run: execute(bench, r))
        choose_learning_rates(bench)
        bench.plan_runs()
        for run in bench.runs:
            step(f"{run.label}/{run.knob}={run.value}/seed{run.seed}", lambda r=run: execute(bench, r))
        bench.plan_probes()
        for probe in bench.probes:
            step(f"flops/{probe.label}", lambda r=probe: execute(bench, r, count_flops=True))
        bar.set_postfix_str("report")
        summary = write_report(bench, time.perf_counter() - started)
        bar.update(1)
    print(summary)
    failed = [r for r in bench.runs + bench.sweep_runs if r.status == "failed"]
    if failed:
        names = ", ".join(str(r.directory.relative_to(run_dir)) for r in failed)
        raise StageFailed(f"{len(failed)} run(s) failed: {names}; the report in {run_dir} lists the others "
                          f"(logs: <run>/train.log)")
    return str(run_dir)


def build_stage(bench: Bench, stage: Stage) -> None:
    """Build a start stage unless it is cached, timing it."""
    if not stage.done:
        bench.built.add(stage.name)
        bench.times[f"start/{stage.name}"] = stage.build()


def finished(run: Run) -> bool:
    """Its ``eval.json`` holds its key: trained and evaluated with this recipe and these evaluation settings."""
    path = run.directory / "eval.json"
    return path.is_file() and json.loads(path.read_text()).get("key") == run.key


def execute(bench: Bench, run: Run, count_flops: bool = False) -> None:
    """Train ``run`` (from scratch unless finished) and evaluate it at every snapshot and at its end."""
    from prefopt.bench.evaluate import evaluate_run
    from prefopt.bench.execute import train_run

    if finished(run):
        run.status = "done"
        return
    shutil.rmtree(run.directory, ignore_errors=True)
    run.directory.mkdir(parents=True)
    (run.directory / "run.json").write_text(json.dumps({"key": run.key, "status": "running"}, indent=2))
    try:
        cost = train_run(run.recipe, run.directory, bench.snapshot_steps(run) if run.phase == "main" else [],
                         bench.cfg.isolation == "inprocess", count_flops)
    except PrefoptError as exc:
        run.status, run.error = "failed", str(exc)
        (run.directory / "run.json").write_text(json.dumps({"key": run.key, "status": "failed",
                                                            "error": str(exc)}, indent=2))
        tqdm.write(f"prefopt bench: {run.label} {run.knob}={run.value} seed {run.seed} FAILED: {exc}")
        return
    snapshots = {int(k): v for k, v in cost.pop("snapshots").items()}
    summary = json.loads((run.directory / "summary.json").read_text())
    info = {"key": run.key, "status": "done", "label": run.label, "algorithm": run.name, "seed": run.seed,
            "phase": run.phase, "knob": run.knob, "value": run.value, "learning_rate": run.learning_rate,
            "steps": summary.get("step"), **cost, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (run.directory / "run.json").write_text(json.dumps(info, indent=2))
    bench.times[f"train/{run.directory.relative_to(bench.run_dir)}"] = {"wall_s": cost["wall_s"],
                                                                       "cpu_s": cost["cpu_s"]}
    started, cpu = time.perf_counter(), time.process_time()
    if run.phase == "flops":
        (run.directory / "eval.json").write_text(json.dumps({"key": run.key, "points": []}))
    else:
        evaluate_run(bench, run, snapshots, summary.get("step"))
    bench.times[f"eval/{run.directory.relative_to(bench.run_dir)}"] = {"wall_s": time.perf_counter() - started,
                                                                      "cpu_s": time.process_time() - cpu}
    if not bench.cfg.keep_checkpoints:
        shutil.rmtree(run.directory / "checkpoints", ignore_errors=True)
        shutil.rmtree(run.directory / "snapshots", ignore_errors=True)
    run.status = "done"


def choose_learning_rates(bench: Bench) -> None:
    """Per label: the candidate of highest val gold reward at the sweep run's last step."""
    by_label: dict[str, dict[str, Any]] = {}
    for run in bench.sweep_runs:
        if run.status != "done":
            continue
        points = json.loads((run.directory / "eval.json").read_text())["points"]
        gold = points[-1]["gold_reward"]
        by_label.setdefault(run.label, {"candidates": {}, "kl": {}})
        by_label[run.label]["candidates"][f"{run.learning_rate:g}"] = gold
        by_label[run.label]["kl"][f"{run.learning_rate:g}"] = points[-1]["kl"]
    for label, record in by_label.items():
        best = max(record["candidates"], key=record["candidates"].get)
        record["chosen"] = float(best)
        record["knob"] = next((r.knob for r in bench.sweep_runs if r.label == label), None)
        record["knob_value"] = next((r.value for r in bench.sweep_runs if r.label == label), None)
    bench.learning_rates = by_label


def _load_synthetic_eval_pairs(bench: Bench) -> None:
    """Synthetic / world eval pairs exist once the pairs stage is built (after the start stages ran)."""
    path = bench.start.pairs.get("val" if bench.cfg.task == "world" else "eval")
    if path is not None and path.is_file():
        bench.data.eval_pairs = read_jsonl(path)[:bench.cfg.eval.num_pairs]
