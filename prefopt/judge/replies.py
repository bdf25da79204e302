"""The replies file of ``prefopt generate``: JSON lines, one reply per line, and the manifest beside it.

A line holds ``model`` (its name), ``prompt_index`` (its prompt's position in the prompt set), ``sample`` (j),
``seed`` (the seed of its draw), ``prompt`` (as the prompts file gave it: a string or chat messages), ``meta``
(the prompt row's other fields, which reward functions receive), ``response`` (the text, special tokens dropped),
``response_ids`` (the sampled tokens, EOS included), ``length`` and ``ended``. ``<stem>.manifest.json`` records
the models (name -> path), the prompts source, the generation settings, the seed, the batch size and the versions.

``prefopt eval --replies`` judges such a file: ``rebuilt_draws`` turns its lines back into the rollouts they were
sampled as (the prompts rendered again by the data layer, the saved response tokens), so a judge, the KL and the
length see exactly the replies that were drawn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from prefopt.data.collate import pad
from prefopt.data.readers import read_json_lines
from prefopt.errors import DataError
from prefopt.judge.sampling import Draw
from prefopt.types import PromptBatch, Rollout

FIELDS = {"model": str, "prompt_index": int, "sample": int, "seed": int, "response": str, "response_ids": list,
          "ended": bool}


def manifest_path(path: str | Path) -> Path:
    """``replies.jsonl`` -> ``replies.manifest.json``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".manifest.json")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` whole or not at all (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_replies(path: str | Path, rows: list[dict[str, Any]], manifest: dict[str, Any]) -> Path:
    """The replies and their manifest (the manifest last: a file with a manifest is complete)."""
    path = Path(path)
    manifest_path(path).unlink(missing_ok=True)
    write_text(path, jsonl(rows))
    write_text(manifest_path(path), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return path


def read_replies(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and manifest of a replies file; a line without a field of ``FIELDS`` (or of another type), a line that
    is not JSON, or a missing manifest is a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"replies file '{path}' not found")
    if not manifest_path(path).is_file():
        raise DataError(f"{path}: its manifest {manifest_path(path).name} is missing (write replies with "
                        "`prefopt generate`; a file without its manifest may be incomplete)")
    rows = []
    for line_no, row in read_json_lines(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: not a JSON object")
        for key, kind in FIELDS.items():
            if not isinstance(row.get(key), kind) or (kind is int and isinstance(row[key], bool)):
                raise DataError(f"{path}:{line_no}: field {key!r} is missing or not a {kind.__name__} "
                                "(not a `prefopt generate` replies file?)")
        if "prompt" not in row:
            raise DataError(f"{path}:{line_no}: field 'prompt' is missing")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no replies in it")
    manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    return rows, manifest


def prompt_records(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The prompt set the replies answer: ``{prompt, meta}`` by ``prompt_index`` 0..N-1, the same for every model."""
    records: dict[int, dict[str, Any]] = {}
    for row in rows:
        record = {"prompt": row["prompt"], "meta": row.get("meta", {})}
        seen = records.setdefault(row["prompt_index"], record)
        if seen != record:
            raise DataError(f"{where}: prompt {row['prompt_index']} differs between replies (model "
                            f"{row['model']!r}, sample {row['sample']}): not one prompt set")
    if sorted(records) != list(range(len(records))):
        raise DataError(f"{where}: prompt indices are not 0..{len(records) - 1}")
    return [records[i] for i in range(len(records))]


def rebuilt_draws(rows: list[dict[str, Any]], batches: list[PromptBatch], pad_token_id: int) -> Iterator[Draw]:
    """One model's replies as the rollouts they were sampled as: for each batch of the prompt set (in order) and each
    sample j, the prompt ids rendered again and the saved response tokens, right-padded."""
    by_place = {(r["prompt_index"], r["sample"]): r for r in rows}
    samples = sorted({r["sample"] for r in rows})
    first = 0
    for b, batch in enumerate(batches):
        size = batch.input_ids.shape[0]
        for j in samples:
            chosen = [by_place.get((first + i, j)) for i in range(size)]
            if any(r is None for r in chosen):
                i = next(i for i, r in enumerate(chosen) if r is None)
                raise DataError(f"model {rows[0]['model']!r} has no reply to prompt {first + i} sample {j}")
            yield Draw(b, j, chosen[0]["seed"], first, rollout_of(batch, chosen, pad_token_id))
        first += size


def rollout_of(batch: PromptBatch, rows: list[dict[str, Any]], pad_token_id: int) -> Rollout:
    """A Rollout of one reply per prompt of ``batch`` (no behaviour log-probs: zeros)."""
    ids = pad([r["response_ids"] for r in rows], pad_token_id)
    mask = pad([[1] * len(r["response_ids"]) for r in rows], 0)
    return Rollout(prompt_ids=batch.input_ids, prompt_mask=batch.attention_mask, response_ids=ids,
                   response_mask=mask, logprobs=torch.zeros(ids.shape), ended=torch.tensor([r["ended"] for r in rows]),
                   prompts=list(batch.prompts), responses=[r["response"] for r in rows], meta=list(batch.meta),
                   raw_prompts=list(batch.raw_prompts), group=torch.arange(len(rows)))
