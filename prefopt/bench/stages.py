"""The shared start and each world draw, stage by stage, every stage cached under the key of what makes it.

Shared stages: ``init`` (a tiny model + tokenizer, prefopt.tiny) -> ``pt`` -> ``sft``: the start every algorithm
trains from. Then per world draw d (seed ``draw_seed(cfg, d)``), task world: ``labels`` (K responses per prompt
of every part sampled from the start, labelled by prefopt.bench.world.label_prompts: rankings, implied pairs, KTO
rows) -> ``proxy_rm`` (the reward recipe on the draw's policy_train rankings, held out: its val pairs); task hh:
``proxy_rm`` (the proxy_rm_train part, the draw's seed) and one shared ``gold_rm`` (the disjoint gold_rm_train part).

A stage's key is prefopt.bench.files.content_key of its kind and spec (inputs by identity: a stage's model by that
stage's key); it lives in ``cache_dir/<stage>-<key16>`` and ``stage.json``, written last, marks it built. A
trained stage runs prefopt.bench.launch.train (an interrupted one resumes from its checkpoint: train.resume=auto).
Stages are plain data (``Stage``), built by ``build_stage`` in whichever process the runner gives them to.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from prefopt.bench.config import BenchConfig
from prefopt.bench.data import BenchData
from prefopt.bench.files import content_key, read_json, read_jsonl, write_json, write_jsonl
from prefopt.bench.recipes import gold_judge, train_recipe
from prefopt.bench.world import label_prompts

STAGE_FILE = "stage.json"
LABELLED_PARTS = ("policy_train", "val", "eval")
"""World parts labelled per draw: training rows, selection / proxy held-out pairs, the report's held-out pairs."""


@dataclass
class Stage:
    """One cached stage: ``kind`` init | train | labels, its ``spec`` (a recipe for train), ``draw`` or None."""

    name: str
    kind: str
    key: str
    directory: Path
    spec: dict[str, Any]
    draw: int | None = None

    @property
    def done(self) -> bool:
        return (self.directory / STAGE_FILE).is_file()

    @property
    def model(self) -> Path:
        return self.directory / "model"

    def record(self) -> dict[str, Any]:
        """The manifest's row: stage, draw, key and the cost of its build (when built)."""
        info = read_json(self.directory / STAGE_FILE) if self.done else {}
        return {"stage": self.name, "draw": self.draw, "key": self.key, "dir": str(self.directory),
                "wall_s": info.get("wall_s"), "cpu_s": info.get("cpu_s"), "summary": info.get("summary")}


@dataclass
class Draw:
    """One world draw: its seed, its stages and the files its runs train on."""

    draw: int
    seed: int
    stages: list[Stage] = field(default_factory=list)
    proxy_rm: Path | None = None
    train_files: dict[str, Path] = field(default_factory=dict)
    """Data kind -> training file (prompts, pairs, unpaired, ranks)."""
    val_pairs: Path | None = None
    held_out_pairs: Path | None = None
    proxy_data: Path | None = None
    """The labelled rows the proxy RM trains on (world: rankings; hh: pairs)."""


@dataclass
class Start:
    """The planned stages (nothing built yet) and the paths the runs need."""

    shared: list[Stage]
    policy: Path
    draws: list[Draw]
    gold_rm: Path | None = None
    known: dict[str, str] = field(default_factory=dict)
    """Path -> identity (``stage:<key>...``) of every stage output, for content keys."""

    @property
    def stages(self) -> list[Stage]:
        return self.shared + [stage for draw in self.draws for stage in draw.stages]


def draw_seed(cfg: BenchConfig, draw: int) -> int:
    """The seed of world draw ``draw``: its labels' sampling and noise, and its proxy RM's training."""
    return (cfg.world.seed if cfg.task == "world" else cfg.start.init.seed) + 1 + draw


