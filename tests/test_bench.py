"""The benchmark harness: recipes validate, the plan skips unregistered algorithms and never hands the gold RM
to training, and a tiny bench writes every output whose numbers are recomputed here from the runs' own files,
reproduces them in a fresh directory, and skips everything when run again."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from prefopt.bench.config import load_bench_config
from prefopt.bench.data import BenchData, read_jsonl
from prefopt.bench.report import aggregate, ci_halfwidth, markdown_table, t_quantile
from prefopt.bench.start import Start
from prefopt.data import record_id
from prefopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "bench" / "tiny_test.yaml"
QUALITY = ["gold_reward", "proxy_reward", "kl", "win_rate", "pref_acc", "pref_acc_logprob", "length"]


# ------------------------------------------------------------------------------------------------ fast


def test_bench_recipes_validate():
    for recipe in sorted((REPO / "recipes" / "bench").glob("*.yaml")):
        cfg = load_bench_config(recipe)
        assert cfg.labels and cfg.seeds
    default = load_bench_config(REPO / "recipes" / "bench" / "hh_default.yaml")
    assert set(default.labels) == {"ppo", "a2c", "dpo", "orpo"} and len(default.seeds) >= 2
    assert load_bench_config(REPO / "recipes" / "bench" / "synthetic.yaml").reward == "known"


@pytest.mark.parametrize("override, message", [
    ("algorithms.dpo.algorithm.bta=0.1", "algorithms.dpo: unknown config key 'algorithm.bta'"),
    ("algorithms.dpo.train.seed=3", "train.seed is set by the bench"),
    ("algorithms.dpo.data.path=x.jsonl", "data.path is set by the bench"),
    ("defaults.model.name_or_path=gpt2", "model.name_or_path is set by the bench"),
    ("eval.num_prompts=0", "eval.num_prompts=0: must be > 0"),
    ("splits.fractions.eval=0.5", "splits.fractions"),
    ("only=[nope]", "unknown labels"),
    ("colour=red", "unknown config key 'colour'"),
])
def test_bench_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_bench_config(TINY, [override])


def test_plan_skips_unregistered_algorithms_and_gives_online_ones_the_proxy(tmp_path):
    cfg = load_bench_config(TINY, ["algorithms.nope={}", "algorithms.ppo={}", f"output_dir={tmp_path}"])
    part = tmp_path / "policy_train.jsonl"
    part.write_text(json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " a", "rejected": " b"}) + "\n")
    from prefopt.bench.runner import Bench

    data = BenchData(parts={}, files={"policy_train": part, "eval": part}, manifest={})
    start = Start(stages=[], policy=tmp_path / "sft", proxy_rm=tmp_path / "proxy", gold_rm=tmp_path / "gold")
    bench = Bench(cfg, tmp_path, data, start)
    bench.plan_runs()
    assert "unknown algorithm 'nope'" in bench.skipped["nope"]
    assert {(r.label, r.seed) for r in bench.runs} == {(a, s) for a in ("dpo", "orpo", "ppo") for s in (0, 1)}
    for run in bench.runs:
        text = json.dumps(run.recipe)
        assert str(tmp_path / "gold") not in text
        assert run.recipe["model"]["name_or_path"] == str(tmp_path / "sft")
        assert run.recipe["train"]["seed"] == run.seed and run.recipe["data"]["eval_fraction"] == 0.0
        if run.label == "ppo":
            assert run.recipe["algorithm"]["rewards"][0]["params"]["path"] == str(tmp_path / "proxy")
            assert run.recipe["algorithm"]["generation"]["max_new_tokens"] == cfg.eval.generation.max_new_tokens
    # the same recipe gives the same key whatever the output directory; another seed another key
    keys = {(r.label, r.seed): r.key for r in bench.runs}
    assert len(set(keys.values())) == len(keys)


def test_confidence_interval_and_markdown():
    assert t_quantile(1) == 12.706 and t_quantile(100) == 1.96
    values = pd.Series([1.0, 3.0])
    assert ci_halfwidth(values) == pytest.approx(12.706 * math.sqrt(2.0) / math.sqrt(2))
    assert math.isnan(ci_halfwidth(pd.Series([1.0])))
    per_seed = pd.DataFrame({"algorithm": ["a", "a", "b"], "name": ["dpo"] * 3, "seed": [0, 1, 0],
                             "status": ["done"] * 3, "gold_reward": [1.0, 3.0, 5.0]})
    agg = aggregate(per_seed)
    assert agg["gold_reward"].tolist() == [2.0, 5.0] and agg["n_seeds"].tolist() == [2, 1]
    assert markdown_table(agg[["algorithm", "gold_reward"]]).splitlines()[2] == "| a | 2.000 |"


# ------------------------------------------------------------------------------------------------ slow


def _metric_means(run_dir: Path) -> dict[str, float]:
    """What the table must say about one run, recomputed from the run's own files."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["perf/step_s"] for row in metrics if "perf/step_s" in row]
    tokens = [row["perf/tokens_per_s"] for row in metrics if "perf/tokens_per_s" in row]
    summary = json.loads((run_dir / "summary.json").read_text())
    samples = read_jsonl(run_dir / "samples.jsonl")
    start = {row["prompt"]: row["start_gold"] for row in samples}
    wins = [1.0 if r["gold"] > start[r["prompt"]] else 0.5 if r["gold"] == start[r["prompt"]] else 0.0
            for r in samples]
    return {"s_per_step": sum(steps) / len(steps), "tokens_per_s": sum(tokens) / len(tokens),
            "steps": summary["step"], "peak_mem_mb": summary["perf/peak_mem_mb"],
            "train_s": summary["perf/train_s"],
            "gold_reward": sum(r["gold"] for r in samples) / len(samples),
            "kl": sum(r["kl"] for r in samples) / len(samples),
            "length": sum(r["length"] for r in samples) / len(samples), "win_rate": sum(wins) / len(wins)}


