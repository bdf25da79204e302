"""The data layer: read rows, normalise them to one kind, split them by a stable hash, tokenize and batch.

``load_rows(cfg, kind)`` gives the canonical train / eval records of a kind (see prefopt.data.formats) with
the split manifest and the skipped-row counts; ``build_dataloader`` turns records into typed batches
(see prefopt.data.kinds and prefopt.data.collate); ``run_loaders`` does both for a run's train and eval data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prefopt.config import DataConfig, RunConfig
from prefopt.data.collate import build_dataloader, pack
from prefopt.data.formats import check_names, convert, detect_format, parse_row
from prefopt.data.hh import split_hh
from prefopt.data.readers import SkipLog, SkipRow, Source, open_sources, summarise
from prefopt.data.splits import assign, dedupe, manifest, record_id, write_manifest
from prefopt.errors import DataError

log = logging.getLogger("prefopt.data")

__all__ = ["LoadedData", "SkipRow", "assign", "build_dataloader", "load_rows", "manifest", "pack", "read_records",
           "record_id", "run_loaders", "split_hh", "write_manifest"]


@dataclass
class LoadedData:
    """Canonical records of one kind, split into train and eval (each in hash order)."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    manifest: dict[str, Any]
    skipped: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    """Source rows read per detected format (prefopt.data.formats), kept or not."""
    places: dict[str, list[str]] = field(default_factory=dict)
    """Per split, the place ("file:line", "source:row N") of the source row of each record."""

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
    formats: Counter[str] = Counter()
    plan = [(source, cfg.format) for source in open_sources(cfg)]
    if kind == "text" and cfg.text_path:  # plain text, one document per line, after the data
        plan += [(source, "auto") for source in open_sources(dataclasses.replace(cfg, path=cfg.text_path))]
    groups = dedupe(_records(plan, kind, skips, formats), skips)
    sources = [source for source, _ in plan]
    if not groups:
        names = ", ".join(source.label for source in sources)
        detail = f"skipped {skips.total}: {skips.summary()}" if skips.total else "no rows"
        raise DataError(f"no usable {kind} rows in {names} ({detail})")
    fractions = {"train": 1.0 - cfg.eval_fraction, "eval": cfg.eval_fraction}
    split = assign(groups, cfg.split_salt, fractions)
    if not split["train"]:
        raise DataError(f"all {len(split['eval'])} usable rows of {cfg.path} fell in the eval split; "
                        "lower data.eval_fraction")
    # one (row id, record) per record, in hash order; a row that gives two records lists its id twice
    members = {name: [(rid, item) for rid in ids for item in groups[rid]] for name, ids in split.items()}
    members["train"] = members["train"][:cfg.max_examples]
    parts = {name: [rid for rid, _ in items] for name, items in members.items()}
    pinned = manifest(parts, [source.info for source in sources], skips, salt=cfg.split_salt, fractions=fractions)
    pinned.update(kind=kind, config=dataclasses.asdict(cfg), formats=dict(formats))
    loaded = LoadedData(train=[record for _, (_, record) in members["train"]],
                        eval=[record for _, (_, record) in members["eval"]],
                        manifest=pinned, skipped=dict(skips.counts), formats=dict(formats),
                        places={name: [where for _, (where, _) in items] for name, items in members.items()})
    if skips.total:
        log.warning("%s: %s", cfg.path, loaded.report())
    return loaded


def read_records(cfg: DataConfig, kind: str) -> tuple[list[tuple[str, dict[str, Any]]], SkipLog]:
    """Every usable ``kind`` record of ``cfg.path`` with its place ("file:line"), in file order: no split and no
    dedupe (an evaluation set is read as it is written). Bad rows are counted in the returned SkipLog."""
    check_names(cfg.format, kind)
    skips = SkipLog()
    plan = [(source, cfg.format) for source in open_sources(cfg)]
    return [(where, record) for where, _, record in _records(plan, kind, skips, Counter())], skips


def _records(plan: list[tuple[Source, str]], kind: str, skips: SkipLog, formats: Counter[str]
             ) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(place, source row id, record)`` of every usable record of the ``(source, format)`` plan; bad rows go
    to ``skips``, detected formats are counted in ``formats``."""
    for source, fmt in plan:
        for where, row in source.rows(skips):
            try:
                found = detect_format(row) if fmt == "auto" else fmt
                formats[found] += 1
                found, shape, parsed = parse_row(row, found)
                records = convert(parsed, shape, kind, found)
            except SkipRow as exc:
                skips.add(exc.reason, where)
                continue
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
            row_id = record_id(parsed)
            for record in records:
                yield where, row_id, record


def run_loaders(run: RunConfig, kind: str, tokenizer: Any,
                drop_last: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``train`` loader of a run (shuffled, seeded) and its ``eval`` loader when it has eval rows, and the data
    report: the split manifests, the rows skipped while tokenizing and the row counts per split. ``drop_last``: every
    training batch is full, the rows left over leave each epoch (a different draw each epoch; the report counts them).

    Eval rows are ``run.eval_data``'s eval split (all its rows when it has none), else ``run.data``'s eval split.
    """
    loaded = _read(run.data, kind)
    eval_rows = loaded.eval
    manifests = {"train": loaded.manifest}
    if run.eval_data is not None:
        eval_loaded = _read(run.eval_data, kind)
        eval_rows = eval_loaded.eval or eval_loaded.train
        manifests["eval_data"] = eval_loaded.manifest
    t = run.train
    train_loader, train_skipped = _loader(run, loaded.train, kind, tokenizer, run.data.path, "train", t.batch_size,
                                          shuffle=True, length_bucketing=run.data.length_bucketing,
                                          drop_last=drop_last)
    loaders = {"train": train_loader}
    skipped = {"train": {**loaded.skipped, **train_skipped}}
    if eval_rows:
        eval_path = run.eval_data.path if run.eval_data is not None else run.data.path
        eval_loader, eval_skipped = _loader(run, eval_rows, kind, tokenizer, eval_path, "eval", t.eval_batch_size,
                                            shuffle=False, length_bucketing=False)
        loaders["eval"] = eval_loader
        skipped["eval"] = eval_skipped
    report = {"manifests": manifests, "tokenization_skipped": skipped,
              "rows": {"train": len(loaded.train), "eval": len(eval_rows)}}
    if drop_last:
        left_out = len(train_loader.dataset) % t.batch_size
        report["rows_left_out_per_epoch"] = left_out
        if left_out:
            log.info("data: %d training rows do not fill a batch of %d; each epoch leaves out %d (a different draw "
                     "each epoch)", len(train_loader.dataset), t.batch_size, left_out)
    log.info("data: %s", loaded.report())
    return loaders, report


def _loader(run: RunConfig, rows: list[dict[str, Any]], kind: str, tokenizer: Any, path: str, split: str,
            batch_size: int, shuffle: bool, length_bucketing: bool, drop_last: bool = False) -> tuple[Any, dict[str, int]]:
    try:
        return build_dataloader(rows, kind, tokenizer, run.data, batch_size, shuffle=shuffle, seed=run.train.seed,
                                length_bucketing=length_bucketing, drop_last=drop_last)
    except DataError as exc:  # name the file: the loader only sees records
        raise DataError(f"{path} ({split} rows): {exc}") from None


def _read(data_config: DataConfig, kind: str) -> LoadedData:
    """``load_rows``; a file the OS will not let us read is a DataError naming it (not an unexpected error)."""
    try:
        return load_rows(data_config, kind)
    except OSError as exc:
        raise DataError(f"{exc.filename or data_config.path}: cannot read it: {exc.strerror or exc}") from None
