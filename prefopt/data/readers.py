"""Read raw rows from data files, directories or the hub, and count the rows that are skipped.

This is the one reader: every row comes out as ``(where, row)``, ``where`` the row's place for skip reports
("file:line" or "source:row N"). What ``data.path`` may be:

* ``.jsonl`` / ``.json`` (plain or ``.gz``): read here, line by line, so that one malformed line is skipped and
  counted with its line number and every row keeps its own keys (datasets' json loader fails on the whole file
  for one bad line, and merges all rows into one schema: absent keys become null, mixed types fail); a ``.json``
  file that starts with ``[`` is a JSON list (``line`` is then the position in the list); ``.txt``: one document
  per line, read as ``{"text": line}``;
* ``.csv`` / ``.tsv``, ``.parquet``, ``.arrow``: opened by ``datasets.load_dataset(<builder>, data_files=...)``;
* a directory: ``Dataset.save_to_disk`` output (a Dataset, or a DatasetDict of which ``data.split`` is read)
  through ``datasets.load_from_disk``; the HH-RLHF layout ``<dir>/<subset>/<split>.jsonl.gz``; ``<dir>/<split>.jsonl``;
  otherwise a hub snapshot (``data/train-00000-of-00001.parquet``, ...) through ``datasets.load_dataset(dir)``;
* a hub dataset name such as ``Anthropic/hh-rlhf``: ``datasets.load_dataset(name, data_dir=subset, split=split)``
  per subset.

``data.subsets`` defaults to ``["harmless-base"]`` for HH-RLHF only (the hub name ``Anthropic/hh-rlhf`` or a
directory with a ``harmless-base`` folder); other data has no sub-directories unless asked. Rows of a datasets
table lose their null fields (a null column of a row is an absent field), so formats are detected alike.

A problem that makes a whole source unusable (missing, truncated gzip, bytes that are not UTF-8, not JSON at
all, a table datasets cannot open, a missing split) raises DataError naming it. A single bad line is skipped and
counted in a SkipLog.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.config import DataConfig
from prefopt.errors import DataError

Row = tuple[str, dict[str, Any]]
EXAMPLES_PER_REASON = 3
SPLIT_SUFFIXES = (".jsonl.gz", ".jsonl", ".json")
TABLE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".txt", *TABLE_BUILDERS)
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
HH_HUB, HH_SUBSETS = "Anthropic/hh-rlhf", ["harmless-base"]


class SkipRow(ValueError):
    """A row (or a tokenized feature) cannot be used: ``reason`` is counted and the run goes on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkipLog:
    """Counts skipped rows per reason and keeps the first few locations ("file:line") of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{reason: {"count": n, "examples": ["file:line", ...]}}``, most frequent reason first."""
        order = sorted(self.counts, key=lambda r: (-self.counts[r], r))
        return {r: {"count": self.counts[r], "examples": list(self.examples[r])} for r in order}

    def summary(self) -> str:
        return summarise(self.as_dict())


def summarise(reasons: dict[str, dict[str, Any]]) -> str:
    """``"12 invalid JSON (a.jsonl:3, a.jsonl:9, a.jsonl:10, ...), 2 empty response (a.jsonl:5, a.jsonl:7)"``."""
    parts = []
    for reason, entry in reasons.items():
        more = ", ..." if entry["count"] > len(entry["examples"]) else ""
        parts.append(f"{entry['count']} {reason} ({', '.join(entry['examples'])}{more})")
    return ", ".join(parts)


def is_hub_name(path: str) -> bool:
    """True when ``path`` is not on disk and looks like a hub dataset id ("owner/name")."""
    return (not Path(path).expanduser().exists() and HUB_NAME.match(path) is not None
            and not path.startswith(".") and not path.endswith(FILE_SUFFIXES))


