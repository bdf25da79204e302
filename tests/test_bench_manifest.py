"""prefopt.bench.manifest: what a result depends on is written next to it (versions, commit, host with its load,
seeds of every kind, draws, the selection, the stages, the time of each phase)."""

from __future__ import annotations

from pathlib import Path

import torch

from prefopt.bench.manifest import manifest
from prefopt.bench.recipes import load_bench

WORLD_TINY = Path(__file__).resolve().parents[1] / "recipes" / "bench" / "world_tiny_test.yaml"


def test_the_manifest_pins_versions_host_seeds_and_choices():
    cfg = load_bench(WORLD_TINY)
    selection = {"ppo": {"chosen_learning_rate": 0.003}}
    out = manifest(cfg, {"salt": "s"}, [{"draw": 0, "seed": 1}], selection, [{"stage": "sft"}],
                   {"main": {"wall_s": 1.0, "cpu_s": 2.0}}, {"nope": "unknown algorithm"}, [0.5, 0.4, 0.3])
    assert out["versions"]["torch"] == torch.__version__ and out["versions"]["prefopt"]
    assert len(out["git"]["commit"] or "0" * 40) == 40
    assert out["host"]["workers"] == cfg.workers and out["host"]["threads"] == cfg.threads
    assert out["host"]["load_average_start"] == [0.5, 0.4, 0.3] and len(out["host"]["load_average_end"]) == 3
    assert out["seeds"] == {"main": [0], "train": [0, 1000], "select": [999]}
    assert (out["splits"], out["selection"]) == ({"salt": "s"}, selection)
    assert out["skipped_labels"] == {"nope": "unknown algorithm"}
    assert out["times"]["main"]["cpu_s"] == 2.0
