"""Read raw rows from data files, HH-style directories or the hub, and count the rows that are skipped.

Every row comes out as ``(source, line_no, row)``. Supported inputs:

* ``.jsonl`` / ``.jsonl.gz``: one JSON object per line;
* ``.json``: a JSON list of objects (``line_no`` is then the position in the list); a ``.json`` file that
  does not start with ``[`` is read as JSON lines;
* ``.txt``: one document per line, read as ``{"text": line}``;
* a directory in the HH-RLHF layout ``<dir>/<subset>/<split>.jsonl.gz`` (subsets and split from DataConfig);
* a hub dataset name such as ``Anthropic/hh-rlhf`` (``datasets.load_dataset(name, data_dir=subset,
  split=split)`` per subset; set ``data.subsets: []`` for a dataset without sub-directories).

A problem that makes a whole file unusable (missing, truncated gzip, bytes that are not UTF-8, not JSON at
all) raises DataError naming the file and line. A single bad line is skipped and counted in a SkipLog.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefopt.config import DataConfig
from prefopt.errors import DataError

Row = tuple[str, int, dict[str, Any]]
EXAMPLES_PER_REASON = 3
SPLIT_SUFFIXES = (".jsonl.gz", ".jsonl", ".json")
FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".txt")
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


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


def data_files(cfg: DataConfig) -> list[Path]:
    """The local files ``cfg.path`` stands for: the file itself, or ``<dir>/<subset>/<split>.jsonl.gz``."""
    if not cfg.path:
        raise DataError("data.path is empty: give a .jsonl/.jsonl.gz/.json file, an HH-style directory "
                        "or a hub dataset name")
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"data file '{cfg.path}' not found")
    files = []
    for subset in cfg.subsets or [""]:
        candidates = [path / subset / f"{cfg.split}{suffix}" for suffix in SPLIT_SUFFIXES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"data file '{candidates[0]}' not found (a data directory is read as "
                            "<dir>/<subset>/<split>.jsonl.gz with data.subsets and data.split)")
        files.append(found)
    return files


def read_rows(cfg: DataConfig, skips: SkipLog) -> Iterator[Row]:
    """Every row of the data ``cfg`` names, as ``(source, line_no, row)``; bad lines go to ``skips``."""
    if is_hub_name(cfg.path):
        yield from read_hub(cfg.path, cfg.subsets, cfg.split)
        return
    for path in data_files(cfg):
        yield from read_file(path, skips)


def source_info(cfg: DataConfig) -> list[dict[str, Any]]:
    """What the rows were read from: each file's path, sha256 and size, or the hub name, subsets and split."""
    if is_hub_name(cfg.path):
        return [{"hub": cfg.path, "subset": subset, "split": cfg.split} for subset in cfg.subsets or [None]]
    return [file_info(path) for path in data_files(cfg)]


def file_info(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def read_file(path: Path, skips: SkipLog) -> Iterator[Row]:
    """Rows of one local file (see the module docstring for the formats)."""
    if path.name.endswith((".txt", ".txt.gz")):
        for line_no, text in read_lines(path):
            if text.strip():
                yield str(path), line_no, {"text": text.rstrip("\r\n")}
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


def read_hub(name: str, subsets: list[str], split: str) -> Iterator[Row]:
    """Rows of a hub dataset, one ``load_dataset`` per subset (``data_dir=subset``)."""
    import datasets

    for subset in subsets or [None]:
        try:
            dataset = datasets.load_dataset(name, data_dir=subset, split=split)
        except Exception as exc:  # the hub raises many types; the user needs the name and the reason
            raise DataError(f"data path {name!r} is not a local file or directory, and loading it from the hub "
                            f"(data_dir={subset!r}, split={split!r}) failed: {type(exc).__name__}: {exc}") from exc
        source = f"{name}/{subset}:{split}" if subset else f"{name}:{split}"
        for line_no, row in enumerate(dataset, 1):
            yield source, line_no, dict(row)


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
                yield str(path), line_no, row
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
            yield str(path), position, row
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
