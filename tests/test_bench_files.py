"""prefopt.bench.files: JSON lines round-trip (NaN as null, untouched when unchanged), a bad line names its file and
line, and a content key follows what a path holds, not where it is."""

from __future__ import annotations

import math

import pytest

from prefopt.bench.files import content_key, read_json, read_jsonl, write_json, write_jsonl
from prefopt.errors import PrefoptError


def test_jsonl_round_trip_writes_nan_as_null_and_only_when_changed(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"b": 1.5, "a": math.nan}, {"x": [math.inf, 2]}])
    assert path.read_text() == '{"a": null, "b": 1.5}\n{"x": [null, 2]}\n'
    assert read_jsonl(path) == [{"a": None, "b": 1.5}, {"x": [None, 2]}]
    before = path.stat().st_mtime_ns
    write_jsonl(path, [{"a": math.nan, "b": 1.5}, {"x": [math.inf, 2]}])
    assert path.stat().st_mtime_ns == before
    write_json(tmp_path / "one.json", {"z": 1, "a": math.nan})
    assert read_json(tmp_path / "one.json") == {"a": None, "z": 1}
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary file is left


def test_a_bad_line_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(PrefoptError, match=r"rows\.jsonl: line 3: not valid JSON"):
        read_jsonl(path)


def test_content_keys_follow_contents_and_stage_keys_not_paths(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "elsewhere" / "b.jsonl"
    a.write_text("same\n")
    b.parent.mkdir()
    b.write_text("same\n")
    spec = {"data": {"path": str(a)}, "train": {"output_dir": str(tmp_path / "x"), "seed": 1}}
    moved = {"data": {"path": str(b)}, "train": {"output_dir": str(tmp_path / "y"), "seed": 1}}
    assert content_key("run", spec, {}) == content_key("run", moved, {})  # same bytes, output_dir ignored
    b.write_text("other\n")
    assert content_key("run", spec, {}) != content_key("run", moved, {})
    known = {str(tmp_path / "stage" / "model"): "stage:abc"}  # a stage's output by its key (not built yet)
    by_key = content_key("run", {"m": "stage:abc"}, {})
    assert content_key("run", {"m": str(tmp_path / "stage" / "model")}, known) == by_key
    assert content_key("run", spec, {}) != content_key("stage", spec, {})


def test_jsonl_rows_keep_unicode_line_separators(tmp_path):
    """A sampled reply may hold U+2028 or U+0085 (written raw); the bench's reader and the report's split rows on "\\n"
    only, so such a row reads back whole (str.splitlines broke it mid-row)."""
    from prefopt.bench.report.reading import RunDir

    rows = [{"response": "a\u2028b\x85c\u2029d"}, {"response": "plain"}]
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    assert read_jsonl(path) == rows
    data = RunDir(tmp_path)
    assert data.jsonl(path) == rows and data.problems == []
