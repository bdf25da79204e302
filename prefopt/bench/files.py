"""The bench's files: the run-directory layout, JSON and JSON-lines in and out, and content keys.

The run directory is everything a result depends on and all the report reads (prefopt.bench.report):

    bench.json            {profile, task, config}: the resolved bench config
    manifest.json         versions, git commit, host (cpus, threads, workers, load), splits (counts, id hashes),
                          seeds (main, train, select), draws, selection (per label: grids as run, chosen learning
                          rate and knob value, on_edge, extended, the val table), skipped labels, stages (key,
                          cached, cost), times per phase
    plan.json             {labels: {label: {algorithm, kind, knob, policy_class, reward, oracle_of}}, runs: [row]}
                          row: id, label, algorithm, kind, phase (select | main | oracle | probe), draw, seed,
                          knob, value, learning_rate, dir, reward (proxy | true | labels), policy_class, max_steps,
                          checkpoints, eval_set, oracle_of, key
    prompts.jsonl         {set (val | eval), i, prompt, group}: the prompt sets every policy is sampled on
    gold.json             hh: the gold RM's accuracy on every held-out pair of the eval part, with its 95% interval
    data/<part>.jsonl     the pinned parts
    draws/draw<d>/        draw.json (seed, keys); labels.json (world: counts, ties dropped, label agreement per part);
                          proxy.json (the proxy RM's held-out accuracy beside the prompt-blind rule and the true
                          reward; world: the oracle runs' weight of the true reward, in the proxy's units);
                          start.jsonl (the start's sample rows, step 0); best_of_n.jsonl {i, j, gold, proxy, length,
                          cond_acc}; pairs.jsonl (held-out pairs: the start's log-probs, the gold of each reply)
    runs/<id>/            run.json (plan row + status, final_step, cost: wall / CPU s, eval s, peak RSS, updates, rows,
                          samples, tokens, FLOPs, labels consumed, epochs over the pairs; written last);
                          eval.jsonl {step, set, i, gold, proxy, cond_acc, rule, kl, logp, length, entropy, response}
                          per checkpoint; pref.jsonl {step, k, chosen, rejected, implicit_margin, implicit_acc,
                          logprob_acc} at the last step; metrics.jsonl, train.log, recipe.yaml of the training run
    results.md, *.csv, *.png    the report's

(tests/bench_rundir.py: ``check_run_dir`` checks this layout key by key; ``make_run_dir`` writes one with known
numbers.)

* JSON is written with sorted keys, NaN / inf as null, and atomically (a temporary file renamed over the target),
  so an interrupted bench never leaves half a file; a JSON-lines file is rewritten only when its text changes
  (stable mtimes on re-runs).
* A bad line is an error that names the file and the line.
* ``content_key(kind, spec, known)`` is the sha256 of what makes a stage or a run: its kind, its recipe with every
  input path replaced by that input's identity (the key of the stage that made it, or the sha256 of a file's
  bytes; ``output_dir`` dropped) and the torch / transformers versions. Equal keys mean equal inputs, wherever the
  bench directory and its cache live.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from prefopt.errors import PrefoptError


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = None) -> str:
    """JSON with sorted keys and non-finite floats as null."""
    return json.dumps(_finite(value), sort_keys=True, ensure_ascii=False, indent=indent, default=str)


def _replace(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as indented JSON, atomically."""
    return _replace(path, dumps(value, indent=2) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PrefoptError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSON lines (atomically, and only when the text changed)."""
    text = "".join(dumps(row) + "\n" for row in rows)
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    return _replace(path, text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):  # not splitlines: U+2028
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PrefoptError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
    return rows


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def identity(path: str, known: dict[str, str]) -> str:
    """What a path stands for in a key: a stage key, the sha256 of a file / of a directory's files, or the name."""
    if path in known:
        return known[path]
    p = Path(path)
    if p.is_file():
        return "sha256:" + sha256_file(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        listing = "".join(f"{f.relative_to(p)}:{sha256_file(f)}\n" for f in files)
        return "dir:" + hashlib.sha256(listing.encode()).hexdigest()
    return path


def _normalise(value: Any, known: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, known) for k, v in sorted(value.items()) if k != "output_dir"}
    if isinstance(value, list):
        return [_normalise(v, known) for v in value]
    if isinstance(value, str) and (value in known or os.sep in value):
        return identity(value, known)
    return value


def content_key(kind: str, spec: dict[str, Any], known: dict[str, str]) -> str:
    """sha256 of ``kind``, ``spec`` with paths replaced by their identity, and the torch / transformers versions."""
    import torch
    import transformers

    payload = {"kind": kind, "spec": _normalise(spec, known),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    return hashlib.sha256(dumps(payload).encode()).hexdigest()