@dataclass
class Source:
    """One thing rows are read from: a file read line by line here, or a table that ``load`` gets from datasets."""

    label: str
    """The file path, or "name[split]" for a hub or save_to_disk dataset; the prefix of every row's place."""
    info: dict[str, Any]
    """What the manifest records: path, sha256 and size of a file; hub name, subset and split."""
    path: Path | None = None
    load: Callable[[], Any] | None = None
    """Opens the datasets table (None: a JSON or text file read line by line)."""

    def rows(self, skips: SkipLog) -> Iterator[Row]:
        if self.load is None:
            yield from read_file(self.path, skips)
            return
        table = self.load()
        fingerprint = getattr(table, "_fingerprint", None)
        if fingerprint is not None:
            self.info["fingerprint"] = fingerprint
        for index, row in enumerate(table, 1):
            yield f"{self.label}:row {index}", {key: value for key, value in dict(row).items() if value is not None}


def open_sources(cfg: DataConfig) -> list[Source]:
    """The sources ``cfg.path`` stands for (see the module docstring); DataError when there is none."""
    if not cfg.path:
        raise DataError("data.path is empty: give a data file (.jsonl, .json, .csv, .parquet, .arrow, .txt), "
                        "a directory or a hub dataset name")
    if is_hub_name(cfg.path):
        subsets = cfg.subsets if cfg.subsets is not None else (HH_SUBSETS if cfg.path == HH_HUB else [])
        return [_hub_source(cfg.path, subset, cfg.split) for subset in subsets or [None]]
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [file_source(path)]
    if not path.is_dir():
        raise DataError(f"data file '{cfg.path}' not found")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return [_disk_source(path, cfg.split)]
    subsets = cfg.subsets if cfg.subsets is not None else (HH_SUBSETS if (path / HH_SUBSETS[0]).is_dir() else None)
    if subsets is None and not _split_file(path, cfg.split):
        return [_hub_source(str(path), None, cfg.split)]  # a hub snapshot, or any folder datasets can read
    files = []
    for subset in subsets or [""]:
        found = _split_file(path / subset, cfg.split)
        if found is None:
            raise DataError(f"data file '{path / subset / (cfg.split + SPLIT_SUFFIXES[0])}' not found (a data "
                            "directory is read as <dir>/<subset>/<split>.jsonl.gz with data.subsets and data.split)")
        files.append(file_source(found))
    return files


def file_source(path: Path) -> Source:
    """A local file: a table for datasets (csv, parquet, arrow) or lines read here (json, jsonl, txt)."""
    builder = TABLE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        return Source(str(path), file_info(path), path=path)
    extra = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}

    def load() -> Any:
        import datasets

        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **extra)
        except Exception as exc:  # datasets raises many types; the user needs the file and the reason
            raise DataError(f"{path}: datasets cannot read it as {builder}: {type(exc).__name__}: "
                            f"{_first_line(exc)}") from exc

    return Source(str(path), file_info(path), path=path, load=load)


def _hub_source(name: str, subset: str | None, split: str) -> Source:
    """A hub dataset (or a local hub snapshot folder), one ``load_dataset`` per subset (``data_dir=subset``)."""

    def load() -> Any:
        import datasets

        try:
            return datasets.load_dataset(name, data_dir=subset, split=split)
        except Exception as exc:  # the hub raises many types; the user needs the name and the reason
            where = ("is a directory that datasets cannot read" if Path(name).expanduser().is_dir()
                     else "is not a local file or directory, and loading it from the hub")
            raise DataError(f"data path {name!r} {where} (data_dir={subset!r}, split={split!r}) failed: "
                            f"{type(exc).__name__}: {_first_line(exc)}") from exc

    label = f"{name}/{subset}[{split}]" if subset else f"{name}[{split}]"
    key = "path" if Path(name).expanduser().is_dir() else "hub"
    return Source(label, {key: name, "subset": subset, "split": split}, load=load)


