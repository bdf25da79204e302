"""The plan of a bench: which runs exist and what each is, and the state the bench keeps between its phases.

``Run`` is one training run: (algorithm label, KL-knob value, seed) in phase ``main``, one learning-rate candidate in
phase ``lr_sweep``, or the short FLOP-counted probe of a label in phase ``flops``; its recipe
(prefopt.bench.recipes), its directory and its key (prefopt.bench.start.stage_key of the recipe and the evaluation
settings: a finished run with the same key is not run again). ``Bench`` holds the config, the data, the start, the
planned runs and what the phases found (chosen learning rates, skipped labels, times, evaluations); it plans the
sweep, the main runs and the probes, and says which rewards the online algorithms and the evaluation use. Running
the plan is prefopt.bench.runner's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefopt.bench.config import BenchConfig
from prefopt.bench.data import BenchData
from prefopt.bench.manifest import load_average
from prefopt.bench.recipes import algorithm_recipe
from prefopt.bench.start import Start, StageFailed, stage_key
from prefopt.recipe_file import merge
from prefopt.errors import UnknownNameError

@dataclass
class Run:
    """One (algorithm, KL-knob value, seed) training run and its evaluation; ``phase`` main, lr_sweep or flops."""

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

            return gold_spec(self.cfg.world.max_new_tokens, self.cfg.world.penalty)
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
            paths["unpaired"] = paths["ranks"].replace(".ranks.jsonl", ".kto.jsonl")  # KTO: one label per response
        return paths

    def known_paths(self) -> dict[str, str]:
        known = {str(stage.model): f"stage:{stage.key}" for stage in self.start.stages}
        for stage in self.start.stages:
            for part in self.start.pairs:
                for suffix in (f"{part}.jsonl", f"{part}.pairs.jsonl", f"{part}.ranks.jsonl", f"{part}.kto.jsonl"):
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

    def plan_probes(self) -> None:
        """Per label, the first main run's recipe cut to ``min(4, max_steps)`` steps, its FLOPs counted exactly."""
        probes, seen = [], set()
        for run in self.runs:
            if run.label in seen or self.cfg.frontier.flops_runs == 0 or self.cfg.isolation != "inprocess":
                continue
            seen.add(run.label)
            recipe = json.loads(json.dumps(run.recipe))
            recipe["train"]["max_steps"] = min(4, int(recipe["train"]["max_steps"]))
            directory = self.run_dir / "runs" / run.label / "flops_probe"
            recipe["train"]["output_dir"] = str(directory)
            key = stage_key("flops", recipe, self.known_paths())
            probes.append(Run(run.label, run.name, run.seed, directory, recipe, key, run.knob, run.value,
                              run.learning_rate, "flops"))
        self.probes = probes

    # -------------------------------------------------------------------------------------------- evaluation
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
