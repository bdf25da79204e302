"""Build or reuse the shared start and the reward models: every stage cached by the hash of what makes it.

Stages (task hh): ``init`` (tiny model + tokenizer from the policy_train dialogues) -> ``pt`` -> ``sft`` (the
start every algorithm trains from) -> ``proxy_rm`` and ``gold_rm`` (both initialised from the start, trained
on the DISJOINT parts proxy_rm_train and gold_rm_train). Task synthetic: ``init`` -> optional pt / sft ->
``pairs`` (responses sampled from the start, the best and worst under the known reward as chosen / rejected).
Task world: ``init`` -> sft -> ``labels`` (prefopt.bench.world: K-wise rankings and implied pairs of the start's
responses, labelled by the true reward with noise) -> ``proxy_rm`` (trained on the policy_train rankings).

A stage's key is sha256 of its kind, its recipe with every input path replaced by that input's identity (the
key of the stage that made it, or the sha256 of a data file's bytes; output_dir dropped), and the torch /
transformers versions. The stage lives in ``cache_dir/<stage>-<key16>``; ``stage.json``, written last, marks
it complete. A trained stage runs in this process (``isolation: inprocess``, log ``train.log``) or as a
``prefopt`` SUBPROCESS (log ``stage.log``); an interrupted one resumes from its checkpoint (train.resume=auto).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from prefopt.bench.config import BenchConfig
from prefopt.bench.data import BenchData, read_jsonl, write_jsonl
from prefopt.bench.recipes import stage_recipe
from prefopt.errors import PrefoptError

STAGE_FILE = "stage.json"


class StageFailed(PrefoptError):
    """A stage or run subprocess exited non-zero."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def identity(path: str, known: dict[str, str]) -> str:
    """What a path stands for in a key: a stage key, the sha256 of a file / a directory's files, or the name."""
    if path in known:
        return known[path]
    p = Path(path)
    if p.is_file():
        return "sha256:" + sha256_file(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return "dir:" + hashlib.sha256("".join(f"{f.relative_to(p)}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()
    return path


def _normalise(value: Any, known: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, known) for k, v in sorted(value.items()) if k != "output_dir"}
    if isinstance(value, list):
        return [_normalise(v, known) for v in value]
    if isinstance(value, str) and (value in known or os.sep in value or Path(value).exists()):
        return identity(value, known)
    return value


def stage_key(kind: str, spec: dict[str, Any], known: dict[str, str]) -> str:
    import torch
    import transformers

    payload = {"kind": kind, "spec": _normalise(spec, known),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_prefopt(args: list[str], log_path: Path) -> dict[str, float]:
    """``python -m prefopt.cli ARGS`` in a subprocess, output to ``log_path``.

    Returns its ``wall_s`` and ``cpu_s`` (user + system CPU seconds of the subprocess: on a shared machine the
    wall time is noisy, the CPU time much less). StageFailed (with the log's tail) on a non-zero exit.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write(f"$ {sys.executable} -m prefopt.cli {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "prefopt.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # let the run save its checkpoint (resumed by the next `prefopt bench`)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt(f"`prefopt {args[0]}` was interrupted (log: {log_path})")
    if returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise StageFailed(f"`prefopt {args[0]}` exited with {returncode} (log: {log_path}):\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": seconds, "cpu_s": cpu}


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@dataclass
class Stage:
    """One cached stage: ``build()`` makes ``directory`` unless ``done``."""

    name: str
    key: str
    directory: Path
    build_fn: Callable[["Stage"], dict[str, float] | None]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return (self.directory / STAGE_FILE).is_file()

    @property
    def model(self) -> Path:
        return self.directory / "model"

    def record(self) -> dict[str, Any]:
        out = {"stage": self.name, "key": self.key, "dir": str(self.directory)}
        if self.done:
            out.update(json.loads((self.directory / STAGE_FILE).read_text()))
        return out

    def build(self) -> dict[str, float]:
        """Build the stage (a no-op when cached); the wall and CPU seconds spent (CPU: subprocesses only)."""
        if self.done:
            return {"wall_s": 0.0, "cpu_s": 0.0}
        start = time.perf_counter()
        cost = self.build_fn(self) or {}
        seconds = time.perf_counter() - start
        cost = {"wall_s": seconds, "cpu_s": cost.get("cpu_s", float("nan"))}
        info = {"stage": self.name, "key": self.key, **cost, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "spec": self.spec}
        summary = self.directory / "summary.json"
        if summary.is_file():
            info["summary"] = json.loads(summary.read_text())
        (self.directory / STAGE_FILE).write_text(json.dumps(info, indent=2, default=str))
        return cost


@dataclass
class Start:
    """The planned stages and the paths the runs need."""

    stages: list[Stage]
    policy: Path  # the start model every algorithm trains from
    proxy_rm: Path | None = None
    gold_rm: Path | None = None
    pairs: dict[str, Path] = field(default_factory=dict)  # synthetic / world: generated pairs per part
    ranks: dict[str, Path] = field(default_factory=dict)  # world: K-wise rankings per part


def plan_start(cfg: BenchConfig, data: BenchData) -> Start:
    """The start's stages with their keys and cache directories (nothing is built yet)."""
    cache = Path(cfg.cache_dir).resolve()
    inprocess = cfg.isolation == "inprocess"

    def trained(stage: Stage) -> dict[str, float]:
        return _build_trained(stage, inprocess)

    known: dict[str, str] = {}  # path -> identity of the stage output it is
    stages: list[Stage] = []

    def add(name: str, spec: dict[str, Any], build_fn: Callable[[Stage], Any]) -> Stage:
        key = stage_key(name, spec, known)
        stage = Stage(name, key, cache / f"{name}-{key[:16]}", build_fn, spec)
        known[str(stage.model)] = f"stage:{key}"
        stages.append(stage)
        return stage

    if cfg.start.model:
        model = cfg.start.model
    else:
        corpus = cfg.start.init.corpus or ([str(data.corpus)] if data.corpus else [cfg.data.path])
        corpus = [str(Path(c).resolve()) if Path(c).exists() else c for c in corpus]
        init_spec = {**asdict(cfg.start.init), "corpus": corpus}
        model = str(add("init", init_spec, lambda s: _build_init(s, inprocess)).model)

    eval_file = str(data.files["eval"].resolve())
    policy_file = str(data.files["policy_train"].resolve())
    for stage_name in ("pt", "sft"):
        partial = getattr(cfg.start, stage_name)
        if partial is None:
            continue
        recipe = stage_recipe(cfg, stage_name, partial, model, policy_file,
                              eval_file if cfg.task == "hh" else None, "<stage dir>")
        if cfg.task == "world" and "path" not in (partial.get("data") or {}):
            raise StageFailed(f"start.{stage_name}.data.path: task world has no demonstrations; give the text the "
                              "start learns from (e.g. the HH dialogues)")
        model = str(add(stage_name, recipe, trained).model)
    start = Start(stages=stages, policy=Path(model))

    if cfg.task == "hh":
        for which in ("proxy", "gold"):
            part = str(data.files[f"{which}_rm_train"].resolve())
            recipe = stage_recipe(cfg, which, getattr(cfg.reward_models, which), model, part, eval_file,
                                  "<stage dir>")
            stage = add(f"{which}_rm", recipe, trained)
            setattr(start, f"{which}_rm", stage.model)
    elif cfg.task == "world":
        _plan_world(cfg, data, start, model, add, known, trained)
    else:
        spec = {"start": model, "prompts": {name: str(path.resolve()) for name, path in data.files.items()},
                "synthetic": asdict(cfg.synthetic), "generation": asdict(cfg.eval.generation),
                "max_prompt_length": cfg.data.max_prompt_length, "batch_size": cfg.eval.batch_size}
        stage = add("pairs", spec, lambda s: _build_pairs(s, cfg))
        start.pairs = {name: stage.directory / f"{name}.jsonl" for name in data.files}
    return start


def _plan_world(cfg: BenchConfig, data: BenchData, start: Start, model: str, add, known: dict[str, str],
                trained) -> None:
    """World stages: ``labels`` (K responses per prompt from the start, ranked by the true reward with noise,
    prefopt.bench.world) and ``proxy_rm`` (the reward recipe on the policy_train rankings, eval on val pairs)."""
    from prefopt.bench.world import build_labels

    parts = ("policy_train", "val")
    generation = replace(cfg.eval.generation, max_new_tokens=cfg.world.max_new_tokens)
    spec = {"start": model, "prompts": {p: str(data.files[p].resolve()) for p in parts}, "world": asdict(cfg.world),
            "generation": asdict(generation), "lengths": [cfg.data.max_length, cfg.data.max_prompt_length],
            "batch_size": cfg.eval.batch_size}
    labels = add("labels", spec, lambda s: build_labels(s.directory, model, spec["prompts"], cfg.world, generation,
                                                        (cfg.data.max_length, cfg.data.max_prompt_length),
                                                        cfg.eval.batch_size) and None)
    start.ranks = {p: labels.directory / f"{p}.ranks.jsonl" for p in parts}
    start.pairs = {p: labels.directory / f"{p}.pairs.jsonl" for p in parts}
    for p in parts:
        known[str(start.ranks[p])] = f"stage:{labels.key}:{p}.ranks"
        known[str(start.pairs[p])] = f"stage:{labels.key}:{p}.pairs"
    recipe = stage_recipe(cfg, "proxy", cfg.reward_models.proxy, model, str(start.ranks["policy_train"]),
                          str(start.pairs["val"]), "<stage dir>")
    start.proxy_rm = add("proxy_rm", recipe, trained).model


def _build_init(stage: Stage, inprocess: bool = False) -> dict[str, float]:
    spec = stage.spec
    if inprocess:
        from prefopt.tiny import init_model

        cpu = time.process_time()
        init_model(stage.model, corpus=spec["corpus"], arch=spec["arch"], size=spec["size"],
                   vocab_size=spec["vocab_size"], seed=spec["seed"], max_texts=spec.get("max_texts"))
        return {"cpu_s": time.process_time() - cpu}
    args = ["init-model", str(stage.model), "--corpus", *spec["corpus"], "--arch", spec["arch"], "--size",
            spec["size"], "--vocab-size", str(spec["vocab_size"]), "--seed", str(spec["seed"])]
    if spec.get("max_texts"):
        args += ["--max-texts", str(spec["max_texts"])]
    return run_prefopt(args, stage.directory / "stage.log")


def _build_trained(stage: Stage, inprocess: bool = False) -> dict[str, float]:
    recipe = json.loads(json.dumps(stage.spec))
    recipe["train"]["output_dir"] = str(stage.directory)
    stage.directory.mkdir(parents=True, exist_ok=True)
    if inprocess:  # prefopt.bench.execute: the same Trainer, without a subprocess's imports
        from prefopt.bench.execute import train_run

        cost = train_run(recipe, stage.directory, [], inprocess=True)
        _drop_checkpoints(stage.directory)
        return {"cpu_s": cost["cpu_s"]}
    path = write_recipe(stage.directory / "recipe.yaml", recipe)
    cost = run_prefopt(["train", str(path)], stage.directory / "stage.log")
    _drop_checkpoints(stage.directory)
    return cost


def _drop_checkpoints(directory: Path) -> None:
    shutil.rmtree(directory / "checkpoints", ignore_errors=True)


def _build_pairs(stage: Stage, cfg: BenchConfig) -> None:
    """Synthetic offline data: per prompt, ``samples_per_prompt`` responses from the start (shared engine,
    seeded); the best and the worst under the known reward become chosen / rejected; ties are dropped.

    The pairs are stored as text, so training re-tokenizes them (with EOS appended) like any pairs file."""
    import torch

    from prefopt.config import DataConfig, ModelConfig
    from prefopt.data import build_dataloader
    from prefopt.models import load_causal_lm, load_tokenizer
    from prefopt.rl.rewards import RewardSpec, build_component
    from prefopt.rl.engine import generate
    from prefopt.tasks import TASK_REWARD

    spec = stage.spec
    model_cfg = ModelConfig(name_or_path=spec["start"])
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, trainable=False)
    reward = build_component(RewardSpec(**TASK_REWARD), tokenizer, torch.device("cpu"))
    k = cfg.synthetic.samples_per_prompt
    data_cfg = DataConfig(path="<prompts>", max_length=cfg.data.max_length,
                          max_prompt_length=cfg.data.max_prompt_length, eval_fraction=0.0)
    stage.directory.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, path in spec["prompts"].items():
        records = [{"prompt": r["prompt"], "meta": {}} for r in read_jsonl(Path(path))]
        repeated = [r for r in records for _ in range(k)]
        loader, _ = build_dataloader(repeated, "prompts", tokenizer, data_cfg, cfg.eval.batch_size * k,
                                     shuffle=False, seed=0)
        responses, scores = [], []
        for i, batch in enumerate(loader):
            rollout = generate(model, tokenizer, batch, cfg.eval.generation, seed=cfg.synthetic.seed + 7919 * (i + 1))
            responses += rollout.responses
            scores += reward(rollout).tolist()
        rows = []
        for j, record in enumerate(records):
            group = list(zip(scores[j * k:(j + 1) * k], responses[j * k:(j + 1) * k]))
            best, worst = max(group, key=lambda x: x[0]), min(group, key=lambda x: x[0])
            if best[0] > worst[0] and best[1].strip() and worst[1].strip() and best[1] != worst[1]:
                rows.append({"prompt": record["prompt"], "chosen": best[1], "rejected": worst[1]})
        write_jsonl(stage.directory / f"{name}.jsonl", rows)
        report[name] = {"prompts": len(records), "pairs": len(rows)}
    (stage.directory / "summary.json").write_text(json.dumps(report, indent=2))
