"""prefopt.bench.runner and .workers: the selection picks by hand-checked rules and extends a grid at its edge; a tiny
world bench writes every file of the run-directory layout with the numbers the plan promises (checkpoints, seeds,
costs, the oracle's reward, selection seeds apart), 2 worker processes give files bit-identical to 1, a finished bench
is not trained again and an unfinished run is; a tiny HH bench records its gold RM's held-out accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from bench_rundir import check_run_dir, make_run_dir
from prefopt.bench.files import read_json, read_jsonl
from prefopt.bench.plan import checkpoint_steps
from prefopt.bench.runner import _best, _extension, run_bench
from prefopt.bench.world import oracle_weight

BENCH = Path(__file__).resolve().parents[1] / "recipes" / "bench"
WORLD_TINY = BENCH / "world_tiny_test.yaml"


def test_selection_takes_the_best_within_the_kl_budget_and_extends_an_edge():
    table = {(0.001, 0.1): {"val_gold": 0.2, "val_kl": 1.0}, (0.003, 0.1): {"val_gold": 0.5, "val_kl": 3.0},
             (0.01, 0.1): {"val_gold": 0.4, "val_kl": 9.0}}
    points = sorted(table)
    assert _best(table, points, None) == (0.003, 0.1)
    assert _best(table, points, 2.0) == (0.001, 0.1)  # only the first is within KL 2
    assert _best(table, points, 0.5) == (0.003, 0.1)  # none within: all compete
    assert _best({}, points, None) == (0.003, 0.1)  # nothing measured (every run failed): the middle
    assert _extension([0.001, 0.003, 0.01], 0.01) == pytest.approx(0.0333, abs=1e-4)  # one geometric step up
    assert _extension([0.001, 0.003, 0.01], 0.001) == pytest.approx(0.000333, abs=1e-6)
    assert _extension([0.001, 0.003, 0.01], 0.003) is None  # interior
    assert _extension([0.0, 0.05], 0.0) is None and _extension([0.1], 0.1) is None  # no step from 0 or one value


def test_the_fixture_run_directory_follows_the_layout(tmp_path):
    out = make_run_dir(tmp_path / "fixture", draws=2, seeds=(0, 1), n_eval=4, n_val=3, n_pairs=2, bon_n=4)
    check_run_dir(out)
    rows = read_jsonl(out / "runs" / "dpo" / "beta=0.05" / "draw1" / "seed1" / "eval.jsonl")
    assert {r["step"] for r in rows} == set(checkpoint_steps(24, 8)) and len(rows) == 4 * 8


@pytest.fixture(scope="module")
def world_bench(tmp_path_factory, hh_path):
    """The tiny world bench with 2 workers (its start cached for the other tests of this module)."""
    root = tmp_path_factory.mktemp("world-bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    try:
        out = Path(run_bench(WORLD_TINY, [f"output_dir={root / 'a'}", f"cache_dir={root / 'cache'}"]))
    finally:
        mp.undo()
    return out


@pytest.mark.slow
def test_tiny_world_bench_writes_the_run_directory(world_bench):
    out = world_bench
    check_run_dir(out)
    bench, manifest, plan = (read_json(out / f"{name}.json") for name in ("bench", "manifest", "plan"))
    cfg = bench["config"]
    assert bench["task"] == "world" and manifest["host"]["workers"] == 2
    assert set(plan["labels"]) == {"ppo", "ppo_true", "dpo"} and plan["labels"]["ppo_true"]["reward"] == "true"
    prompts = read_jsonl(out / "prompts.jsonl")
    n_eval = sum(r["set"] == "eval" for r in prompts)
    for d in range(cfg["draws"]):
        draw = out / "draws" / f"draw{d}"
        start = read_jsonl(draw / "start.jsonl")
        assert {(r["set"], r["i"]) for r in start} == {(r["set"], r["i"]) for r in prompts}
        assert all(r["kl"] == pytest.approx(0.0, abs=1e-4) and r["step"] == 0 for r in start)
        bon = read_jsonl(draw / "best_of_n.jsonl")
        assert len(bon) == n_eval * max(cfg["frontier"]["best_of_n"])
        proxy, labels = read_json(draw / "proxy.json"), read_json(draw / "labels.json")
        assert proxy["n_pairs"] == labels["parts"]["val"]["pairs_used"] and 0 <= proxy["val_accuracy"] <= 1
        pairs = read_jsonl(draw / "pairs.jsonl")
        assert len(pairs) == min(cfg["eval"]["num_pairs"], labels["parts"]["eval"]["pairs_used"])
    selection = manifest["selection"]
    assert set(selection) == {"ppo", "dpo"}
    runs = {row["id"]: row for row in plan["runs"]}
    assert len(runs) == len(plan["runs"])  # no run twice
    for row in plan["runs"]:
        info = read_json(out / row["dir"] / "run.json")
        assert info["status"] == "done" and {k: info[k] for k in row} == row
        rows = read_jsonl(out / row["dir"] / "eval.jsonl")
        if row["phase"] == "select":
            assert row["seed"] in cfg["select"]["seeds"] and row["draw"] == cfg["select"]["draw"]
            assert {(r["set"], r["step"]) for r in rows} == {("val", row["max_steps"])}
            continue
        if row["phase"] == "probe":
            assert info["cost"]["flops_method"] == "counted" and info["cost"]["flops"] > 0 and rows == []
            continue
        chosen = selection[row["oracle_of"] or row["label"]]
        assert row["learning_rate"] == chosen["chosen_learning_rate"]
        assert row["seed"] == row["seed"] % 1000 + 1000 * row["draw"] and row["seed"] not in cfg["select"]["seeds"]
        assert row["checkpoints"] == checkpoint_steps(row["max_steps"], cfg["frontier"]["checkpoints"])
        assert sorted({r["step"] for r in rows}) == row["checkpoints"] and len(rows) == n_eval * len(row["checkpoints"])
        assert all(r["set"] == "eval" and r["proxy"] is not None for r in rows)
        pref = read_jsonl(out / row["dir"] / "pref.jsonl")
        assert {r["step"] for r in pref} == {row["max_steps"]}
        cost = info["cost"]
        assert cost["updates"] == row["max_steps"] and cost["flops_method"] == "probe-per-token"
        if row["kind"] == "pairs":
            assert cost["epochs_over_pairs"] >= 1.0 and cost["labels_consumed"] > 0 and cost["samples"] == 0
        else:
            labels = read_json(out / "draws" / f"draw{row['draw']}" / "labels.json")["parts"]["policy_train"]
            assert cost["samples"] == row["max_steps"] * 8
            assert cost["labels_consumed"] == (row["reward"] == "proxy") * labels["prompts_labelled"]
        if row["reward"] == "true":  # the oracle's reward: the true reward in the proxy's units (its draw's slope)
            draw = out / "draws" / f"draw{row['draw']}"
            proxy, bon = read_json(draw / "proxy.json"), read_jsonl(draw / "best_of_n.jsonl")
            try:
                slope = oracle_weight([r["gold"] for r in bon], [r["proxy"] for r in bon])
            except ValueError:  # the true reward constant over the start's replies: no scale, weight 1
                slope = None
            assert proxy["oracle_slope"] == (slope if slope is None else pytest.approx(slope, rel=1e-9))
            assert proxy["oracle_weight"] == (slope if slope is not None and slope > 0 else 1.0)
            reward = yaml.safe_load((out / row["dir"] / "recipe.yaml").read_text())["algorithm"]["rewards"][0]
            assert reward["name"] == "world_gold" and reward["weight"] == proxy["oracle_weight"]
    values = {row["value"] for row in plan["runs"] if row["label"] == "dpo" and row["phase"] == "main"}
    assert values == set(cfg["frontier"]["knob_values"]["dpo"]) | {selection["dpo"]["chosen_value"]}
    text = (out / "results.md").read_text()  # the report, from the run directory alone, every section computed
    assert text.index("## Gates") < text.index("## Verdicts") < text.index("## Runs")
    assert "could not be computed" not in text and "## Problems reading the run directory\n\n(none)" in text


@pytest.mark.slow
def test_one_worker_is_bit_identical_and_a_finished_bench_is_not_trained_again(world_bench, tmp_path, hh_path,
                                                                               monkeypatch):
    monkeypatch.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    cache = world_bench.parent / "cache"
    one = Path(run_bench(WORLD_TINY, [f"output_dir={tmp_path / 'one'}", f"cache_dir={cache}", "workers=1",
                                      "only=[ppo]", "oracles=[]"]))
    compared = 0
    for path in sorted(one.rglob("*.jsonl")):
        relative = path.relative_to(one)
        if relative.name != "metrics.jsonl" and relative.parts[0] != "data":  # metrics.jsonl holds timings
            assert path.read_bytes() == (world_bench / relative).read_bytes(), relative
            compared += 1
    assert compared >= 15
    # a second bench over a finished directory trains nothing; an unfinished run is trained again
    logs = {p: p.stat().st_mtime_ns for p in (world_bench / "runs").rglob("train.log")}
    unfinished = world_bench / read_json(world_bench / "plan.json")["runs"][-1]["dir"]
    (unfinished / "run.json").unlink()
    eval_rows = (unfinished / "eval.jsonl").read_bytes()
    run_bench(WORLD_TINY, [f"output_dir={world_bench}", f"cache_dir={cache}", "workers=1"])
    again = {p: p.stat().st_mtime_ns for p in logs}
    assert [p for p in logs if again[p] != logs[p]] == [unfinished / "train.log"]
    assert (unfinished / "eval.jsonl").read_bytes() == eval_rows
    assert read_json(unfinished / "run.json")["status"] == "done"


@pytest.mark.slow
def test_tiny_hh_bench_records_the_gold_rm_accuracy(tmp_path, hh_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    out = Path(run_bench(BENCH / "hh_tiny_test.yaml", [f"output_dir={tmp_path / 'a'}", f"cache_dir={tmp_path / 'c'}"]))
    check_run_dir(out)
    gold, proxy = read_json(out / "gold.json"), read_json(out / "draws" / "draw0" / "proxy.json")
    eval_pairs = len(read_jsonl(out / "data" / "eval.jsonl"))
    assert gold["n_pairs"] == proxy["n_pairs"] == eval_pairs > 200  # every held-out pair (bench-hh: >= 500)
    assert gold["ci95"][0] < gold["accuracy"] < gold["ci95"][1] and gold["method"] == "normal"
    stages = [(s["stage"], s["draw"]) for s in read_json(out / "manifest.json")["stages"]]
    assert stages == [("init", None), ("sft", None), ("gold_rm", None), ("proxy_rm", 0)]
    info = read_json(out / "runs" / "dpo" / "beta=0.1" / "draw0" / "seed0" / "run.json")
    assert info["cost"]["epochs_over_pairs"] >= 1.0
    assert read_jsonl(out / info["dir"] / "eval.jsonl")[0]["cond_acc"] is None
