"""prefopt.bench.plan: checkpoints are log-spaced and dense early; every run gets the bench's start, its draw's files
and reward (the proxy, or the true reward for an oracle; never the gold RM), its seed (s + 1000 d), offline runs one
epoch or more over ALL their labelled rows, and every run its own key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prefopt.bench.plan import Planner, checkpoint_steps, plan_labels
from prefopt.bench.recipes import load_bench
from prefopt.bench.stages import Draw, Start

REPO = Path(__file__).resolve().parents[1]
WORLD_TINY = REPO / "recipes" / "bench" / "world_tiny_test.yaml"


def test_checkpoints_are_log_spaced_dense_early_and_end_at_the_last_step():
    assert checkpoint_steps(24, 8) == [1, 2, 3, 5, 7, 11, 16, 24]  # round(24 ** (k / 8)), k = 0..8
    assert checkpoint_steps(5, 8) == [1, 2, 3, 4, 5]
    steps = checkpoint_steps(300, 8)
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert len(steps) >= 8 and steps[0] == 1 and steps[-1] == 300 and gaps == sorted(gaps)


def _lines(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"row": i}) + "\n" for i in range(n)))
    return path


@pytest.fixture
def start(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text(json.dumps({"n_layer": 2}))
    draws = []
    for d in range(2):
        files = {kind: _lines(tmp_path / f"d{d}.{kind}.jsonl", rows) for kind, rows in
                 (("prompts", 50), ("pairs", 100 + d), ("unpaired", 60), ("ranks", 40))}
        draws.append(Draw(d, d + 1, proxy_rm=tmp_path / f"proxy{d}", train_files=files, proxy_data=files["ranks"]))
    return Start(shared=[], policy=tmp_path / "sft", draws=draws)


def test_runs_get_the_draws_files_the_right_reward_and_the_offline_budget(tmp_path, start):
    from prefopt.algorithms.dpo import DPO
    from prefopt.registry import ALGORITHMS, register_algorithm

    if "bench_plugin_test" not in ALGORITHMS:  # an algorithm registered after the bench was written
        @register_algorithm("bench_plugin_test")
        class Plugin(DPO):
            """A plugin: DPO under another name, its knob declared."""

            kl_knob = "beta"

    cfg = load_bench(WORLD_TINY, ["algorithms.nope={}", "algorithms.a2c={algorithm: {trainable_layers: 2}}",
                                  "algorithms.plugin={algorithm: {name: bench_plugin_test}}",
                                  "algorithms.kto={train: {batch_size: 16}}", "budget.epochs=1.5",
                                  "frontier.knob_values={plugin: [0.7]}", "seeds=[0, 1]"])
    labels, skipped = plan_labels(cfg, start.policy)
    assert "unknown algorithm 'nope'" in skipped["nope"]
    by_name = {label.label: label for label in labels}
    assert [label.label for label in labels] == ["ppo", "ppo_true", "dpo", "a2c", "plugin", "kto"]
    assert (by_name["ppo_true"].reward, by_name["ppo_true"].oracle_of) == ("true", "ppo")
    assert by_name["ppo"].reward == "proxy"
    assert by_name["a2c"].policy_class == "top 2 of 2 blocks + head (embeddings frozen)"
    assert by_name["dpo"].policy_class == "full" and by_name["kto"].reward == "labels"
    planner = Planner(cfg, start, tmp_path / "bench", {0: 4.5, 1: 6.0})
    runs = [run for label in labels for run in planner.main_runs(label, 0.01, label.values)]
    assert len({run.key for run in runs}) == len({run.id for run in runs}) == len(runs)
    assert {(run.draw, run.seed) for run in runs} == {(0, 0), (0, 1), (1, 1000), (1, 1001)}
    for run in runs:
        recipe, the_draw = run.recipe, start.draws[run.draw]
        assert recipe["model"]["name_or_path"] == str(start.policy) and recipe["train"]["seed"] == run.seed
        assert recipe["train"]["learning_rate"] == 0.01 and recipe["train"]["output_dir"].endswith(run.id)
        assert recipe["data"]["path"] == str(the_draw.train_files[run.kind])
        assert run.value is None or recipe["algorithm"][run.knob] == run.value
        rewards = recipe["algorithm"].get("rewards")
        if run.label == "ppo":
            assert rewards[0]["params"]["path"] == str(the_draw.proxy_rm) and run.labels == 40
        if run.label == "ppo_true":
            assert rewards[0]["name"] == "world_gold" and run.phase == "oracle" and run.labels == 0
            assert rewards[0]["weight"] == {0: 4.5, 1: 6.0}[run.draw]  # the true reward in the proxy's units
        if run.kind in ("pairs", "unpaired"):
            rows = 100 + run.draw if run.kind == "pairs" else 60
            batch = recipe["train"]["batch_size"]
            assert run.max_steps == math.ceil(1.5 * rows / batch) and run.train_rows == run.labels == rows
        assert run.checkpoints == checkpoint_steps(run.max_steps, cfg.frontier.checkpoints)
    select = planner.select_runs(by_name["dpo"], [(0.003, 0.5)])
    assert [(r.id, r.phase, r.seed, r.eval_set, r.checkpoints) for r in select] == [
        ("select/dpo/lr=0.003/beta=0.5/seed999", "select", 999, "val", [select[0].max_steps])]
    probe = planner.probe(runs[0], by_name["ppo"])
    assert probe.id == "probe/ppo" and probe.max_steps == 4 and probe.checkpoints == [] and probe.eval_set is None


def test_the_gold_rm_never_reaches_training(tmp_path, start):
    from prefopt.errors import ConfigError

    start.gold_rm = tmp_path / "gold"
    cfg = load_bench(WORLD_TINY, [f"algorithms.ppo.algorithm.rewards=[{{name: reward_model, params: {{path: "
                                  f"{tmp_path / 'gold'}}}}}]"])
    labels, _ = plan_labels(cfg, start.policy)
    with pytest.raises(ConfigError, match="names the gold RM"):
        Planner(cfg, start, tmp_path / "bench").main_runs(labels[0], None, labels[0].values)
