"""Stable row ids, pinned splits by content hash, and the split manifest written next to every result.

* ``record_id``: sha1 of the canonical record's JSON (sorted keys), 16 hex characters; identical records get
  the same id, so ``dedupe`` drops repeats (counted as "duplicate row"). prefopt.data.load_rows splits by
  the id of each SOURCE row's record (the pair of an HH row), so every kind made from one file splits alike:
  the eval prompts are the prompts of the eval pairs.
* ``assign``: each id goes to a part by ``sha256(salt + id)`` read as a number in [0, 1) and the cumulative
  fractions of the parts; the members of a part are listed in that hash order. The same ids and salt always
  give the same parts, whatever the order of the file; another salt draws another split.
* ``manifest``: per part the count and the sha256 of its sorted member ids, the salt and fractions, the source
  files with their sha256 and size, and the skipped rows per reason with example locations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefopt.data.readers import SkipLog


def record_id(record: dict[str, Any]) -> str:
    """16 hex characters of the sha1 of the record's JSON with sorted keys."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def dedupe(items: Iterable[tuple[str, str, dict[str, Any]]], skips: SkipLog
           ) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Group ``(location, row_id, record)`` items by row id as ``(location, record)``, in first-seen order,
    dropping every record identical to one seen before (counted in ``skips`` as "duplicate row")."""
    seen: set[str] = set()
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for where, row_id, record in items:
        rid = record_id(record)
        if rid in seen:
            skips.add("duplicate row", where)
            continue
        seen.add(rid)
        out.setdefault(row_id, []).append((where, record))
    return out


def hash_position(salt: str, rid: str) -> float:
    """``sha256(salt + id)`` as a number in [0, 1)."""
    return int(hashlib.sha256(f"{salt}{rid}".encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def assign(ids: Iterable[str], salt: str, fractions: dict[str, float]) -> dict[str, list[str]]:
    """Split ids into named parts by hash; each part lists its ids in hash order.

    ``fractions`` maps part name to its share (each >= 0, summing to 1), e.g.
    ``{"policy_train": 0.4, "rm_train": 0.3, "gold_train": 0.2, "eval": 0.1}``.
    """
    if not fractions or any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    bounds, total = [], 0.0
    for name, fraction in fractions.items():
        total += fraction
        bounds.append((total, name))
    parts: dict[str, list[tuple[float, str]]] = {name: [] for name in fractions}
    last = next(name for name, fraction in reversed(fractions.items()) if fraction > 0)
    for rid in ids:
        position = hash_position(salt, rid)
        name = next((name for bound, name in bounds if position < bound), last)
        parts[name].append((position, rid))
    return {name: [rid for _, rid in sorted(members)] for name, members in parts.items()}


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 of the sorted ids joined by newlines."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def manifest(parts: dict[str, list[str]], source_info: list[dict[str, Any]], skipped: SkipLog, *,
             salt: str, fractions: dict[str, float]) -> dict[str, Any]:
    """What pins a split: per part the count and the sha256 of the sorted member ids (one id per record, so an
    id repeats when a row gives two records), the salt, fractions, sources and skipped rows."""
    return {
        "parts": {name: {"count": len(ids), "ids_sha256": ids_digest(ids)} for name, ids in parts.items()},
        "salt": salt,
        "fractions": dict(fractions),
        "sources": source_info,
        "skipped": {"total": skipped.total, "reasons": skipped.as_dict()},
    }


def write_manifest(path: str | Path, data: dict[str, Any]) -> None:
    """Write a manifest as JSON (indent 2), creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
