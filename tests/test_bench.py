"""The benchmark harness: recipes validate, the plan dispatches on what algorithms declare and never hands the gold
RM to training, the world's reward, labels and statistics are checked by hand, and tiny benches write every output
whose numbers (verdicts included) are recomputed here from the runs' own logs, reproduced in a fresh directory, and
skipped when run again."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from prefopt.bench.config import load_bench_config
from prefopt.bench.data import BenchData, read_jsonl
from prefopt.bench.execute import knob_field
from prefopt.bench.frontier import bon_kl, gao_fit, gold_matrix_at_kl, paired, verdict
from prefopt.bench.report.v1 import markdown_table  # the old report, until the re-laid runner lands
from prefopt.bench.start import Start
from prefopt.bench.world import GROUPS, WorldGoldReward, implied_pairs, plackett_luce, prompt_group, world_prompts
from prefopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "recipes" / "bench"
TINY = BENCH / "tiny_test.yaml"
WORLD_TINY = BENCH / "world_tiny_test.yaml"


# ------------------------------------------------------------------------------------------------ recipes


def test_bench_recipes_validate_and_the_default_is_the_known_gold_world():
    for recipe in sorted(BENCH.glob("*.yaml")):
        cfg = load_bench_config(recipe)
        assert cfg.labels and cfg.seeds
    default = load_bench_config(BENCH / "world_default.yaml")
    assert default.task == "world" and default.reward == "proxy_rm" and len(default.seeds) >= 5
    assert {"ppo", "a2c", "dpo", "orpo", "kto"} <= set(default.labels)
    assert all(len(default.frontier.knob_values[label]) >= 3 for label in default.labels)
    assert default.frontier.best_of_n and default.frontier.kl_levels and len(default.lr_sweep.learning_rates) >= 2
    assert "world_default.yaml" in (REPO / "Makefile").read_text()
    assert load_bench_config(BENCH / "synthetic.yaml").reward == "known"
    full = load_bench_config(BENCH / "world_full.yaml")
    assert len(full.seeds) >= len(default.seeds) and full.defaults["train"]["max_steps"] > 24


@pytest.mark.parametrize("override, message", [
    ("algorithms.dpo.algorithm.bta=0.1", "algorithms.dpo: unknown config key 'algorithm.bta'"),
    ("algorithms.dpo.train.seed=3", "train.seed is set by the bench"),
    ("algorithms.dpo.data.path=x.jsonl", "data.path is set by the bench"),
    ("defaults.model.name_or_path=gpt2", "model.name_or_path is set by the bench"),
    ("eval.num_prompts=0", "eval.num_prompts=0: must be > 0"),
    ("splits.fractions.eval=0.5", "splits.fractions"),
    ("only=[nope]", "unknown labels"),
    ("colour=red", "unknown config key 'colour'"),
    ("frontier.knob_values={nope: [0.1]}", "frontier.knob_values"),
    ("lr_sweep.learning_rates=[0.001]", "only task world has"),
])
def test_bench_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_bench_config(TINY, [override])


def test_knob_dispatch_uses_the_declared_field_and_falls_back_by_config():
    from prefopt.registry import ALGORITHMS

    assert {name: knob_field(ALGORITHMS.get(name)) for name in ("ppo", "a2c", "dpo", "orpo", "kto")} == {
        "ppo": "kl_coef", "a2c": "kl_coef", "dpo": "beta", "orpo": "beta", "kto": "beta"}

    @dataclass
    class Both:
        beta: float = 0.1
        kl_coef: float = 0.1
        rewards: list = field(default_factory=list)

    @dataclass
    class Tau:
        tau: float = 0.1

    class Declared:  # a plugin registered later that declares its knob
        kind, Config, kl_knob = "prompts", Tau, "tau"

    class Ambiguous:  # beta and kl_coef: no guess
        kind, Config = "prompts", Both

    class Undeclared:  # a declared name that is not a field is ignored
        kind, Config, kl_knob = "pairs", Tau, "beta"

    assert knob_field(Declared) == "tau" and knob_field(Ambiguous) is None and knob_field(Undeclared) is None


def test_plan_sweeps_the_knob_gives_online_algorithms_the_proxy_and_skips_unregistered(tmp_path):
    from prefopt.algorithms.dpo import DPO
    from prefopt.registry import ALGORITHMS, register_algorithm

    if "bench_plugin_test" not in ALGORITHMS:  # an algorithm registered after the bench was written
        @register_algorithm("bench_plugin_test")
        class Plugin(DPO):
            """A plugin: DPO under another name, its knob declared."""

            kl_knob = "beta"

    cfg = load_bench_config(TINY, ["algorithms.nope={}", "algorithms.ppo={}", f"output_dir={tmp_path}",
                                   "algorithms.plugin={algorithm: {name: bench_plugin_test}}",
                                   "frontier.knob_values={dpo: [0.1, 0.3], ppo: [0.02], plugin: [0.7]}"])
    part = tmp_path / "policy_train.jsonl"
    part.write_text(json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " a", "rejected": " b"}) + "\n")
    from prefopt.bench.plan import Bench

    data = BenchData(parts={}, files={"policy_train": part, "eval": part}, manifest={})
    start = Start(stages=[], policy=tmp_path / "sft", proxy_rm=tmp_path / "proxy", gold_rm=tmp_path / "gold")
    bench = Bench(cfg, tmp_path, data, start)
    bench.plan_runs()
    assert "unknown algorithm 'nope'" in bench.skipped["nope"]
    assert {(r.label, r.value, r.seed) for r in bench.runs} == {
        ("dpo", 0.1, 0), ("dpo", 0.1, 1), ("dpo", 0.3, 0), ("dpo", 0.3, 1), ("orpo", 0.1, 0), ("orpo", 0.1, 1),
        ("ppo", 0.02, 0), ("ppo", 0.02, 1), ("plugin", 0.7, 0), ("plugin", 0.7, 1)}
    for run in bench.runs:
        assert str(tmp_path / "gold") not in json.dumps(run.recipe)
        assert run.recipe["model"]["name_or_path"] == str(tmp_path / "sft")
        assert run.recipe["algorithm"][run.knob] == run.value
        assert run.recipe["train"]["seed"] == run.seed and run.recipe["data"]["eval_fraction"] == 0.0
        if run.label == "ppo":
            assert run.recipe["algorithm"]["rewards"][0]["params"]["path"] == str(tmp_path / "proxy")
    assert len({r.key for r in bench.runs}) == len(bench.runs)
    assert bench.snapshot_steps(bench.runs[0]) == [1, 2]  # max_steps 3, 4 checkpoints: 1, 2 and the end


# ------------------------------------------------------------------------------------------------ the world


@dataclass
class FakeRollout:
    prompts: list[str]
    response_ids: torch.Tensor
    response_mask: torch.Tensor


def test_world_gold_reward_by_hand(tiny_model_dir):
    from prefopt.models import load_tokenizer
    from prefopt.config import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    prompts = world_prompts(40, seed=3)
    groups = [prompt_group(p) for p in prompts]
    assert set(groups) == {0, 1} and all(f"Words:" in p for p in prompts)
    with pytest.raises(ValueError, match="not a prompt of the known-gold world"):
        prompt_group("\n\nHuman: hi\n\nAssistant:")
    own = {g: [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in GROUPS[g]] for g in (0, 1)}
    p0 = next(p for p, g in zip(prompts, groups) if g == 0)
    p1 = next(p for p, g in zip(prompts, groups) if g == 1)
    eos = tokenizer.eos_token_id
    # p0: 2 own + 1 other + 1 neutral + EOS = 5 tokens -> (2 - 0.5 * 1) / 5; p1: 1 own + EOS, pad after -> 1 / 2
    ids = torch.tensor([[own[0][0], own[0][1], own[1][0], 300, eos], [own[1][2], eos, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    reward = WorldGoldReward(tokenizer, torch.device("cpu"), penalty=0.5)
    got = reward(FakeRollout([p0, p1], ids, mask))
    assert got.tolist() == pytest.approx([1.5 / 5, 1 / 2])
    swapped = reward(FakeRollout([p1, p0], ids, mask))  # the same responses under the other group's prompts
    assert swapped.tolist() == pytest.approx([(1 - 0.5 * 2) / 5, -0.5 / 2])


def test_plackett_luce_labels_follow_bradley_terry():
    import random

    rng = random.Random(0)
    tau, gap = 0.05, 0.05
    wins = sum(plackett_luce([gap, 0.0], tau, rng)[0] == 0 for _ in range(20000)) / 20000
    assert wins == pytest.approx(1 / (1 + math.exp(-gap / tau)), abs=0.01)  # sigmoid(1) = 0.731
    ranking = plackett_luce([0.0, 5.0, 1.0, 3.0], 1e-3, rng)
    assert ranking == [1, 3, 2, 0]
    pairs = implied_pairs("x", ["a", "b", "c", "b"], [1, 3, 2, 0])  # "b" twice: that pair is dropped
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "c"), ("b", "a"), ("b", "c"), ("b", "a"), ("c", "a")]


# ------------------------------------------------------------------------------------------------ statistics


def test_best_of_n_kl_and_gao_fits_recover_known_coefficients():
    assert bon_kl(1) == 0.0 and bon_kl(4) == pytest.approx(math.log(4) - 0.75)
    kl = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    d = np.sqrt(kl)
    for form, curve in (("bon", d * (0.3 - 0.05 * d)), ("rl", d * (0.2 - 0.1 * np.log(d)))):
        points = pd.DataFrame({"value": range(5), "step": 1, "gold": 1.0 + curve, "kl": kl})
        fit = gao_fit(points, 1.0, form)
        assert (fit["a"], fit["b"]) == pytest.approx((0.3, 0.05) if form == "bon" else (0.2, 0.1))
        assert fit["r2"] == pytest.approx(1.0)


def test_matched_kl_interpolation_and_paired_verdicts_by_hand():
    start = pd.DataFrame({"i": [0, 1], "gold": [0.0, 0.0]})
    prompts = pd.DataFrame([  # one seed, two prompts: points at KL 1 (gold 1, 3) and KL 3 (gold 2, 6)
        {"label": "a", "value": 0.1, "seed": 0, "step": 5, "i": 0, "gold": 1.0, "kl": 1.0},
        {"label": "a", "value": 0.1, "seed": 0, "step": 5, "i": 1, "gold": 3.0, "kl": 1.0},
        {"label": "a", "value": 0.1, "seed": 0, "step": 10, "i": 0, "gold": 2.0, "kl": 2.0},
        {"label": "a", "value": 0.1, "seed": 0, "step": 10, "i": 1, "gold": 6.0, "kl": 4.0}])
    assert gold_matrix_at_kl(prompts, "a", 2.0, start).tolist() == [[1.5, 4.5]]  # halfway from KL 1 to 3
    assert gold_matrix_at_kl(prompts, "a", 0.5, start).tolist() == [[0.5, 1.5]]  # halfway from the start
    assert gold_matrix_at_kl(prompts, "a", 1.5, start).tolist() == [[1.25, 3.75]]  # a quarter of the way
    assert gold_matrix_at_kl(prompts, "a", 3.5, start) is None  # never reached
    diff = np.array([[0.2, 0.3, 0.1, 0.4], [0.25, 0.2, 0.3, 0.35]])
    result = paired(diff, 500)
    assert result["diff"] == pytest.approx(diff.mean()) and result["lo"] > 0 and result["p"] == pytest.approx(1 / 500)
    assert verdict(result) == "better" and verdict(paired(-diff, 500)) == "worse"
    assert verdict(paired(np.array([[0.1, -0.1, 0.2, -0.2]]), 500)) == "inconclusive"
    assert markdown_table(pd.DataFrame({"a": [2.0]})).splitlines()[2] == "| 2.000 |"


# ------------------------------------------------------------------------------------------------ slow


def _eval_rows(run_dir: Path) -> pd.DataFrame:
    frames = []
    for info_path in (run_dir / "runs").rglob("run.json"):
        info = json.loads(info_path.read_text())
        if info.get("phase") != "main":
            continue
        rows = pd.DataFrame(read_jsonl(info_path.parent / "eval.jsonl"))
        frames.append(rows.assign(label=info["label"], value=info["value"], seed=info["seed"]))
    return pd.concat(frames, ignore_index=True)


def _by_hand_at_kl(rows: pd.DataFrame, start: np.ndarray, label: str, k: float) -> np.ndarray | None:
    """Gold at KL k per seed: the points (value, step) and the start sorted by mean KL, linear in between."""
    out = []
    for _, seed_rows in sorted(rows[rows["label"] == label].groupby("seed")):
        points = sorted([(0.0, start)] + [(g["kl"].mean(), g.sort_values("i")["gold"].to_numpy())
                                          for _, g in seed_rows.groupby(["value", "step"])], key=lambda p: p[0])
        if not points[0][0] <= k <= points[-1][0]:
            return None
        below = max(p for p in points if p[0] <= k)
        above = min((p for p in points if p[0] > k), default=below, key=lambda p: p[0])
        w = 0.0 if above[0] == below[0] else (k - below[0]) / (above[0] - below[0])
        out.append((1 - w) * below[1] + w * above[1])
    return np.vstack(out)


@pytest.mark.slow
def test_tiny_world_bench_end_to_end_recomputes_the_verdicts(tmp_path, hh_path, monkeypatch):
    from prefopt.bench.runner import run_bench

    monkeypatch.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    cache = tmp_path / "cache"
    first = Path(run_bench(WORLD_TINY, [f"output_dir={tmp_path / 'a'}", f"cache_dir={cache}"]))
    for name in ("results.md", "results.csv", "verdicts.csv", "frontier.csv", "fits.csv", "final.csv", "compute.csv",
                 "diagnostics.csv", "lr_sweep.csv", "reward_vs_kl.png", "gold_vs_flops.png", "training_curves.png",
                 "manifest.json", "samples.md", "eval/start.jsonl", "eval/best_of_n.jsonl"):
        assert (first / name).is_file() and (first / name).stat().st_size > 0, name
    markdown = (first / "results.md").read_text()
    assert markdown.index("## Verdicts") < markdown.index("## Frontiers") < markdown.index("## Reward-hacking")
    manifest = json.loads((first / "manifest.json").read_text())
    cfg = load_bench_config(WORLD_TINY)

    # the lr sweep: one run per candidate judged on val; the chosen rate is the argmax and the main runs use it
    for label, record in manifest["learning_rates"].items():
        golds = {}
        for lr in cfg.lr_sweep.learning_rates:
            rows = pd.DataFrame(read_jsonl(first / "runs" / label / "lr_sweep" / f"lr={lr:g}" / "eval.jsonl"))
            assert set(rows["set"]) == {"val"}
            golds[lr] = rows[rows["step"] == rows["step"].max()]["gold"].mean()
        assert record["chosen"] == max(golds, key=golds.get)
        for recipe in (first / "runs" / label).glob("*=*/seed*/recipe.yaml"):
            assert yaml.safe_load(recipe.read_text())["train"]["learning_rate"] == record["chosen"]

    # budgets: the same number of updates; online samples; FLOPs per token from the probe
    runs = pd.DataFrame([json.loads(p.read_text()) for p in (first / "runs").rglob("run.json")])
    main = runs[runs["phase"] == "main"]
    assert (main["updates"] == cfg.defaults["train"]["max_steps"]).all()
    ppo = main[main["label"] == "ppo"]
    assert (ppo["samples_generated"] == ppo["steps"] * cfg.defaults["train"]["batch_size"]).all()
    assert (main[main["label"] == "dpo"]["samples_generated"] == 0).all()
    probes = runs[runs["phase"] == "flops"].set_index("label")
    assert (probes["flops_counted"] > 0).all()
    final = pd.read_csv(first / "final.csv").set_index("label")
    for label in ("ppo", "dpo"):
        chosen = main[(main["label"] == label) & (main["value"] == final.loc[label, "value"])]
        per_token = probes.loc[label, "flops_counted"] / probes.loc[label, "tokens"]
        assert final.loc[label, "flops"] == pytest.approx((chosen["tokens"] * per_token).mean())
        assert final.loc[label, "cpu_s"] == pytest.approx(chosen["cpu_s"].mean())

    # the frontier and per-seed tables are means of the per-prompt eval rows
    rows = _eval_rows(first)
    evals = rows[rows["set"] == "eval"]
    frontier = pd.read_csv(first / "frontier.csv")
    for row in frontier[frontier["label"] != "best_of_n"].itertuples():
        mine = evals[(evals["label"] == row.label) & (evals["value"] == row.value) & (evals["step"] == row.step)]
        assert row.gold == pytest.approx(mine["gold"].mean()) and row.kl == pytest.approx(mine["kl"].mean())
        assert row.n_seeds == mine["seed"].nunique() == len(cfg.seeds)
    assert set(evals["step"]) == {2, 4} and (frontier["label"] == "best_of_n").sum() == len(cfg.frontier.best_of_n)
    draws = pd.DataFrame(read_jsonl(first / "eval" / "best_of_n.jsonl"))
    for n in cfg.frontier.best_of_n:  # best-of-n by hand: argmax of the proxy among the first n draws
        picked = [group.sort_values("j").head(n).sort_values("proxy", ascending=False, kind="stable").iloc[0]["gold"]
                  for _, group in draws.groupby(["seed", "i"])]
        bon = frontier[(frontier["label"] == "best_of_n") & (frontier["value"] == n)].iloc[0]
        assert bon.gold == pytest.approx(np.mean(picked)) and bon.kl == pytest.approx(math.log(n) - (n - 1) / n)

    # the verdict table, recomputed by hand from the eval rows
    start = pd.DataFrame(read_jsonl(first / "eval" / "start.jsonl"))
    start_gold = start[start["set"] == "eval"].sort_values("i")["gold"].to_numpy()
    verdicts = pd.read_csv(first / "verdicts.csv")
    val = rows[rows["set"] == "val"]
    best = {label: group.groupby("value")["gold"].mean().idxmax() for label, group in val.groupby("label")}
    assert set(verdicts["A"]) | set(verdicts["B"]) == {"ppo", "dpo", "best_of_n"}
    for row in verdicts.itertuples():
        if row.at.startswith("best"):
            a, b = (evals[(evals["label"] == x) & (evals["value"] == best[x])] for x in (row.A, row.B))
            a, b = (x[x["step"] == x["step"].max()].sort_values(["seed", "i"])["gold"].to_numpy() for x in (a, b))
            expected = (a - b).mean()
        else:
            k = float(row.at.split()[1])
            if row.B == "best_of_n" or row.A == "best_of_n":
                continue  # best-of-n's matrix is checked above through its frontier points
            ga, gb = (_by_hand_at_kl(evals, start_gold, x, k) for x in (row.A, row.B))
            if ga is None or gb is None:
                assert str(row.verdict).startswith("n/a")
                continue
            expected = (ga - gb).mean()
        assert row.diff == pytest.approx(expected, abs=1e-9), row
        assert row.verdict == ("better" if row.lo > 0 else "worse" if row.hi < 0 else "inconclusive")
        assert row.lo <= row.diff + 1e-9 and row.diff - 1e-9 <= row.hi

    # Gao fits from the frontier points; diagnostics from the eval rows
    fits = pd.read_csv(first / "fits.csv").set_index("label")
    for label in ("ppo", "dpo"):
        points = frontier[(frontier["label"] == label) & (frontier["kl"] > 1e-9)]
        d = np.sqrt(points["kl"].to_numpy())
        (a, b), *_ = np.linalg.lstsq(np.stack([d, -d * np.log(d)], 1), points["gold"] - start_gold.mean(), rcond=None)
        assert (fits.loc[label, "a"], fits.loc[label, "b"]) == pytest.approx((a, b))
    diagnostics = pd.read_csv(first / "diagnostics.csv")
    start_eval = start[start["set"] == "eval"]
    for row in diagnostics.itertuples():
        mine = evals[(evals["label"] == row.label) & (evals["value"] == row.value) & (evals["seed"] == row.seed)]
        last = mine[mine["step"] == mine["step"].max()]
        assert row.length_ratio == pytest.approx(last["length"].mean() / start_eval["length"].mean())
        assert row.entropy_ratio == pytest.approx(last["entropy"].mean() / start_eval["entropy"].mean())
        assert row.flag_entropy_ratio == (row.entropy_ratio < cfg.diagnostics.entropy_ratio)

    # a fresh directory reproduces every number (one run's evaluation removed: it is trained again)
    second = tmp_path / "b"
    shutil.copytree(first / "runs", second / "runs")
    (second / "runs" / "dpo" / "beta=0.1" / "seed0" / "eval.json").unlink()
    run_bench(WORLD_TINY, [f"output_dir={second}", f"cache_dir={cache}"])
    again = pd.read_csv(second / "frontier.csv")
    pd.testing.assert_frame_equal(again, frontier)
    pd.testing.assert_frame_equal(pd.read_csv(second / "verdicts.csv"), verdicts)

    # running the same bench again skips every finished run
    logs = {p: p.stat().st_mtime_ns for p in (first / "runs").rglob("train.log")}
    run_bench(WORLD_TINY, [f"output_dir={first}", f"cache_dir={cache}"])
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    pd.testing.assert_frame_equal(pd.read_csv(first / "verdicts.csv"), verdicts)


@pytest.mark.slow
def test_tiny_hh_bench_keeps_its_gold_and_proxy_rms(tmp_path, hh_path, monkeypatch):
    from prefopt.bench.runner import run_bench

    monkeypatch.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    out = Path(run_bench(TINY, [f"output_dir={tmp_path / 'a'}", f"cache_dir={tmp_path / 'cache'}",
                                "frontier.checkpoints=1", "frontier.best_of_n=[1, 2]"]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["start"]] == ["init", "sft", "proxy_rm", "gold_rm"]
    parts = manifest["splits"]["parts"]
    ids = {name: {json.dumps(r, sort_keys=True) for r in read_jsonl(out / "data" / f"{name}.jsonl")} for name in parts}
    assert all(not ids[a] & ids[b] for a in ids for b in ids if a != b)
    table = pd.read_csv(out / "results.csv")
    assert sorted(zip(table["label"], table["seed"])) == [("dpo", 0), ("dpo", 1), ("orpo", 0), ("orpo", 1)]
    for row in table.itertuples():
        rows = pd.DataFrame(read_jsonl(out / "runs" / row.label / "beta=0.1" / f"seed{row.seed}" / "eval.jsonl"))
        assert row.gold == pytest.approx(rows["gold"].mean()) and row.proxy == pytest.approx(rows["proxy"].mean())
    assert "| dpo | orpo | last step (one knob value)" in (out / "results.md").read_text()