def plan_start(cfg: BenchConfig, data: BenchData) -> Start:
    """The stages with their keys and cache directories, the start model and every draw's files."""
    cache = Path(cfg.cache_dir).resolve()
    known: dict[str, str] = {}

    def stage(name: str, kind: str, spec: dict[str, Any], draw: int | None = None) -> Stage:
        key = content_key(name, spec, known)
        made = Stage(name, kind, key, cache / f"{name}-{key[:16]}", spec, draw)
        known[str(made.model)] = f"stage:{key}"
        return made

    shared: list[Stage] = []
    if cfg.start.model:
        model = cfg.start.model
    else:
        corpus = cfg.start.init.corpus or ([str(data.corpus)] if data.corpus else [cfg.data.path])
        corpus = [str(Path(c).resolve()) if Path(c).exists() else c for c in corpus]
        shared.append(stage("init", "init", {**asdict(cfg.start.init), "corpus": corpus}))
        model = str(shared[-1].model)
    policy_file = str(data.files["policy_train"].resolve())
    eval_file = str(data.files["eval"].resolve())
    default_data = {"pt": policy_file, "sft": str(data.files.get("demonstrations", policy_file))}
    for name in ("pt", "sft"):
        partial = getattr(cfg.start, name)
        if partial is not None:
            recipe = train_recipe(cfg, partial, f"start.{name}", algorithm=name, model=model,
                                  data_path=default_data[name],
                                  eval_path=eval_file if cfg.task == "hh" else None, output_dir="<stage>",
                                  seed=cfg.start.init.seed, run=False)
            shared.append(stage(name, "train", recipe))
            model = str(shared[-1].model)
    start = Start(shared, Path(model), [], known=known)
    if cfg.task == "hh":
        gold = train_recipe(cfg, cfg.reward_models.gold, "reward_models.gold", algorithm="reward", model=model,
                            data_path=str(data.files["gold_rm_train"].resolve()), eval_path=eval_file,
                            output_dir="<stage>", seed=cfg.start.init.seed, run=False)
        shared.append(stage("gold_rm", "train", gold))
        start.gold_rm = shared[-1].model
    for d in range(cfg.draws):
        draw = Draw(d, draw_seed(cfg, d))
        if cfg.task == "world":
            labels = stage("labels", "labels", {"start": model, "seed": draw.seed, "world": asdict(cfg.world),
                                                "gold": gold_judge(cfg),
                                                "prompts": {p: str(data.files[p].resolve()) for p in LABELLED_PARTS},
                                                "generation": asdict(cfg.eval.generation),
                                                "lengths": [cfg.data.max_length, cfg.data.max_prompt_length],
                                                "batch_size": cfg.eval.batch_size}, d)
            files = {f"{part}.{what}": labels.directory / f"{part}.{what}.jsonl"
                     for part in LABELLED_PARTS for what in ("ranks", "pairs", "kto")}
            for name, path in files.items():
                known[str(path)] = f"stage:{labels.key}:{name}"
            draw.stages.append(labels)
            draw.train_files = {"prompts": data.files["policy_train"].resolve(), "pairs": files["policy_train.pairs"],
                                "unpaired": files["policy_train.kto"], "ranks": files["policy_train.ranks"]}
            draw.val_pairs, draw.held_out_pairs = files["val.pairs"], files["eval.pairs"]
            proxy_data, proxy_eval = str(files["policy_train.ranks"]), str(files["val.pairs"])
        else:
            policy = data.files["policy_train"].resolve()
            draw.train_files = {"prompts": policy, "pairs": policy, "ranks": policy,
                                "unpaired": data.files["policy_train.kto"].resolve()}
            draw.val_pairs, draw.held_out_pairs = data.files["val"].resolve(), data.files["eval"].resolve()
            proxy_data, proxy_eval = str(data.files["proxy_rm_train"].resolve()), eval_file
        draw.proxy_data = Path(proxy_data)
        proxy = train_recipe(cfg, cfg.reward_models.proxy, "reward_models.proxy", algorithm="reward", model=model,
                             data_path=proxy_data, eval_path=proxy_eval, output_dir="<stage>", seed=draw.seed,
                             run=False)
        draw.stages.append(stage("proxy_rm", "train", proxy, d))
        draw.proxy_rm = draw.stages[-1].model
        start.draws.append(draw)
    return start


