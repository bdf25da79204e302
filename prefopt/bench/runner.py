"""``prefopt bench``: plan the whole benchmark, run what is not finished, tabulate, plot, write the manifest.

Phases: the start's stages (cached across benches, prefopt.bench.start); the learning-rate sweep (one run per
algorithm and candidate, judged on the val prompts); the main runs, one per (algorithm, KL-knob value, seed),
each trained with snapshots along training (prefopt.bench.execute) and evaluated at every snapshot on the eval
prompts (and at its end on the val prompts); one short FLOP-counted probe run per algorithm; the start and the
best-of-n baseline; the report (prefopt.bench.report). One tqdm bar covers the plan.

A run is finished when its ``eval.json`` holds the key of its recipe and of the evaluation settings; an
unfinished run is trained again from scratch (its snapshots are deleted once evaluated). A run that fails is
reported (its log's tail) and the others go on; the bench then exits with an error after writing the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prefopt.bench.config import BenchConfig, load_bench_config
from prefopt.bench.data import BenchData, prepare_data, read_jsonl
from prefopt.bench.manifest import load_average
from prefopt.bench.recipes import algorithm_recipe
from prefopt.bench.report import write_report
from prefopt.bench.start import Start, StageFailed, plan_start, stage_key
from prefopt.recipe_file import merge
from prefopt.errors import PrefoptError, UnknownNameError


@dataclass
class Run:
    """One (algorithm, KL-knob value, seed) training run and its evaluation; ``phase`` main or lr_sweep."""

    label: str
    name: str
    seed: int
    directory: Path
    recipe: dict[str, Any]
    key: str
    knob: str | None = None
    value: float | None = None
    learning_rate: float | None = None
    phase: str = "main"
    status: str = "pending"
    error: str = ""

    @property
    def model(self) -> Path:
        return self.directory / "model"

    @property
    def info(self) -> dict[str, Any]:
        path = self.directory / "run.json"
        return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Bench:
    """Everything a bench run needs between its phases."""

    cfg: BenchConfig
    run_dir: Path
    data: BenchData
    start: Start
    runs: list[Run] = field(default_factory=list)
    sweep_runs: list[Run] = field(default_factory=list)
    learning_rates: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Label -> {candidates: {lr: val gold}, chosen: lr} (the lr sweep, recorded in the manifest)."""
    skipped: dict[str, str] = field(default_factory=dict)
    times: dict[str, dict[str, float]] = field(default_factory=dict)
    """Task -> {wall_s, cpu_s} spent by this invocation (absent: cached or finished before)."""
    built: set[str] = field(default_factory=set)
    evaluator: Any = None
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    probes: list[Run] = field(default_factory=list)
    load_at_start: list[float] | None = field(default_factory=load_average)

    # -------------------------------------------------------------------------------------------- scorers
    def reward_specs(self) -> list[dict[str, Any]]:
        """The online algorithms' reward: the proxy RM (hh, world) or the known task reward (synthetic)."""
        if self.cfg.reward == "known":
            from prefopt.tasks import TASK_REWARD

            return [json.loads(json.dumps(TASK_REWARD))]
        return [{"name": "reward_model", "weight": 1.0,
                 "params": {"path": str(self.start.proxy_rm), "max_length": self.cfg.data.max_length}}]

    def gold_spec(self) -> dict[str, Any]:
        if self.cfg.task == "synthetic":
            from prefopt.tasks import TASK_REWARD

            return json.loads(json.dumps(TASK_REWARD))
        if self.cfg.task == "world":
            from prefopt.bench.world import gold_spec

            return gold_spec(self.cfg.world.penalty)
        return {"name": "reward_model", "params": {"path": str(self.start.gold_rm), "max_length": self.cfg.data.max_length}}

    @property
    def reward_name(self) -> str:
        return {"synthetic": "true reward (prefopt.tasks)", "world": "true reward (known-gold world)",
                "hh": "gold RM score"}[self.cfg.task]

    def data_paths(self) -> dict[str, str]:
        prompts = str(self.data.files["policy_train"].resolve())
        pairs = str(self.start.pairs["policy_train"]) if self.cfg.task != "hh" else prompts
        paths = {"prompts": prompts, "pairs": pairs}
        if "policy_train" in self.start.ranks:  # world: the K-wise rankings for algorithms of kind ranks
            paths["ranks"] = str(self.start.ranks["policy_train"])
        return paths

    def known_paths(self) -> dict[str, str]:
        known = {str(stage.model): f"stage:{stage.key}" for stage in self.start.stages}
        for stage in self.start.stages:
            for part in self.start.pairs:
                for suffix in (f"{part}.jsonl", f"{part}.pairs.jsonl", f"{part}.ranks.jsonl"):
                    known[str(stage.directory / suffix)] = f"stage:{stage.key}:{suffix}"
        return known

    # -------------------------------------------------------------------------------------------- planning
    def knob_values(self, label: str) -> tuple[str | None, list[float | None]]:
        from prefopt.bench.execute import knob_field
        from prefopt.registry import ALGORITHMS

        algorithm_cls = ALGORITHMS.get(self._name(label))
        knob = knob_field(algorithm_cls)
        if knob is None:
            return None, [None]
        values = self.cfg.frontier.knob_values.get(label)
        if not values:  # the recipe's value (or the Config default): one point
            partial = merge(self.cfg.defaults, self.cfg.algorithms[label]).get("algorithm") or {}
            default = next(f.default for f in dataclasses.fields(algorithm_cls.Config) if f.name == knob)
            values = [partial.get(knob, default) if isinstance(partial, dict) else default]
        return knob, [float(v) for v in values]

    def _name(self, label: str) -> str:
        algo = self.cfg.algorithms[label].get("algorithm") or {}
        return str(algo.get("name", label)) if isinstance(algo, dict) else str(algo)

    def _make_run(self, label: str, seed: int, directory: Path, knob: str | None, value: float | None,
                  learning_rate: float | None, phase: str) -> Run:
        recipe = algorithm_recipe(self.cfg, label, str(self.start.policy), self.data_paths(), self.reward_specs(),
                                  str(directory), seed, (knob, value) if value is not None else None, learning_rate)
        gold = str(self.start.gold_rm) if self.start.gold_rm else None
        if gold is not None and gold in json.dumps(recipe):
            raise StageFailed(f"algorithms.{label}: its recipe names the gold RM ({gold}); the gold RM is "
                              "for evaluation only")
        if knob is not None and value is None:
            value = recipe["algorithm"].get(knob)
        key = stage_key("run", {"recipe": recipe, "eval": self._eval_settings(), "phase": phase}, self.known_paths())
        return Run(label, recipe["algorithm"]["name"], seed, directory, recipe, key, knob, value,
                   recipe["train"].get("learning_rate"), phase)

    def plan_sweep(self) -> None:
        rates = self.cfg.lr_sweep.learning_rates
        for label in self.cfg.labels:
            try:
                knob, values = self.knob_values(label)
            except UnknownNameError as exc:
                self.skipped[label] = str(exc)
                continue
            middle = sorted(values, key=lambda v: -1 if v is None else v)[len(values) // 2]
            for lr in rates:
                directory = self.run_dir / "runs" / label / "lr_sweep" / f"lr={lr:g}"
                self.sweep_runs.append(self._make_run(label, self.cfg.lr_sweep.seed, directory, knob, middle, lr,
                                                      "lr_sweep"))

    def plan_runs(self) -> None:
        for label in self.cfg.labels:
            if label in self.skipped:
                continue
            try:
                knob, values = self.knob_values(label)
            except UnknownNameError as exc:
                self.skipped[label] = str(exc)
                continue
            lr = self.learning_rates.get(label, {}).get("chosen")
            for value in values:
                for seed in self.cfg.seeds:
                    part = f"{knob}={value:g}" if value is not None else "default"
                    directory = self.run_dir / "runs" / label / part / f"seed{seed}"
                    self.runs.append(self._make_run(label, seed, directory, knob, value, lr, "main"))

    def snapshot_steps(self, run: Run) -> list[int]:
        steps = int(run.recipe["train"]["max_steps"])
        n = self.cfg.frontier.checkpoints
        return sorted({round(steps * i / n) for i in range(1, n)} - {0, steps})

    # -------------------------------------------------------------------------------------------- tasks
    def _stage(self, stage) -> None:
        if not stage.done:
            self.built.add(stage.name)
            self.times[f"start/{stage.name}"] = stage.build()

    def done(self, run: Run) -> bool:
        path = run.directory / "eval.json"
        return path.is_file() and json.loads(path.read_text()).get("key") == run.key

    def execute(self, run: Run, count_flops: bool = False) -> None:
        """Train ``run`` (from scratch unless finished) and evaluate it at every snapshot and at its end."""
        from prefopt.bench.execute import train_run

        if self.done(run):
            run.status = "done"
            return
        shutil.rmtree(run.directory, ignore_errors=True)
        run.directory.mkdir(parents=True)
        (run.directory / "run.json").write_text(json.dumps({"key": run.key, "status": "running"}, indent=2))
        try:
            cost = train_run(run.recipe, run.directory, self.snapshot_steps(run) if run.phase == "main" else [],
                             self.cfg.isolation == "inprocess", count_flops)
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
        self.times[f"train/{run.directory.relative_to(self.run_dir)}"] = {"wall_s": cost["wall_s"],
                                                                         "cpu_s": cost["cpu_s"]}
        started, cpu = time.perf_counter(), time.process_time()
        if run.phase == "flops":
            (run.directory / "eval.json").write_text(json.dumps({"key": run.key, "points": []}))
        else:
            self._evaluate(run, snapshots, summary.get("step"))
        self.times[f"eval/{run.directory.relative_to(self.run_dir)}"] = {"wall_s": time.perf_counter() - started,
                                                                        "cpu_s": time.process_time() - cpu}
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(run.directory / "checkpoints", ignore_errors=True)
            shutil.rmtree(run.directory / "snapshots", ignore_errors=True)
        run.status = "done"

    def _evaluate(self, run: Run, snapshots: dict[int, str], final_step: int) -> None:
        from prefopt.bench.evaluate import evaluate_run

        evaluate_run(self, run, snapshots, final_step)

    def _eval_settings(self) -> dict[str, Any]:
        payload = {"eval": asdict(self.cfg.eval), "lengths": [self.cfg.data.max_length, self.cfg.data.max_prompt_length],
                   "set": self.data.eval_manifest(), "val": len(self.data.val_prompts), "gold": self.gold_spec(),
                   "checkpoints": self.cfg.frontier.checkpoints}
        return json.loads(json.dumps(payload))

    def _evaluator(self):
        if self.evaluator is None:
            from prefopt.bench.evaluate import Evaluator

            proxy = self.reward_specs()[0] if self.cfg.task != "synthetic" else None
            self.evaluator = Evaluator(self.cfg, str(self.start.policy), self.gold_spec(), proxy,
                                       self.data.eval_prompts, self.data.eval_pairs, val_prompts=self.data.val_prompts)
        return self.evaluator

    def eval_start(self) -> None:
        """The start on every prompt set and the best-of-n draws (prefopt.bench.evaluate.evaluate_start)."""
        from prefopt.bench.evaluate import evaluate_start

        evaluate_start(self)

    def choose_learning_rates(self) -> None:
        """Per label: the candidate of highest val gold reward at the sweep run's last step."""
        by_label: dict[str, dict[str, Any]] = {}
        for run in self.sweep_runs:
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
            record["knob"] = next((r.knob for r in self.sweep_runs if r.label == label), None)
            record["knob_value"] = next((r.value for r in self.sweep_runs if r.label == label), None)
        self.learning_rates = by_label


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
            step(f"start/{stage.name}", lambda s=stage: bench._stage(s))
        _load_synthetic_eval_pairs(bench)
        step("eval/start", bench.eval_start)
        bench.plan_sweep()
        for run in bench.sweep_runs:
            step(f"lr_sweep/{run.label}/lr={run.learning_rate:g}", lambda r=run: bench.execute(r))
        bench.choose_learning_rates()
        bench.plan_runs()
        for run in bench.runs:
            step(f"{run.label}/{run.knob}={run.value}/seed{run.seed}", lambda r=run: bench.execute(r))
        for probe in _flops_probes(bench):
            step(f"flops/{probe.label}", lambda r=probe: bench.execute(r, count_flops=True))
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


def _flops_probes(bench: Bench) -> list[Run]:
    """Per label, the first main run's recipe cut to ``min(4, max_steps)`` steps, its FLOPs counted exactly."""
    probes, seen = [], set()
    for run in bench.runs:
        if run.label in seen or bench.cfg.frontier.flops_runs == 0 or bench.cfg.isolation != "inprocess":
            continue
        seen.add(run.label)
        recipe = json.loads(json.dumps(run.recipe))
        recipe["train"]["max_steps"] = min(4, int(recipe["train"]["max_steps"]))
        directory = bench.run_dir / "runs" / run.label / "flops_probe"
        recipe["train"]["output_dir"] = str(directory)
        key = stage_key("flops", recipe, bench.known_paths())
        probes.append(Run(run.label, run.name, run.seed, directory, recipe, key, run.knob, run.value,
                          run.learning_rate, "flops"))
    bench.probes = probes
    return probes


def _load_synthetic_eval_pairs(bench: Bench) -> None:
    """Synthetic / world eval pairs exist once the pairs stage is built (after the start stages ran)."""
    path = bench.start.pairs.get("val" if bench.cfg.task == "world" else "eval")
    if path is not None and path.is_file():
        bench.data.eval_pairs = read_jsonl(path)[:bench.cfg.eval.num_pairs]
