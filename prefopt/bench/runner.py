"""``prefopt bench``: plan the whole benchmark, run what is not finished, tabulate, plot, write the manifest.

The plan is a list of tasks: the start's stages (cached across benches, prefopt.bench.start), one training
run per (algorithm, seed), the start's evaluation, one evaluation per run, the report. One tqdm bar covers the
whole plan (finished tasks are counted in at the start, so the ETA reflects what is left).

A training run is finished when its ``summary.json`` exists and its ``run.json`` holds the key of the same
recipe (a changed recipe retrains). An evaluation is cached in ``eval.json`` under a key of the eval settings,
the eval set, the start, the scorers and the sha256 of the policy's weights. A run that fails is reported
(its log's tail) and the others go on; the bench then exits with an error after writing the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prefopt.bench.config import BenchConfig, load_bench_config
from prefopt.bench.data import BenchData, prepare_data, read_jsonl, write_jsonl
from prefopt.bench.manifest import load_average
from prefopt.bench.recipes import algorithm_recipe
from prefopt.bench.report import write_report
from prefopt.bench.start import Start, StageFailed, plan_start, run_prefopt, sha256_file, stage_key, write_recipe
from prefopt.errors import UnknownNameError


@dataclass
class Run:
    """One (algorithm, seed) training run and its evaluation."""

    label: str
    name: str
    seed: int
    directory: Path
    recipe: dict[str, Any]
    key: str
    status: str = "pending"
    error: str = ""

    @property
    def trained(self) -> bool:
        info = self.directory / "run.json"
        return ((self.directory / "summary.json").is_file() and info.is_file()
                and json.loads(info.read_text()).get("key") == self.key)

    @property
    def model(self) -> Path:
        return self.directory / "model"


@dataclass
class Task:
    name: str
    done: bool
    fn: Callable[[], None]


@dataclass
class Bench:
    """Everything a bench run needs between its tasks."""

    cfg: BenchConfig
    run_dir: Path
    data: BenchData
    start: Start
    runs: list[Run] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    times: dict[str, dict[str, float]] = field(default_factory=dict)
    """Task -> {wall_s, cpu_s} spent by this invocation (absent: cached or finished before)."""
    built: set[str] = field(default_factory=set)
    """Start stages built by this invocation (the others came from the cache)."""
    evaluator: Any = None
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    load_at_start: list[float] | None = field(default_factory=load_average)

    # -------------------------------------------------------------------------------------------- scorers
    def reward_specs(self) -> list[dict[str, Any]]:
        """The online algorithms' reward: the proxy RM (hh) or the known task reward (synthetic)."""
        if self.cfg.reward == "known":
            from prefopt.tasks import TASK_REWARD

            return [json.loads(json.dumps(TASK_REWARD))]
        return [{"name": "reward_model", "weight": 1.0,
                 "params": {"path": str(self.start.proxy_rm), "max_length": self.cfg.data.max_length}}]

    def gold_spec(self) -> dict[str, Any]:
        if self.cfg.task == "synthetic":
            from prefopt.tasks import TASK_REWARD

            return json.loads(json.dumps(TASK_REWARD))
        return {"name": "reward_model", "params": {"path": str(self.start.gold_rm), "max_length": self.cfg.data.max_length}}

    @property
    def reward_name(self) -> str:
        return "true reward (prefopt.tasks)" if self.cfg.task == "synthetic" else "gold RM score"

    def data_paths(self) -> dict[str, str]:
        prompts = str(self.data.files["policy_train"].resolve())
        pairs = str(self.start.pairs["policy_train"]) if self.cfg.task == "synthetic" else prompts
        return {"prompts": prompts, "pairs": pairs}

    def known_paths(self) -> dict[str, str]:
        return {str(stage.model): f"stage:{stage.key}" for stage in self.start.stages} | {
            str(stage.directory / f"{part}.jsonl"): f"stage:{stage.key}:{part}"
            for stage in self.start.stages for part in self.start.pairs}

    # -------------------------------------------------------------------------------------------- planning
    def plan_runs(self) -> None:
        rewards = self.reward_specs()
        gold = str(self.start.gold_rm) if self.start.gold_rm else None
        for label in self.cfg.labels:
            for seed in self.cfg.seeds:
                directory = self.run_dir / "runs" / label / f"seed{seed}"
                try:
                    recipe = algorithm_recipe(self.cfg, label, str(self.start.policy), self.data_paths(), rewards,
                                              str(directory), seed)
                except UnknownNameError as exc:
                    self.skipped[label] = str(exc)
                    break
                if gold is not None and gold in json.dumps(recipe):
                    raise StageFailed(f"algorithms.{label}: its recipe names the gold RM ({gold}); the gold RM is "
                                      "for evaluation only")
                key = stage_key("run", recipe, self.known_paths())
                self.runs.append(Run(label, recipe["algorithm"]["name"], seed, directory, recipe, key))

    def tasks(self) -> list[Task]:
        out = [Task(f"start/{stage.name}", stage.done, lambda s=stage: self._stage(s)) for stage in self.start.stages]
        out += [Task(f"train/{r.label}/seed{r.seed}", r.trained, lambda r=r: self._train(r)) for r in self.runs]
        out.append(Task("eval/start", self._eval_cached(None) is not None, self._eval_start))
        out += [Task(f"eval/{r.label}/seed{r.seed}", r.trained and self._eval_cached(r) is not None,
                     lambda r=r: self._eval(r)) for r in self.runs]
        return out

    # -------------------------------------------------------------------------------------------- tasks
    def _stage(self, stage) -> None:
        if not stage.done:
            self.built.add(stage.name)
            self.times[f"start/{stage.name}"] = stage.build()

    def _train(self, run: Run) -> None:
        if run.trained:
            run.status = "done"
            return
        if run.directory.exists():  # an older recipe's run, or an interrupted one: resume only the same recipe
            info = run.directory / "run.json"
            previous = json.loads(info.read_text()).get("key") if info.is_file() else None
            if previous not in (None, run.key):
                shutil.rmtree(run.directory)
        run.directory.mkdir(parents=True, exist_ok=True)
        (run.directory / "run.json").write_text(json.dumps({"key": run.key, "status": "running"}, indent=2))
        path = write_recipe(run.directory / "recipe.yaml", run.recipe)
        try:
            cost = run_prefopt(["train", str(path)], run.directory / "train.log")
        except StageFailed as exc:
            run.status, run.error = "failed", str(exc)
            tqdm.write(f"prefopt bench: {run.label} seed {run.seed} FAILED: {exc}")
            return
        self.times[f"train/{run.label}/seed{run.seed}"] = cost
        (run.directory / "run.json").write_text(json.dumps(
            {"key": run.key, "status": "done", "label": run.label, "algorithm": run.name, "seed": run.seed,
             **cost, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(run.directory / "checkpoints", ignore_errors=True)
        run.status = "done"

    def _eval_key(self, run: Run | None) -> str:
        policy = sha256_file(run.model / "model.safetensors") if run is not None else "start"
        payload = {"eval": asdict(self.cfg.eval), "lengths": [self.cfg.data.max_length, self.cfg.data.max_prompt_length],
                   "set": self.data.eval_manifest(), "start": str(self.start.policy), "gold": self.gold_spec(),
                   "proxy": self.reward_specs() if self.cfg.task == "hh" else None, "policy": policy}
        payload = json.loads(json.dumps(payload))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _eval_path(self, run: Run | None) -> Path:
        return (self.run_dir / "eval" / "start.json") if run is None else (run.directory / "eval.json")

    def _eval_cached(self, run: Run | None) -> dict[str, Any] | None:
        path = self._eval_path(run)
        if not path.is_file() or (run is not None and not (run.model / "model.safetensors").is_file()):
            return None
        cached = json.loads(path.read_text())
        return cached if cached.get("key") == self._eval_key(run) else None

    def _evaluator(self):
        if self.evaluator is None:
            from prefopt.bench.evaluate import Evaluator

            proxy = self.reward_specs()[0] if self.cfg.task == "hh" else None
            self.evaluator = Evaluator(self.cfg, str(self.start.policy), self.gold_spec(), proxy,
                                       self.data.eval_prompts, self.data.eval_pairs)
        return self.evaluator

    def _eval_start(self) -> None:
        cached = self._eval_cached(None)
        if cached is None:
            started = time.perf_counter()
            result = self._evaluator().evaluate_start()
            cached = self._save_eval(None, result, time.perf_counter() - started)
        self.evals["start"] = cached

    def _eval(self, run: Run) -> None:
        if run.status != "done" and not run.trained:
            return
        run.status = "done"
        cached = self._eval_cached(run)
        if cached is None:
            started = time.perf_counter()
            evaluator = self._evaluator()
            model = evaluator.load_policy(str(run.model))
            result = evaluator.evaluate(model)  # samples the start first when needed (win rate)
            del model
            cached = self._save_eval(run, result, time.perf_counter() - started)
        self.evals[f"{run.label}/{run.seed}"] = cached

    def _save_eval(self, run: Run | None, result, seconds: float) -> dict[str, Any]:
        path = self._eval_path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path.with_name("samples.jsonl" if run is not None else "start_samples.jsonl"), result.samples)
        record = {"key": self._eval_key(run), "metrics": result.metrics, "eval_s": seconds}
        path.write_text(json.dumps(record, indent=2))
        self.times[f"eval/{'start' if run is None else f'{run.label}/seed{run.seed}'}"] = {"wall_s": seconds}
        return record


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
    bench.plan_runs()
    for label, message in bench.skipped.items():
        tqdm.write(f"prefopt bench: skipping {label!r}: {message}")
    _load_synthetic_eval_pairs(bench)  # when the pairs stage is cached (else after the start is built)
    tasks = bench.tasks()
    done = sum(t.done for t in tasks)
    synthetic_pairs_loaded = False
    with tqdm(total=len(tasks) + 1, initial=done, desc=f"bench {cfg.name}", unit="task", dynamic_ncols=True) as bar:
        for task in tasks:
            if task.name.startswith("train/") and cfg.task == "synthetic" and not synthetic_pairs_loaded:
                _load_synthetic_eval_pairs(bench)
                synthetic_pairs_loaded = True
            bar.set_postfix_str(task.name)
            task.fn()
            if not task.done:
                bar.update(1)
        if cfg.task == "synthetic" and not synthetic_pairs_loaded:
            _load_synthetic_eval_pairs(bench)
        bar.set_postfix_str("report")
        summary = write_report(bench, time.perf_counter() - started)
        bar.update(1)
    print(summary)
    failed = [r for r in bench.runs if r.status == "failed"]
    if failed:
        names = ", ".join(f"{r.label}/seed{r.seed}" for r in failed)
        raise StageFailed(f"{len(failed)} run(s) failed: {names}; the report in {run_dir} lists the others "
                          f"(logs: runs/<algorithm>/seed<k>/train.log)")
    return str(run_dir)


def _load_synthetic_eval_pairs(bench: Bench) -> None:
    """Synthetic eval pairs exist once the pairs stage is built (after the start stages ran)."""
    path = bench.start.pairs.get("eval")
    if path is not None and path.is_file():
        bench.data.eval_pairs = read_jsonl(path)[:bench.cfg.eval.num_pairs]
