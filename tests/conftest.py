"""Shared test fixtures: the data in ../shared/data and tiny models built from it once per session.

Nothing is downloaded: the tiny models are built by ``prefopt.tiny.init_model`` from HH-RLHF rows in a
session temp directory. Tests marked ``@pytest.mark.gpu`` are skipped when CUDA is not available.
"""

from __future__ import annotations

import gzip
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prefopt.tiny import init_model
from realistic import REALISTIC, build as build_realistic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
TINY_MODEL_TEXTS = 800  # the first 400 HH rows: a chosen and a rejected dialogue each


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory (../shared/data next to the project)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hh_path() -> Path:
    """2,000 HH-RLHF harmless-base test pairs (jsonl.gz with chosen/rejected dialogues)."""
    if not HH_TEST.is_file():
        pytest.skip(f"HH-RLHF data file {HH_TEST} is missing")
    return HH_TEST


@pytest.fixture(scope="session")
def hh_head(hh_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``hh_head(n)``: the first n HH pairs as a .jsonl file, written once per n (small data for end-to-end runs)."""
    files: dict[int, Path] = {}

    def head(n: int) -> Path:
        if n not in files:
            files[n] = tmp_path_factory.mktemp("hh-head") / f"hh{n}.jsonl"
            with gzip.open(hh_path, "rt", encoding="utf-8") as rows:
                files[n].write_text("".join(itertools.islice(rows, n)))
        return files[n]

    return head


@pytest.fixture(scope="session")
def hh_small(hh_head: Callable[[int], Path]) -> Path:
    """The first 48 HH pairs as plain JSON lines (with data.max_examples=16: 16 train rows, ~12 held out)."""
    return hh_head(48)


@pytest.fixture(scope="session")
def tiny_model_dir(hh_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A nano GPT-2 (vocab 512, random weights) with its BPE tokenizer, saved in the transformers layout."""
    out_dir = tmp_path_factory.mktemp("tiny-gpt2")
    return init_model(out_dir, [str(hh_path)], arch="gpt2", size="nano", vocab_size=512, seed=0,
                      max_texts=TINY_MODEL_TEXTS)


@pytest.fixture(scope="session")
def tiny_llama_dir(hh_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A nano Llama (vocab 512, random weights) with its BPE tokenizer, saved in the transformers layout."""
    out_dir = tmp_path_factory.mktemp("tiny-llama")
    return init_model(out_dir, [str(hh_path)], arch="llama", size="nano", vocab_size=512, seed=0,
                      max_texts=TINY_MODEL_TEXTS)


@pytest.fixture(scope="session")
def realistic_model_dirs(hh_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The realistic fixtures of ``tests/realistic.py`` by name, built once per session (a second or so each)."""
    root = tmp_path_factory.mktemp("realistic")
    return {name: build_realistic(name, root / name, [str(hh_path)], max_texts=TINY_MODEL_TEXTS)
            for name in REALISTIC}


@pytest.fixture(scope="session")
def gpt2_real_dir(realistic_model_dirs: dict[str, Path]) -> Path:
    """GPT-2 as it ships: dropout 0.1, tied head, pad = eos (see tests/realistic.py)."""
    return realistic_model_dirs["gpt2-real"]


@pytest.fixture(scope="session")
def llama_chat_dir(realistic_model_dirs: dict[str, Path]) -> Path:
    """Llama in bf16, untied head, Llama-3-style chat template, two EOS ids (see tests/realistic.py)."""
    return realistic_model_dirs["llama-chat"]


@pytest.fixture(scope="session")
def qwen2_window_dir(realistic_model_dirs: dict[str, Path]) -> Path:
    """Qwen2 with a 16-token sliding window on every layer and a ChatML template (see tests/realistic.py)."""
    return realistic_model_dirs["qwen2-window"]


OFFLINE_MODELS = ("tiny", "gpt2-real", "llama-chat")


@pytest.fixture(scope="module", params=OFFLINE_MODELS)
def offline_model(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(name, directory), once per model the offline algorithms' number tests run on: the kind nano GPT-2,
    ``gpt2-real`` (dropout, pad = eos) and ``llama-chat`` (bf16 weights: load it in float32 to compare at 1e-5)."""
    if request.param == "tiny":
        return request.param, request.getfixturevalue("tiny_model_dir")
    return request.param, request.getfixturevalue("realistic_model_dirs")[request.param]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they oversubscribe it.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
