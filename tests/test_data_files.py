"""Every file type through the one reader: jsonl (plain, .gz), JSON list, csv, parquet, arrow, save_to_disk
folders (Dataset and DatasetDict), hub snapshot folders and hub names, with exact row counts and every skipped
row counted with its place."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest

from prefopt.config import DataConfig
from prefopt.data import load_rows
from prefopt.errors import DataError

# 7 rows: 6 usable preference pairs and one with an empty chosen response (row 4)
ROWS = [{"prompt": f"Question {i}?", "chosen": f" Good answer {i}." if i != 4 else " ", "rejected": f" Bad {i}."}
        for i in range(1, 8)]


def load(path: Path | str, **extra):
    return load_rows(DataConfig(path=str(path), eval_fraction=0.0, **extra), "pairs")


def assert_six_pairs(loaded, place: str) -> None:
    assert len(loaded.train) == 6 and loaded.formats == {"pairs": 7}
    assert loaded.skipped == {"pairs: empty response": 1}
    assert loaded.manifest["skipped"]["reasons"]["pairs: empty response"]["examples"] == [place]
    assert {r["chosen"] for r in loaded.train} == {f" Good answer {i}." for i in (1, 2, 3, 5, 6, 7)}


def test_json_lines_plain_gz_and_list_count_bad_lines(tmp_path):
    lines = [json.dumps(row) for row in ROWS]
    (plain := tmp_path / "prefs.jsonl").write_text("\n".join(lines[:3] + ['{"prompt": "cut'] + lines[3:]) + "\n")
    loaded = load(plain)
    assert len(loaded.train) == 6 and loaded.skipped == {"invalid JSON": 1, "pairs: empty response": 1}
    assert loaded.manifest["skipped"]["reasons"]["invalid JSON"]["examples"] == [f"{plain}:4"]
    assert loaded.manifest["skipped"]["reasons"]["pairs: empty response"]["examples"] == [f"{plain}:5"]
    (packed := tmp_path / "prefs.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    assert_six_pairs(load(packed), f"{packed}:4")
    (listed := tmp_path / "prefs.json").write_text(json.dumps(ROWS, indent=1))
    assert_six_pairs(load(listed), f"{listed}:4")


def test_tables_csv_parquet_arrow(tmp_path):
    table = datasets.Dataset.from_list(ROWS)
    table.to_csv(str(csv := tmp_path / "prefs.csv"), index=False)
    assert_six_pairs(load(csv), f"{csv}:row 4")
    table.to_parquet(str(parquet := tmp_path / "prefs.parquet"))
    loaded = load(parquet)
    assert_six_pairs(loaded, f"{parquet}:row 4")
    (source,) = loaded.manifest["sources"]
    assert source["path"] == str(parquet) and len(source["sha256"]) == 64 and "fingerprint" in source
    table.save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    assert_six_pairs(load(arrow), f"{arrow}:row 4")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(one := tmp_path / "one"))
    assert_six_pairs(load(one), f"{one}[train]:row 4")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:5]),
                                   "test": datasets.Dataset.from_list(ROWS[5:])})
    splits.save_to_disk(str(both := tmp_path / "both"))
    assert len(load(both).train) == 4 and load(both).skipped == {"pairs: empty response": 1}
    assert len(load(both, split="test").train) == 2
    with pytest.raises(DataError, match=r"both: a DatasetDict without split 'validation'; its splits: train, test"):
        load(both, split="validation")


def test_hub_snapshot_folder(tmp_path):
    """A dataset as ``huggingface-cli download`` leaves it: data/<split>-00000-of-00001.parquet."""
    (data := tmp_path / "snapshot" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ROWS).to_parquet(str(data / "train_prefs-00000-of-00001.parquet"))
    datasets.Dataset.from_list(ROWS[:3]).to_parquet(str(data / "test_prefs-00000-of-00001.parquet"))
    snapshot = tmp_path / "snapshot"
    assert_six_pairs(load(snapshot, split="train_prefs"), f"{snapshot}[train_prefs]:row 4")
    assert len(load(snapshot, split="test_prefs").train) == 3
    with pytest.raises(DataError, match=r"snapshot' is a directory that datasets cannot read .*split='train'"):
        load(snapshot)


def test_hub_names_take_the_hh_subsets_default_only_for_hh(monkeypatch):
    calls = []

    def fake_load_dataset(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return ROWS

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs")]
    assert_six_pairs(loaded, "HuggingFaceH4/ultrafeedback_binarized[train_prefs]:row 4")
    calls.clear()
    load("Anthropic/hh-rlhf", format="pairs")
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "train")]
