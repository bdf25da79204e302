"""The bench's pinned data: disjoint parts by stable hash, written as files every run trains on.

Task ``hh``: the source pairs (prefopt.data.load_rows, kind ``pairs``) are assigned to the parts
``policy_train`` / ``proxy_rm_train`` / ``gold_rm_train`` / ``eval`` by ``sha256(salt + row id)``
(prefopt.data.splits.assign), so the same file and salt always give the same parts, whatever the row order.
Each part is written as canonical ``{prompt, chosen, rejected}`` lines (whose record ids are the source
rows' ids) and the policy_train dialogues also as HH ``{chosen, rejected}`` lines, the tokenizer corpus.

Task ``synthetic``: prefopt.tasks' prompts, split the same way into ``policy_train`` and ``eval``; the pairs
the offline algorithms need are sampled later from the start (prefopt.bench.start).

The eval set is the first ``eval.num_prompts`` distinct prompts and ``eval.num_pairs`` pairs of the eval part,
in hash order. The manifest records every part's count and the sha256 of its sorted ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.bench.config import BenchConfig
from prefopt.config import DataConfig
from prefopt.data import load_rows, record_id
from prefopt.data.splits import assign, ids_digest


@dataclass
class BenchData:
    """The parts (records in hash order), the files they were written to, and the split manifest."""

    parts: dict[str, list[dict[str, Any]]]
    files: dict[str, Path]
    manifest: dict[str, Any]
    eval_prompts: list[dict[str, Any]] = field(default_factory=list)
    eval_pairs: list[dict[str, Any]] = field(default_factory=list)
    corpus: Path | None = None
    val_prompts: list[dict[str, Any]] = field(default_factory=list)

    def eval_manifest(self) -> dict[str, Any]:
        return {"prompts": {"count": len(self.eval_prompts),
                            "ids_sha256": ids_digest(record_id(p) for p in self.eval_prompts)},
                "pairs": {"count": len(self.eval_pairs), "ids_sha256": ids_digest(record_id(p) for p in self.eval_pairs)}}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSON lines only when the content changed (stable mtimes and hashes on re-runs)."""
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file. Split on "\n" only: a text written with ensure_ascii=False may hold U+2028 or
    U+0085, which ``str.splitlines`` also breaks at."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def prepare_data(cfg: BenchConfig, run_dir: Path) -> BenchData:
    """Split the source into the pinned parts and write them under ``run_dir/data``."""
    return {"synthetic": _synthetic, "world": _world, "hh": _hh}[cfg.task](cfg, run_dir)


def _split(records: list[dict[str, Any]], cfg: BenchConfig) -> tuple[dict[str, list[dict[str, Any]]], dict]:
    by_id = {record_id(r): r for r in records}
    ids = assign(by_id, cfg.splits.salt, dict(cfg.splits.fractions))
    parts = {name: [by_id[i] for i in members] for name, members in ids.items()}
    summary = {name: {"count": len(members), "ids_sha256": ids_digest(members)} for name, members in ids.items()}
    return parts, {"salt": cfg.splits.salt, "fractions": dict(cfg.splits.fractions), "parts": summary}


def _hh(cfg: BenchConfig, run_dir: Path) -> BenchData:
    source = DataConfig(path=cfg.data.path, format=cfg.data.format, subsets=list(cfg.data.subsets),
                        split=cfg.data.split, eval_fraction=0.0, max_length=cfg.data.max_length,
                        max_prompt_length=cfg.data.max_prompt_length)
    loaded = load_rows(source, "pairs")
    parts, manifest = _split(loaded.train, cfg)
    manifest.update(sources=loaded.manifest["sources"], skipped=loaded.manifest["skipped"],
                    source_config={"path": cfg.data.path, "subsets": list(cfg.data.subsets), "split": cfg.data.split})
    files = {name: write_jsonl(run_dir / "data" / f"{name}.jsonl", rows) for name, rows in parts.items()}
    dialogues = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                 for r in parts["policy_train"]]
    corpus = write_jsonl(run_dir / "data" / "policy_train.dialogues.jsonl", dialogues)
    data = BenchData(parts=parts, files=files, manifest=manifest, corpus=corpus)
    data.eval_pairs = parts["eval"][:cfg.eval.num_pairs]
    data.eval_prompts = _distinct_prompts(parts["eval"], cfg.eval.num_prompts)
    return data


def _synthetic(cfg: BenchConfig, run_dir: Path) -> BenchData:
    from prefopt.tasks import task_prompts

    prompts = list(dict.fromkeys(task_prompts(cfg.synthetic.num_prompts, cfg.synthetic.seed)))
    parts, manifest = _split([{"prompt": p} for p in prompts], cfg)
    manifest.update(sources=[{"task": "prefopt.tasks.task_prompts", "num_prompts": cfg.synthetic.num_prompts,
                              "seed": cfg.synthetic.seed, "distinct": len(prompts)}],
                    skipped={"total": cfg.synthetic.num_prompts - len(prompts),
                             "reasons": {"duplicate prompt": {"count": cfg.synthetic.num_prompts - len(prompts)}}})
    files = {name: write_jsonl(run_dir / "data" / f"{name}.jsonl", rows) for name, rows in parts.items()}
    data = BenchData(parts=parts, files=files, manifest=manifest)
    data.eval_prompts = _distinct_prompts(parts["eval"], cfg.eval.num_prompts)
    return data


def _world(cfg: BenchConfig, run_dir: Path) -> BenchData:
    """The known-gold world's prompts (prefopt.bench.world), split into policy_train / val / eval."""
    from prefopt.bench.world import world_prompts

    world = cfg.world
    prompts = list(dict.fromkeys(world_prompts(world.num_prompts, world.seed)))
    parts, manifest = _split([{"prompt": p} for p in prompts], cfg)
    manifest.update(sources=[{"task": "prefopt.bench.world.world_prompts", "num_prompts": world.num_prompts,
                              "seed": world.seed, "distinct": len(prompts)}],
                    skipped={"total": world.num_prompts - len(prompts),
                             "reasons": {"duplicate prompt": {"count": world.num_prompts - len(prompts)}}})
    files = {name: write_jsonl(run_dir / "data" / f"{name}.jsonl", rows) for name, rows in parts.items()}
    data = BenchData(parts=parts, files=files, manifest=manifest)
    data.eval_prompts = _distinct_prompts(parts["eval"], cfg.eval.num_prompts)
    data.val_prompts = _distinct_prompts(parts["val"], cfg.eval.num_prompts)
    return data


def _distinct_prompts(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` distinct prompts of ``rows`` as ``prompts`` records ``{prompt, meta}``."""
    seen = dict.fromkeys(r["prompt"] for r in rows)
    return [{"prompt": p, "meta": {}} for p in list(seen)[:limit]]
