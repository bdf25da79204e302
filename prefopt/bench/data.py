"""The bench's pinned data: disjoint parts by stable hash, written as the files every stage and run trains on.

Every source row goes to a part by ``sha256(salt + row id)`` (prefopt.data.splits.assign), so the same source and
salt always give the same parts, whatever the row order. Task ``world``: the known-gold world's prompts
(prefopt.bench.world.world_prompts) into ``policy_train`` / ``val`` / ``eval``, and the start's demonstrations
(``world.demonstrations`` rows of prefopt.bench.world.demonstrations: the source's assistant replies with words of
the prompt's group inserted, on prompts no part holds), the SFT stage's default data. Task ``hh``: the source pairs
into ``policy_train`` / ``proxy_rm_train`` / ``gold_rm_train`` / ``val`` / ``eval``, each written as canonical
``{prompt, chosen, rejected}`` lines, the policy_train dialogues as the tokenizer corpus, and its pairs as KTO rows
(chosen desirable, rejected undesirable: one label per response).

The prompt sets every policy is sampled on are the first ``eval.num_prompts`` distinct prompts of the val and eval
parts, in hash order (``prompts.jsonl``); task hh's held-out pairs are the first ``eval.num_pairs`` pairs of the
eval part. The manifest records every part's count and the sha256 of its sorted ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.bench.config import BenchConfig
from prefopt.bench.files import write_jsonl
from prefopt.bench.world import demonstrations, prompt_group, world_prompts
from prefopt.config import DataConfig
from prefopt.data import load_rows, record_id
from prefopt.data.splits import assign, ids_digest

PROMPT_SETS = ("val", "eval")
DEMONSTRATION_SEED = 99991
"""The world demonstrations' prompts are drawn with ``world.seed + DEMONSTRATION_SEED`` (and never a bench prompt)."""


@dataclass
class BenchData:
    """The parts (records in hash order), the files they were written to, the prompt sets and the split manifest."""

    parts: dict[str, list[dict[str, Any]]]
    files: dict[str, Path]
    manifest: dict[str, Any]
    prompts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Set (val, eval) -> ``{prompt, meta}`` records, index i = position."""
    corpus: Path | None = None
    """The tokenizer corpus (hh: the policy_train dialogues)."""
    held_out_pairs: list[dict[str, Any]] = field(default_factory=list)
    """hh: the eval part's first ``eval.num_pairs`` pairs (world: labelled per draw, prefopt.bench.stages)."""


def prepare_data(cfg: BenchConfig, run_dir: Path) -> BenchData:
    """Split the source into the pinned parts, write them under ``run_dir/data`` and ``run_dir/prompts.jsonl``."""
    data = (_world if cfg.task == "world" else _hh)(cfg, run_dir)
    data.prompts = {name: _distinct_prompts(data.parts[name], cfg.eval.num_prompts) for name in PROMPT_SETS}
    rows = [{"set": name, "i": i, "prompt": record["prompt"], "group": _group(record["prompt"], cfg.task)}
            for name in PROMPT_SETS for i, record in enumerate(data.prompts[name])]
    write_jsonl(run_dir / "prompts.jsonl", rows)
    return data


def _group(prompt: str, task: str) -> int | None:
    return prompt_group(prompt) if task == "world" else None


def _split(records: list[dict[str, Any]], cfg: BenchConfig) -> tuple[dict[str, list[dict[str, Any]]], dict]:
    by_id = {record_id(r): r for r in records}
    ids = assign(by_id, cfg.splits.salt, dict(cfg.splits.fractions))
    parts = {name: [by_id[i] for i in members] for name, members in ids.items()}
    summary = {name: {"count": len(members), "ids_sha256": ids_digest(members)} for name, members in ids.items()}
    return parts, {"salt": cfg.splits.salt, "fractions": dict(cfg.splits.fractions), "parts": summary}


def _write(parts: dict[str, list[dict[str, Any]]], run_dir: Path) -> dict[str, Path]:
    return {name: write_jsonl(run_dir / "data" / f"{name}.jsonl", rows) for name, rows in parts.items()}


def _hh(cfg: BenchConfig, run_dir: Path) -> BenchData:
    source = DataConfig(path=cfg.data.path, format=cfg.data.format, subsets=list(cfg.data.subsets),
                        split=cfg.data.split, eval_fraction=0.0, max_length=cfg.data.max_length,
                        max_prompt_length=cfg.data.max_prompt_length)
    loaded = load_rows(source, "pairs")
    parts, manifest = _split(loaded.train, cfg)
    manifest.update(sources=loaded.manifest["sources"], skipped=loaded.manifest["skipped"],
                    source_config={"path": cfg.data.path, "subsets": list(cfg.data.subsets), "split": cfg.data.split})
    dialogues = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                 for r in parts["policy_train"]]
    corpus = write_jsonl(run_dir / "data" / "policy_train.dialogues.jsonl", dialogues)
    files = _write(parts, run_dir)
    kto = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
           for r in parts["policy_train"] for side in ("chosen", "rejected")]  # one label per response
    files["policy_train.kto"] = write_jsonl(run_dir / "data" / "policy_train.kto.jsonl", kto)
    return BenchData(parts=parts, files=files, manifest=manifest, corpus=corpus,
                     held_out_pairs=parts["eval"][:cfg.eval.num_pairs])


def _world(cfg: BenchConfig, run_dir: Path) -> BenchData:
    world = cfg.world
    prompts = world_prompts(world.num_prompts, world.seed)
    parts, manifest = _split([{"prompt": p} for p in prompts], cfg)
    manifest.update(sources=[{"task": "prefopt.bench.world.world_prompts", "num_prompts": world.num_prompts,
                              "seed": world.seed, "distinct": len(prompts)}],
                    skipped={"total": 0, "reasons": {}})
    files = _write(parts, run_dir)
    if world.demonstrations:
        rows = _demonstrations(cfg, set(prompts))
        files["demonstrations"] = write_jsonl(run_dir / "data" / "demonstrations.jsonl", rows)
        manifest["demonstrations"] = {"rows": len(rows), "seed": world.seed + DEMONSTRATION_SEED,
                                      "words": world.demonstration_words, "replies": cfg.data.path}
    return BenchData(parts=parts, files=files, manifest=manifest)


def _demonstrations(cfg: BenchConfig, bench_prompts: set[str]) -> list[dict[str, str]]:
    """The start's world demonstrations (prefopt.bench.world.demonstrations): prompts no bench part holds, replies
    the assistant turns of the source dialogues (data.path: the HH chosen replies)."""
    world = cfg.world
    source = DataConfig(path=cfg.data.path, format=cfg.data.format, subsets=list(cfg.data.subsets),
                        split=cfg.data.split, eval_fraction=0.0)
    replies = [row["chosen"] for row in load_rows(source, "pairs").train]
    prompts = world_prompts(world.demonstrations, world.seed + DEMONSTRATION_SEED, exclude=bench_prompts,
                            distinct=False)
    return demonstrations(prompts, replies, random.Random(world.seed), words=world.demonstration_words)


def _distinct_prompts(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` distinct prompts of ``rows`` as ``prompts`` records ``{prompt, meta}``."""
    seen = dict.fromkeys(r["prompt"] for r in rows)
    return [{"prompt": p, "meta": {}} for p in list(seen)[:limit]]
