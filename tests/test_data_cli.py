"""``prefopt data`` (the data preview, no training) and the tokenizer check: a model folder without usable
tokenizer files exits 2 naming what is missing, instead of training on empty token lists."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefopt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def prefopt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "prefopt.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def run_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """``prefopt.cli.main`` in this process (seconds faster than a new one): its exit code and output."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def recipe(tmp_path: Path, algorithm: str, model: Path, data: Path, **extra) -> Path:
    path = tmp_path / f"{algorithm}.yaml"
    path.write_text(yaml.safe_dump({"algorithm": {"name": algorithm}, "model": {"name_or_path": str(model)},
                                    "data": {"path": str(data), "eval_fraction": 0.25, **extra},
                                    "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2,
                                              "batch_size": 2, "progress": False}}))
    return path


@pytest.fixture
def ufb_file(tmp_path: Path) -> Path:
    rows = []
    for i, (question, good, bad) in enumerate([("Name a prime.", "Seven.", "Eight."), ("Say hi.", "Hi!", "No."),
                                               ("Capital of Peru?", "Lima.", "Quito."), ("2+2?", "4", "5"),
                                               ("Sky color?", "Blue.", "Green.")]):
        turn = [{"role": "user", "content": question}]
        rows.append({"prompt": question, "chosen": turn + [{"role": "assistant", "content": good}],
                     "rejected": turn + [{"role": "assistant", "content": bad}],
                     "score_chosen": 8.0 + i, "score_rejected": 8.0 if i else 8.0})
    path = tmp_path / "ufb.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"prompt": "cut\n')
    return path


def test_data_preview_shows_format_counts_skips_and_marked_tokens(qwen2_window_dir, ufb_file, tmp_path, capsys):
    result = run_cli(capsys, "data", str(recipe(tmp_path, "dpo", qwen2_window_dir, ufb_file)))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "detected format: ultrafeedback (5 rows)" in out
    assert "rendering: chat messages with the tokenizer's chat template" in out
    assert f"skipped: 1 invalid JSON ({ufb_file}:6)" in out
    train = out.split("[train]")[1].split("[eval]")[0]
    assert "chosen:" in train and "rejected:" in train
    # the prompt ends at the generation prompt; the response tokens carry the loss
    assert "<|im_start|>assistant\\n┃⟦" in train and "<|im_end|>\\n⟧" in train
    assert "loss tokens: " in train and "'<|im_end|>'" in train
    ranks = run_cli(capsys, "data", str(recipe(tmp_path, "reward", qwen2_window_dir, ufb_file)))
    assert ranks.returncode == 0, ranks.stderr
    assert f"skipped: 1 ultrafeedback: all scores tied ({ufb_file}:1)" in ranks.stdout
    assert "ranked pairs: 1 > 2 (margin " in ranks.stdout


def test_data_preview_exits_2_on_a_data_error(qwen2_window_dir, tmp_path, capsys):
    (bad := tmp_path / "bad.jsonl").write_text('{"text": "only text"}\n')
    result = run_cli(capsys, "data", str(recipe(tmp_path, "dpo", qwen2_window_dir, bad)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "format 'text' (text rows) cannot be converted to kind 'pairs'" in result.stderr


@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",)], ids=["no-files", "config-only"])
def test_model_folder_without_a_usable_tokenizer_exits_2(qwen2_window_dir, ufb_file, tmp_path, keep, capsys):
    """Before: 150 steps on empty token lists (log-probs 0, gradient norm 0) and exit 0."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json", *keep):
        shutil.copy(qwen2_window_dir / name, model / name)
    path = str(recipe(tmp_path, "sft", model, ufb_file))
    train = prefopt("train", path, cwd=ROOT) if not keep else run_cli(capsys, "train", path)  # one real process
    for result in (run_cli(capsys, "data", path), train):
        assert result.returncode == 2, (result.args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        expected = "has no tokenizer files (none of tokenizer.json" if not keep else "to no tokens"
        assert expected in result.stderr and str(model) in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
