"""Which runs a bench makes: every run's plan row, ``prefopt train`` recipe, checkpoints and key.

A run is one (label, phase, draw, seed, knob value, learning rate):

* ``select``: a selection run on draw ``select.draw`` with a selection seed, evaluated on the val prompts at its
  last step (prefopt.bench.runner chooses the learning rate, then the knob value, from them);
* ``main``: a label at one knob value of its frontier grid and its chosen learning rate, in every draw with every
  seed (training seed s + 1000 d), evaluated on the eval prompts at its checkpoints;
* ``oracle``: the same as a main run of an online label, its reward the TRUE reward (label ``<label>_true``);
* ``probe``: a label's first main recipe cut to 4 steps, its FLOPs counted.

Online runs optimise their draw's proxy RM (the gold never reaches training); offline runs (pairs, unpaired,
ranks) train on their draw's labelled rows for ``budget.epochs`` epochs (their ``max_steps`` is derived from the
row count). The checkpoints are log-spaced (dense early), ``frontier.checkpoints`` of them or more, the last step
included. A run's key is the content key of its recipe and of the evaluation it gets: a finished run with the
same key is not run again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.bench.config import BenchConfig
from prefopt.bench.files import content_key
from prefopt.bench.recipes import (OFFLINE, algorithm_class, gold_judge, knob_values, partial_recipe, proxy_reward,
                                   train_recipe)
from prefopt.bench.stages import Draw, Start
from prefopt.errors import ConfigError, UnknownNameError

PROBE_STEPS = 4


@dataclass
class Label:
    """What the plan needs to know about one label (an oracle is a label of its own)."""

    label: str
    source: str
    """The bench label whose partial recipe it runs (itself, or the label an oracle copies)."""
    algorithm: str
    kind: str
    knob: str | None
    values: list[float | None]
    reward: str
    """proxy (online), true (oracle) or labels (offline)."""
    policy_class: str
    oracle_of: str | None = None

    def row(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "kind": self.kind, "knob": self.knob, "policy_class": self.policy_class,
                "reward": self.reward, "oracle_of": self.oracle_of}


@dataclass
class Run:
    """One training run: its plan row (the schema's fields), its recipe and its key."""

    id: str
    label: str
    algorithm: str
    kind: str
    phase: str
    draw: int
    seed: int
    knob: str | None
    value: float | None
    learning_rate: float
    reward: str
    policy_class: str
    max_steps: int
    checkpoints: list[int]
    eval_set: str | None
    oracle_of: str | None
    recipe: dict[str, Any] = field(repr=False)
    key: str = ""
    train_rows: int | None = None
    """Rows of the training file (offline: labelled rows; the denominator of epochs_over_pairs)."""
    labels: int = 0
    """Labelled rows behind the run: offline its training rows, online its proxy RM's, an oracle none."""

    @property
    def dir(self) -> str:
        return f"runs/{self.id}"

    def row(self) -> dict[str, Any]:
        """The plan row (plan.json and run.json)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("recipe", "train_rows", "labels")}
        return {**out, "dir": self.dir}


def plan_labels(cfg: BenchConfig, start_model: Path) -> tuple[list[Label], dict[str, str]]:
    """Every label this bench trains (oracles after their label) and the skipped ones with the reason."""
    out, skipped = [], {}
    layers = _layers(start_model)
    for label in cfg.labels:
        try:
            algorithm_cls = algorithm_class(cfg, label)
            knob, values = knob_values(cfg, label)
        except UnknownNameError as exc:
            skipped[label] = str(exc)
            continue
        partial = partial_recipe(cfg, label).get("algorithm") or {}
        config = algorithm_cls.Config
        trained = partial.get("trainable_layers", _default(config, "trainable_layers"))
        policy_class = ("full" if trained is None else
                        f"top {trained} of {layers} blocks + head (embeddings frozen)")
        online = algorithm_cls.kind not in OFFLINE
        common = dict(source=label, algorithm=algorithm_cls.registry_name, kind=algorithm_cls.kind, knob=knob,
                      values=values, policy_class=policy_class)
        out.append(Label(label, reward="proxy" if online else "labels", **common))
        if label in cfg.oracles:
            out.append(Label(f"{label}_true", reward="true", oracle_of=label, **common))
    return out, skipped


def _default(config: type, name: str) -> Any:
    return next((f.default for f in dataclasses.fields(config) if f.name == name), None)


def _layers(model: Path) -> int | None:
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config.get("num_hidden_layers", config.get("n_layer"))


def checkpoint_steps(max_steps: int, count: int) -> list[int]:
    """At least ``count`` distinct steps in 1..max_steps, log-spaced (dense early), ending at max_steps."""
    if max_steps <= count:
        return list(range(1, max_steps + 1))
    points = count
    while True:
        steps = sorted({max(1, round(max_steps ** (k / (points - 1)))) for k in range(points)})
        if len(steps) >= count:
            return steps
        points += 1


def _rows(path: Path) -> int:
    with Path(path).open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


class Planner:
    """Builds runs for one bench: the config, the built start and the eval settings every key includes.

    ``oracle_weights``: draw -> the weight of the true reward in its oracle runs (proxy.json's ``oracle_weight``:
    the true reward in the proxy's units, so that one KL coefficient is one trade-off for both)."""

    def __init__(self, cfg: BenchConfig, start: Start, run_dir: Path, oracle_weights: dict[int, float] | None = None):
        self.cfg, self.start, self.run_dir = cfg, start, Path(run_dir)
        self.oracle_weights = dict(oracle_weights or {})
        self.eval_settings = json.loads(json.dumps({
            "eval": dataclasses.asdict(cfg.eval), "lengths": [cfg.data.max_length, cfg.data.max_prompt_length],
            "prompts": str(self.run_dir / "prompts.jsonl"), "task": cfg.task,
            "gold": gold_judge(cfg, start.gold_rm)}))

    def rewards(self, label: Label, draw: Draw) -> list[dict[str, Any]] | None:
        if label.reward == "true":
            if draw.draw not in self.oracle_weights:
                raise ConfigError(f"oracles: no oracle weight for draw {draw.draw} (draws/draw{draw.draw}/proxy.json "
                                  "oracle_weight; the draws phase writes it)")
            return [{**gold_judge(self.cfg), "weight": self.oracle_weights[draw.draw]}]
        if label.reward == "proxy":
            return [proxy_reward(self.cfg, draw.proxy_rm)]
        return None

    def run(self, label: Label, phase: str, draw: int, seed: int, value: float | None,
            learning_rate: float | None) -> Run:
        """One run's row, recipe and key (module docstring)."""
        the_draw = self.start.draws[draw]
        knob_part = f"{label.knob}={value:g}" if value is not None else "default"
        if phase == "select":
            run_id = f"select/{label.label}/lr={learning_rate:g}/{knob_part}/seed{seed}"
        else:
            run_id = (f"probe/{label.label}" if phase == "probe"
                      else f"{label.label}/{knob_part}/draw{draw}/seed{seed % 1000}")
        data_path = the_draw.train_files[label.kind] if label.kind in the_draw.train_files \
            else the_draw.train_files["pairs"]
        train: dict[str, Any] = {} if learning_rate is None else {"learning_rate": learning_rate}
        partial = partial_recipe(self.cfg, label.source)
        recipe = train_recipe(self.cfg, partial, f"algorithms.{label.source}", algorithm=label.source,
                              model=str(self.start.policy), data_path=str(data_path),
                              output_dir=str(self.run_dir / "runs" / run_id), seed=seed, run=True,
                              rewards=self.rewards(label, the_draw),
                              settings={label.knob: value} if value is not None else None, train=train)
        rows = None
        if label.kind in OFFLINE:
            rows = _rows(data_path)
            t = recipe["train"]
            per_step = t.get("batch_size", 8) * t.get("gradient_accumulation_steps", 1)
            recipe["train"]["max_steps"] = max(1, math.ceil(self.cfg.budget.epochs * rows / per_step))
        if phase == "probe":
            recipe["train"]["max_steps"] = min(PROBE_STEPS, int(recipe["train"].get("max_steps", PROBE_STEPS)))
        max_steps = int(recipe["train"].get("max_steps", 0))
        gold = str(self.start.gold_rm) if self.start.gold_rm else None
        if gold is not None and gold in json.dumps(recipe):
            raise ConfigError(f"algorithms.{label.source}: its recipe names the gold RM ({gold}); the gold RM "
                                   "is for evaluation only")
        checkpoints = {"select": [max_steps], "probe": []}.get(
            phase, checkpoint_steps(max_steps, self.cfg.frontier.checkpoints))
        eval_set = {"select": "val", "probe": None}.get(phase, "eval")
        if value is None and label.knob is not None:
            value = recipe["algorithm"].get(label.knob)
        made = Run(run_id, label.label, label.algorithm, label.kind, phase, draw, seed, label.knob, value,
                   float(recipe["train"].get("learning_rate", 0.0)), label.reward, label.policy_class, max_steps,
                   checkpoints, eval_set, label.oracle_of, recipe, train_rows=rows,
                   labels={"labels": rows or 0, "proxy": _rows(the_draw.proxy_data), "true": 0}[label.reward])
        made.key = content_key("run", {"row": made.row(), "recipe": recipe, "eval": self.eval_settings},
                               self.start.known)
        return made

    def select_runs(self, label: Label, grid: list[tuple[float, float | None]]) -> list[Run]:
        """Selection runs of ``label``: each (learning rate, knob value) of ``grid`` with every selection seed."""
        return [self.run(label, "select", self.cfg.select.draw, seed, value, lr) for lr, value in grid
                for seed in self.cfg.select.seeds]

    def main_runs(self, label: Label, learning_rate: float | None, values: list[float | None]) -> list[Run]:
        """Every knob value x draw x seed of ``label`` (phase main, or oracle for an oracle label)."""
        phase = "oracle" if label.oracle_of else "main"
        return [self.run(label, phase, d, seed + 1000 * d, value, learning_rate) for value in values
                for d in range(self.cfg.draws) for seed in self.cfg.seeds]

    def probe(self, first: Run, label: Label) -> Run:
        """``first``'s recipe cut to PROBE_STEPS steps, its FLOPs counted."""
        return self.run(label, "probe", first.draw, first.seed, first.value, first.learning_rate)