def _disk_source(path: Path, split: str) -> Source:
    """A ``save_to_disk`` folder: its Dataset, or the ``split`` of its DatasetDict."""

    def load() -> Any:
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path}: datasets.load_from_disk failed: {type(exc).__name__}: {_first_line(exc)}") \
                from exc
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: a DatasetDict without split {split!r}; its splits: "
                                f"{', '.join(loaded)} (set data.split)")
            return loaded[split]
        return loaded

    return Source(f"{path}[{split}]", {"path": str(path), "split": split, "layout": "save_to_disk"}, load=load)


def _split_file(directory: Path, split: str) -> Path | None:
    return next((c for c in (directory / f"{split}{s}" for s in SPLIT_SUFFIXES) if c.is_file()), None)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or ["(no message)"])[0][:300]


def read_rows(cfg: DataConfig, skips: SkipLog) -> Iterator[Row]:
    """Every row of the data ``cfg`` names, as ``(where, row)``; bad lines go to ``skips``."""
    for source in open_sources(cfg):
        yield from source.rows(skips)


def file_info(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def read_file(path: Path, skips: SkipLog) -> Iterator[Row]:
    """Rows of one local JSON / JSON lines / text file (see the module docstring)."""
    if path.name.endswith((".txt", ".txt.gz")):
        for line_no, text in read_lines(path):
            if text.strip():
                yield f"{path}:{line_no}", {"text": text.rstrip("\r\n")}
        return
    lines = read_lines(path)
    first = next(lines, None)
    if first is None:
        return
    if path.name.endswith((".json", ".json.gz")) and first[1].lstrip("\ufeff \t\r\n").startswith("["):
        yield from _json_list(path, first[1] + "".join(text for _, text in lines), skips)
    else:
        yield from _json_lines(path, itertools.chain([first], lines), skips)


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line_no, text)`` of a plain or gzip file; truncated gzip and non-UTF-8 bytes raise DataError."""
    line_no = 0
    try:
        with (gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")) as fh:
            for line_no, raw in enumerate(fh, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path} line {line_no}: not valid UTF-8 ({exc.reason} at byte {exc.start})") \
                        from None
                yield line_no, text.lstrip("\ufeff") if line_no == 1 else text
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt gzip after line {line_no} ({exc})") from exc


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line_no, value)`` of every non-blank line of a JSON lines file (plain or gzip) that must be whole: a line
    that is not JSON raises DataError naming ``path:line`` (user data files are read by ``read_file``, which skips)."""
    for line_no, text in read_lines(path):
        if not text.strip():
            continue
        try:
            yield line_no, json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON: {exc}") from exc


def _json_lines(path: Path, lines: Iterator[tuple[int, str]], skips: SkipLog) -> Iterator[Row]:
    kept = 0
    first_bad: tuple[int, str] | None = None
    for line_no, text in lines:
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            reason = "invalid JSON"
        except RecursionError:
            reason = "JSON nested too deeply"
        else:
            if isinstance(row, dict) and not _has_lone_surrogate(row):
                kept += 1
                yield f"{path}:{line_no}", row
                continue
            reason = "row is not a JSON object" if not isinstance(row, dict) else "lone surrogate escape (not text)"
        first_bad = first_bad or (line_no, text)
        skips.add(reason, f"{path}:{line_no}")
    if first_bad is not None and kept == 0:
        line_no, text = first_bad
        raise DataError(f"{path}: not a JSON lines file (line {line_no}: {text.strip()[:80]!r}); "
                        "no line holds a JSON object")


def _json_list(path: Path, text: str, skips: SkipLog) -> Iterator[Row]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    for position, row in enumerate(rows, 1):
        if isinstance(row, dict) and not _has_lone_surrogate(row):
            yield f"{path}:{position}", row
        else:
            reason = "row is not a JSON object" if not isinstance(row, dict) else "lone surrogate escape (not text)"
            skips.add(reason, f"{path}:{position}")


def _has_lone_surrogate(value: Any) -> bool:
    """A string holding an unpaired ``\\udXXX`` escape: valid JSON, but not text any tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _is_gzip(path: Path) -> bool:
    if path.suffix == ".gz":
        return True
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"
