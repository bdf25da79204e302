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

from prefopt.config import DataConfig, DataSource, RunConfig
from prefopt.data.chat import install_template
from prefopt.data.collate import build_dataloader, pack
from prefopt.data.formats import check_names, convert, detect_format, parse_row
from prefopt.data.hh import split_hh
from prefopt.data.readers import SkipLog, SkipRow, Source, open_sources, summarise
from prefopt.data.splits import assign, dedupe, manifest, record_id, write_manifest
from prefopt.errors import DataError

log = logging.getLogger("prefopt.data")

__all__ = ["LoadedData", "SkipRow", "assign", "build_dataloader", "load_rows", "manifest", "pack", "read_records",
           "record_id", "run_loaders", "run_tokenizer", "split_hh", "write_manifest"]


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
    skips = SkipLog()
    formats: Counter[str] = Counter()
    plan = _plan(cfg, kind)
    if kind == "text" and cfg.text_path:  # plain text, one document per line, after the data
        text = dataclasses.replace(cfg, path=cfg.text_path, sources=[])
        plan += [(source, DataSource(cfg.text_path)) for source in open_sources(text)]
    origin: dict[str, tuple[int, float]] = {}  # the place of each row -> (its source, the source's weight)
    groups = dedupe(_records(plan, kind, skips, formats, origin), skips)
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
    members["train"] = weighted(members["train"], origin)[:cfg.max_examples]
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
    """Every usable ``kind`` record of ``cfg.path`` (or ``cfg.sources``) with its place ("file:line"), in file order:
    no split, no dedupe and no weights (an evaluation set is read as it is written). Bad rows are counted in the
    returned SkipLog."""
    skips = SkipLog()
    return [(where, record) for where, _, record in _records(_plan(cfg, kind), kind, skips, Counter(), {})], skips


def _plan(cfg: DataConfig, kind: str) -> list[tuple[Source, DataSource]]:
    """The sources ``cfg`` reads, each with its spec (``data.sources``, or ``data.path`` as one source of weight 1)."""
    plan: list[tuple[Source, DataSource]] = []
    for given in cfg.sources or [None]:
        check_names(cfg.format if given is None else given.format, kind)
        one = cfg if given is None else dataclasses.replace(cfg, path=given.path, split=given.split,
                                                            subsets=given.subsets, sources=[])
        sources = open_sources(one)  # an empty data.path is an error naming data.path
        spec = given or DataSource(cfg.path, 1.0, cfg.format, cfg.split, cfg.subsets, cfg.columns)
        for source in sources:
            source.info.update({"weight": spec.weight, "columns": spec.columns} if cfg.sources else {})
            plan.append((source, spec))
    return plan


def weighted(members: list[tuple[str, tuple[str, Any]]], origin: dict[str, tuple[int, float]]
             ) -> list[tuple[str, tuple[str, Any]]]:
    """The training members with each source's rows taken ``weight`` times (``DataSource.weight``): whole copies, then
    the first rows (in hash order) for the fraction. Sources of weight 1 are as they were."""
    if all(weight == 1.0 for _, weight in origin.values()):
        return members
    by_source: dict[tuple[int, float], list[tuple[str, tuple[str, Any]]]] = {}
    for member in members:
        by_source.setdefault(origin[member[1][0]], []).append(member)
    out = []
    for (_, weight), items in by_source.items():
        count = round(weight * len(items))
        out += items * (count // len(items)) + items[:count % len(items)]
    return out


def _records(plan: list[tuple[Source, DataSource]], kind: str, skips: SkipLog, formats: Counter[str],
             origin: dict[str, tuple[int, float]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(place, source row id, record)`` of every usable record of the ``(source, spec)`` plan, its columns renamed
    by the spec's column map; bad rows go to ``skips``, detected formats are counted in ``formats``, the weight of each
    place's source goes to ``origin``."""
    for index, (source, spec) in enumerate(plan):
        fmt = spec.format
        for where, row in source.rows(skips):
            origin[where] = (index, spec.weight)
            if spec.columns:
                row = {spec.columns.get(key, key): value for key, value in row.items()}
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


def run_tokenizer(run: RunConfig) -> Any:
    """The tokenizer of a run (prefopt.models.load_tokenizer) with the chat template ``data.chat_template`` names
    installed, so that what the run saves renders chat as the run trained on it."""
    from prefopt.models import load_tokenizer

    tokenizer = load_tokenizer(run.model)
    install_template(tokenizer, run.data.chat_template)
    return tokenizer


def run_loaders(run: RunConfig, kind: str, tokenizer: Any, drop_last: bool = False,
                processes: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``train`` loader of a run (shuffled, seeded) and its ``eval`` loader when it has eval rows, and the data
    report: the split manifests, the rows skipped while tokenizing and the row counts per split. ``drop_last``: every
    training batch is full, the rows left over leave each epoch (a different draw each epoch; the report counts them,
    with the last round of fewer batches than ``processes`` that accelerate then leaves out too).

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
              "rows": {"train": len(loaded.train), "eval": len(eval_rows)},
              "sequences": {name: len(loader.dataset) for name, loader in loaders.items()},
              "packed": kind == "text" or (kind == "sft" and run.data.packing)}  # a batch is packed sequences
    if drop_last:
        left_out = len(train_loader.dataset) - len(train_loader) // processes * processes * t.batch_size
        report["rows_left_out_per_epoch"] = left_out
        if left_out:
            log.info("data: %d training rows do not fill batches of %d on %d process(es); each epoch leaves out %d "
                     "(a different draw each epoch)", len(train_loader.dataset), t.batch_size, processes, left_out)
    log.info("data: %s", loaded.report())
    return loaders, report


def _loader(run: RunConfig, rows: list[dict[str, Any]], kind: str, tokenizer: Any, path: str, split: str,
            batch_size: int, shuffle: bool, length_bucketing: bool, drop_last: bool = False) -> tuple[Any, dict[str, int]]:
    try:
        return build_dataloader(rows, kind, tokenizer, run.data, batch_size, shuffle=shuffle, seed=run.train.seed,
                                length_bucketing=length_bucketing, drop_last=drop_last, split=split)
    except DataError as exc:  # name the file: the loader only sees records
        raise DataError(f"{path} ({split} rows): {exc}") from None


def _read(data_config: DataConfig, kind: str) -> LoadedData:
    """``load_rows``; a file the OS will not let us read is a DataError naming it (not an unexpected error)."""
    try:
        return load_rows(data_config, kind)
    except OSError as exc:
        raise DataError(f"{exc.filename or data_config.path}: cannot read it: {exc.strerror or exc}") from None