@pytest.mark.slow
def test_tiny_bench_end_to_end(tmp_path, hh_path, monkeypatch):
    from prefopt.bench.runner import run_bench

    monkeypatch.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    cache = tmp_path / "cache"
    first = Path(run_bench(TINY, [f"output_dir={tmp_path / 'a'}", f"cache_dir={cache}"]))

    # every output file
    for name in ("results.csv", "results_agg.csv", "results.md", "reward_vs_kl.png", "training_curves.png",
                 "manifest.json", "samples.md", "samples.jsonl", "eval/start.json", "eval/start_samples.jsonl"):
        assert (first / name).is_file() and (first / name).stat().st_size > 0, name
    table = pd.read_csv(first / "results.csv")
    runs = table[table["algorithm"] != "start"].astype({"seed": int})
    assert sorted(zip(runs["algorithm"], runs["seed"])) == [("dpo", 0), ("dpo", 1), ("orpo", 0), ("orpo", 1)]
    assert (runs["status"] == "done").all()

    # the table's numbers come from the runs' own logs and eval samples
    for row in runs.itertuples():
        run_dir = first / "runs" / row.algorithm / f"seed{row.seed}"
        for key, value in _metric_means(run_dir).items():
            assert getattr(row, key) == pytest.approx(value, rel=1e-9, abs=1e-12), (row.algorithm, row.seed, key)
        for name in ("recipe.yaml", "train.log", "prefopt_config.json", "metrics.csv", "eval.json", "model/model.safetensors"):
            assert (run_dir / name).is_file(), name
    start = table[table["algorithm"] == "start"].iloc[0]
    assert start["kl"] == 0.0 and start["win_rate"] == 0.5 and start["pref_acc"] == 0.5
    agg = pd.read_csv(first / "results_agg.csv").set_index("algorithm")
    for algorithm, group in runs.groupby("algorithm"):
        assert agg.loc[algorithm, "gold_reward"] == pytest.approx(group["gold_reward"].mean())
        assert agg.loc[algorithm, "gold_reward_ci"] == pytest.approx(
            12.706 * group["gold_reward"].std(ddof=1) / math.sqrt(2))
    markdown = (first / "results.md").read_text()
    assert "Mean ± 95% CI" in markdown and "| dpo | dpo | 0 | done |" in markdown

    # the manifest pins splits (disjoint, by id), seeds, versions, commit and the config
    manifest = json.loads((first / "manifest.json").read_text())
    parts = manifest["splits"]["parts"]
    assert set(parts) == {"policy_train", "proxy_rm_train", "gold_rm_train", "eval"}
    ids = {name: {record_id(r) for r in read_jsonl(first / "data" / f"{name}.jsonl")} for name in parts}
    for name, members in ids.items():
        assert len(members) == parts[name]["count"] > 0
        for other, other_members in ids.items():
            assert name == other or not members & other_members
    assert manifest["seeds"] == [0, 1] and manifest["config"]["algorithms"].keys() == {"dpo", "orpo"}
    assert {"torch", "transformers", "trl", "peft", "accelerate", "datasets", "prefopt"} <= set(manifest["versions"])
    assert "commit" in manifest["git"] and manifest["eval_set"]["prompts"]["count"] == 8
    assert [s["stage"] for s in manifest["start"]] == ["init", "sft", "proxy_rm", "gold_rm"]

    # a fresh directory re-computes: every evaluation (the copied runs lack eval.json) and one training run
    second = tmp_path / "b"
    shutil.copytree(first / "runs", second / "runs", ignore=shutil.ignore_patterns("eval.json", "samples.jsonl"))
    shutil.rmtree(second / "runs" / "dpo" / "seed0")
    assert Path(run_bench(TINY, [f"output_dir={second}", f"cache_dir={cache}"])) == second
    again = pd.read_csv(second / "results.csv")
    assert (second / "runs" / "dpo" / "seed0" / "summary.json").is_file()
    pd.testing.assert_frame_equal(again[["algorithm", "seed", *QUALITY]], table[["algorithm", "seed", *QUALITY]])

    # running the same bench again skips every finished run and cached evaluation
    logs = {p: p.stat().st_mtime_ns for p in (first / "runs").rglob("train.log")}
    evals = {p: p.stat().st_mtime_ns for p in (first / "runs").rglob("eval.json")}
    run_bench(TINY, [f"output_dir={first}", f"cache_dir={cache}"])
    assert {p: p.stat().st_mtime_ns for p in logs} == logs and {p: p.stat().st_mtime_ns for p in evals} == evals
    pd.testing.assert_frame_equal(pd.read_csv(first / "results.csv")[QUALITY], table[QUALITY])