def build_stage(stage: Stage) -> dict[str, Any]:
    """Build ``stage`` unless it is built: {key, built, wall_s, cpu_s} (0 s when it was built before)."""
    if stage.done:
        return {"key": stage.key, "built": False, "wall_s": 0.0, "cpu_s": 0.0}
    wall, cpu = time.perf_counter(), time.process_time()
    stage.directory.mkdir(parents=True, exist_ok=True)
    summary = {"init": _build_init, "train": _build_trained, "labels": _build_labels}[stage.kind](stage)
    cost = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    write_json(stage.directory / STAGE_FILE, {"stage": stage.name, "draw": stage.draw, "key": stage.key, **cost,
                                              "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "spec": stage.spec,
                                              "summary": summary})
    return {"key": stage.key, "built": True, **cost}


def _build_init(stage: Stage) -> dict[str, Any]:
    from prefopt.tiny import init_model

    spec = stage.spec
    init_model(stage.model, corpus=spec["corpus"], arch=spec["arch"], size=spec["size"],
               vocab_size=spec["vocab_size"], seed=spec["seed"], max_texts=spec.get("max_texts"))
    return {}


def _build_trained(stage: Stage) -> dict[str, Any]:
    from prefopt.bench.launch import train

    recipe = {**stage.spec, "train": {**stage.spec["train"], "output_dir": str(stage.directory)}}
    out = train(recipe, stage.directory)
    shutil.rmtree(stage.directory / "checkpoints", ignore_errors=True)
    return {k: v for k, v in out["final"].items() if isinstance(v, (int, float))}


def _build_labels(stage: Stage) -> dict[str, Any]:
    """K responses per prompt of every labelled part from the start (seeded per batch), scored by the true reward,
    labelled by prefopt.bench.world.label_prompts; writes ``<part>.{ranks,pairs,kto}.jsonl``."""
    import torch

    from prefopt.config import DataConfig, ModelConfig
    from prefopt.data import build_dataloader
    from prefopt.models import load_causal_lm, load_tokenizer
    from prefopt.rl.engine import GenerationConfig, generate
    from prefopt.rl.rewards import RewardSpec, build_component

    spec = stage.spec
    world = spec["world"]
    model_cfg = ModelConfig(name_or_path=spec["start"])
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, trainable=False)
    gold = build_component(RewardSpec(**spec["gold"]), tokenizer, torch.device("cpu"))
    generation = replace(GenerationConfig(**spec["generation"]), max_new_tokens=world["max_new_tokens"])
    k = world["responses_per_prompt"]
    data_cfg = DataConfig(path="<prompts>", max_length=spec["lengths"][0], max_prompt_length=spec["lengths"][1],
                          eval_fraction=0.0)
    rng = random.Random(spec["seed"])
    summary: dict[str, Any] = {}
    for part, path in spec["prompts"].items():
        records = [{"prompt": r["prompt"], "meta": {}} for r in read_jsonl(Path(path))]
        loader, _ = build_dataloader(records, "prompts", tokenizer, data_cfg, spec["batch_size"], shuffle=False,
                                     seed=0)
        texts, scores = [], []
        for b, batch in enumerate(loader):
            rollout = generate(model, tokenizer, batch, generation, num_samples=k,
                               seed=7919 * spec["seed"] + 104729 * LABELLED_PARTS.index(part) + b)
            texts += rollout.responses
            scores += gold(rollout).tolist()
        labels = label_prompts([r["prompt"] for r in records], [texts[j * k:(j + 1) * k] for j in range(len(records))],
                               [scores[j * k:(j + 1) * k] for j in range(len(records))], world["label_temperature"],
                               rng)
        for what in ("ranks", "pairs", "kto"):
            write_jsonl(stage.directory / f"{part}.{what}.jsonl", labels[what])
        summary[part] = labels["summary"]
    return summary
