"""The data layer: read rows, normalise them to one kind, split them by a stable hash, tokenize and batch.

``load_rows(cfg, kind)`` gives the canonical train / eval records of a kind (see prefopt.data.formats) with
the split manifest and the skipped-row counts; ``build_dataloader`` turns records into typed batches
(see prefopt.data.kinds and prefopt.data.collate).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prefopt.config import DataConfig
from prefopt.data.collate import build_dataloader, pack
from prefopt.data.formats import check_names, convert, parse_row
from prefopt.data.hh import split_hh
from prefopt.data.readers import SkipLog, SkipRow, read_rows, source_info, summarise
from prefopt.data.splits import assign, dedupe, manifest, record_id, write_manifest
from prefopt.errors import DataError

log = logging.getLogger("prefopt.data")

__all__ = ["LoadedData", "SkipRow", "assign", "build_dataloader", "load_rows", "manifest", "pack", "record_id",
           "split_hh", "write_manifest"]


@dataclass
class LoadedData:
    """Canonical records of one kind, split into train and eval (each in hash order)."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    manifest: dict[str, Any]
    skipped: dict[str, int] = field(default_factory=dict)

    def report(self) -> str:
        """``"kept 1991 rows (train 1790, eval 201); skipped 9: 5 chosen and rejected prompts differ (...)"``."""
        kept = f"kept {len(self.train) + len(self.eval)} rows (train {len(self.train)}, eval {len(self.eval)})"
        total = sum(self.skipped.values())
        if not total:
            return f"{kept}; skipped 0"
        return f"{kept}; skipped {total}: {summarise(self.manifest['skipped']['reasons'])}"


def load_rows(cfg: DataConfig, kind: str) -> LoadedData:
    """Read ``cfg.path``, keep the rows usable as ``kind``, split off ``cfg.eval_fraction`` by hash.

    Rows are split by the id of their source record (prefopt.data.splits), so all kinds made from one file
    share the split. Bad rows are skipped and counted with their reason; ``cfg.max_examples`` caps the train
    part (in hash order) after the split. DataError when no usable row is left.
    """
    check_names(cfg.format, kind)
    skips = SkipLog()
    groups = dedupe(_records(cfg, kind, skips), skips)
    sources = source_info(cfg)
    if kind == "text" and cfg.text_path:
        sources += source_info(dataclasses.replace(cfg, path=cfg.text_path))
    if not groups:
        names = ", ".join(str(s.get("path", s.get("hub"))) for s in sources)
        detail = f"skipped {skips.total}: {skips.summary()}" if skips.total else "no rows"
        raise DataError(f"no usable {kind} rows in {names} ({detail})")
    fractions = {"train": 1.0 - cfg.eval_fraction, "eval": cfg.eval_fraction}
    split = assign(groups, cfg.split_salt, fractions)
    if not split["train"]:
        raise DataError(f"all {len(split['eval'])} usable rows of {cfg.path} fell in the eval split; "
                        "lower data.eval_fraction")
    # one (row id, record) per record, in hash order; a row that gives two records lists its id twice
    members = {name: [(rid, record) for rid in ids for record in groups[rid]] for name, ids in split.items()}
    members["train"] = members["train"][:cfg.max_examples]
    parts = {name: [rid for rid, _ in items] for name, items in members.items()}
    pinned = manifest(parts, sources, skips, salt=cfg.split_salt, fractions=fractions)
    pinned.update(kind=kind, config=dataclasses.asdict(cfg))
    loaded = LoadedData(train=[r for _, r in members["train"]], eval=[r for _, r in members["eval"]],
                        manifest=pinned, skipped=dict(skips.counts))
    if skips.total:
        log.warning("%s: %s", cfg.path, loaded.report())
    return loaded


def _records(cfg: DataConfig, kind: str, skips: SkipLog) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(location, source row id, record)`` of every usable record; bad rows go to ``skips``.

    For the ``text`` kind, ``cfg.text_path`` (plain text, one document per line) is read after ``cfg.path``.
    """
    yield from _file_records(cfg, kind, skips)
    if kind == "text" and cfg.text_path:
        yield from _file_records(dataclasses.replace(cfg, path=cfg.text_path, format="auto"), kind, skips)


def _file_records(cfg: DataConfig, kind: str, skips: SkipLog) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for source, line_no, row in read_rows(cfg, skips):
        where = f"{source}:{line_no}"
        try:
            fmt, shape, parsed = parse_row(row, cfg.format)
            records = convert(parsed, shape, kind, fmt)
        except SkipRow as exc:
            skips.add(exc.reason, where)
            continue
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        row_id = record_id(parsed)
        for record in records:
            yield where, row_id, record

