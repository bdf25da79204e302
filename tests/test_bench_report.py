"""prefopt.bench.report end to end: results.md, CSVs and figures from a run directory alone (bench-wing's v2 fixture
tests/bench_rundir.py, planted numbers), numbers recomputed by hand from the files, gates that withhold verdicts, and a
report that is always written, with what it could not read listed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench_rundir import LABELS, check_run_dir, make_run_dir
from prefopt.bench.report import write_report
from prefopt.bench.report.tables import fmt
from prefopt.cli import main

T_975_2 = 4.302653  # Student's t, 2 degrees of freedom (3 draws), two-sided 95%
FAILED = "dpo/beta=0.1/draw1/seed0"
# the oracle gate compares point estimates: plant an oracle clearly above its proxy twin (fixture: +0.10 of effect)
ORACLE_AHEAD = {**LABELS, "ppo_true": {**LABELS["ppo_true"], "values": {0.01: (0.60, 8.0), 0.05: (0.40, 4.0),
                                                                        0.2: (0.20, 1.0)}}}


def _fail(path: Path, run_id: str) -> None:
    """Turn a finished run of the fixture into a failed one (its run.json says so; no evaluation)."""
    run = path / "runs" / run_id
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "failed", "error": "RuntimeError: loss is nan"}))
    (run / "eval.jsonl").unlink()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_run_dir(tmp_path_factory.mktemp("bench") / "run", labels=ORACLE_AHEAD, seeds=(0, 1), n_eval=16)
    _fail(path, FAILED)
    check_run_dir(path)
    write_report(path)
    return path


def _eval(path: Path, run_id: str) -> pd.DataFrame:
    return pd.read_json(path / "runs" / run_id / "eval.jsonl", lines=True)


def _row(verdicts: pd.DataFrame, a: str, b: str, at: str) -> pd.Series:
    pair = ((verdicts["A"] == a) & (verdicts["B"] == b)) | ((verdicts["A"] == b) & (verdicts["B"] == a))
    return verdicts[pair & verdicts["at"].str.startswith(at)].iloc[0]


def test_results_open_with_the_gates_then_the_verdicts_and_every_table_is_a_csv(report):
    text = (report / "results.md").read_text()
    assert text.index("## Gates") < text.index("## Verdicts") < text.index("## Frontiers") < text.index("## Manifest")
    for name in ("gates", "verdicts", "frontier", "fits", "best", "footing", "pref", "runs"):
        assert not pd.read_csv(report / f"{name}.csv").empty, name
    for name in ("reward_vs_kl.png", "training_curves.png"):
        assert (report / name).stat().st_size > 10_000, name
    gates = pd.read_csv(report / "gates.csv").set_index("gate")["status"].to_dict()
    assert [status for gate, status in gates.items() if gate.startswith(("proxy", "oracle"))] == ["pass"] * 2
    # the fixture chooses the value of highest effect, at the edge of every grid; the failed run is named
    assert gates["learning rate and KL knob interior to their grids"] == "flag"
    assert gates["runs finished"] == "flag" and FAILED in text
    assert "trained on the true reward x 5 (draw 0), 5 (draw 1), 5 (draw 2)" in text  # proxy.json oracle_weight


def test_best_point_verdict_recomputed_by_hand_from_the_files(report):
    row = _row(pd.read_csv(report / "verdicts.csv"), "ppo", "dpo", "best")
    # the chosen setting (the fixture's manifest: ppo kl_coef 0.01, dpo beta 0.05) at its last checkpoint whose mean KL
    # over the cells is <= the budget (select.kl_budget unset -> max(frontier.kl_levels) = 2)
    diffs = []
    for draw in range(3):
        means = {}
        for label, setting in (("ppo", "kl_coef=0.01"), ("dpo", "beta=0.05")):
            runs = [_eval(report, f"{label}/{setting}/draw{draw}/seed{s}") for s in range(2)]
            kl = pd.concat(runs).groupby("step")["kl"].mean()
            step = kl[kl <= 2.0].index.max()
            means[label] = np.mean([r[r["step"] == step]["gold"].mean() for r in runs])
        diffs.append(means[row["A"]] - means[row["B"]])
    half = T_975_2 * np.std(diffs, ddof=1) / math.sqrt(3)
    assert (row["diff"], row["lo"], row["hi"]) == pytest.approx((np.mean(diffs), np.mean(diffs) - half,
                                                                 np.mean(diffs) + half), abs=1e-6)
    assert row["p holm"] >= row["p"] and row["unit"] == "draws"
    # the summary at the top of the verdicts: every label at every point, the same gold as the verdict rows
    summary = pd.read_csv(report / "summary.csv").set_index(["label", "at"])
    assert len(summary) == 5 * 3 and summary.loc[(row["A"], row["at"]), "gold"] == pytest.approx(row["gold A"])
    assert summary.loc[("best_of_n", "KL 2"), "cells"] == "0/3" and np.isnan(summary.loc[("best_of_n", "KL 2"), "gold"])
    assert "tested rows decided after Holm" in (report / "results.md").read_text()


def test_matched_kl_rows_rest_on_measured_brackets_and_find_the_planted_difference(report):
    verdicts = pd.read_csv(report / "verdicts.csv")
    at_kl = verdicts[verdicts["at"].str.startswith("KL")]
    assert len(at_kl) == 6 and at_kl["verdict"].str.startswith("n/a").sum() == 2  # best-of-16 stops at KL 1.84
    for row in at_kl[at_kl["diff"].notna()].itertuples():
        k = float(row.at.split()[1])
        for bracket in (getattr(row, "_4"), getattr(row, "_5")):  # "A KL", "B KL": mean KLs of the two checkpoints
            low, high = map(float, bracket.split("-"))
            assert low <= k + 1e-9 and high >= k - 1e-9 and high > low, (row.A, row.B, bracket)
    tested = verdicts["p"].notna()
    assert tested.sum() == 7 and set(verdicts.loc[tested, "verdict"]) <= {"better", "worse", "inconclusive"}
    # planted: gold rises by effect x KL / kl_max, so at KL 1 ppo (kl_coef 0.2: 0.10 per nat) gains 0.1 and dpo
    # (beta 0.5: 0.05 / 0.5 nat, not reaching 1; beta 0.1: 0.12 / 3 nats) gains 0.04: the envelope's diff is ~0.06
    row = _row(verdicts, "ppo", "dpo", "KL 1")
    ppo_minus_dpo = row["diff"] if row["A"] == "ppo" else -row["diff"]
    assert ppo_minus_dpo == pytest.approx(0.06, abs=0.03)


def test_best_of_n_at_n_max_is_the_proxy_argmax(report):
    frontier = pd.read_csv(report / "frontier.csv")
    bon = frontier[(frontier["label"] == "best_of_n") & (frontier["step"] == 16)].iloc[0]
    picked = []
    for draw in range(3):
        samples = pd.read_json(report / "draws" / f"draw{draw}" / "best_of_n.jsonl", lines=True)
        picked += [group.loc[group["proxy"].idxmax(), "gold"] for _, group in samples.groupby("i")]
    assert bon["gold"] == pytest.approx(np.mean(picked)) and bon["kl"] == pytest.approx(math.log(16) - 15 / 16)


def test_best_points_carry_the_variance_decomposition_and_numbers_print_plainly(report):
    best = pd.read_csv(report / "best.csv").set_index("label")
    shares = best.loc[["ppo", "dpo", "ppo_true"], ["share draw", "share seed", "share prompt"]]
    assert ((shares >= 0) & (shares <= 1)).all().all() and np.allclose(shares.sum(axis=1), 1.0)
    assert "| shares d/s/p |" in (report / "results.md").read_text()
    assert [fmt(v) for v in (9.99999, 10.0, 0.1234, 1234.5, 2e-5, float("nan"))] == \
        ["10", "10", "0.123", "1234", "2e-05", ""]


def test_equal_footing_and_preference_accuracy_read_the_run_files(report):
    footing = pd.read_csv(report / "footing.csv").set_index("label")
    assert footing.loc["dpo", "runs"] == 3 * 3 * 2 - 1 and footing.loc["dpo", "samples"] == 0  # one dpo run failed
    assert footing.loc["dpo", "labels_consumed"] == 480 and footing.loc["ppo", "samples"] == 24 * 16
    assert footing.loc["ppo_true", "labels_consumed"] == 0 and footing.loc["ppo", "updates"] == 24
    pref = pd.read_csv(report / "pref.csv")
    # planted margins: dpo 2.0 at the last step, ppo 0.5: every held-out pair agrees with its label
    assert set(pref["label"]) == {"ppo", "ppo_true", "dpo"} and (pref["vs labels"] == 1.0).all()
    assert pref.loc[pref["label"] == "dpo", "runs"].sum() == 3 * 3 * 2 - 1


def test_failed_or_unchecked_gates_withhold_the_verdicts(tmp_path):
    labels = {name: spec for name, spec in LABELS.items() if not spec.get("oracle_of")}
    path = make_run_dir(tmp_path / "run", labels=labels, draws=2, seeds=(0,), n_eval=6, n_val=4, bon_n=4)
    proxy = json.loads((path / "draws" / "draw1" / "proxy.json").read_text())
    (path / "draws" / "draw1" / "proxy.json").write_text(json.dumps({**proxy, "val_accuracy": 0.6,
                                                                     "rule_val_accuracy": 0.68}))
    markdown = write_report(path, figures=False)
    gates = pd.read_csv(path / "gates.csv").set_index("gate")["status"]
    assert gates.filter(like="proxy beats").iloc[0] == "FAIL" and gates.filter(like="oracle").iloc[0] == "not checked"
    assert "**Verdicts withheld**" in markdown and "proxy 0.600 vs rule 0.680" in markdown
    assert set(pd.read_csv(path / "verdicts.csv")["verdict"].str.split(":").str[0]) <= {"withheld", "n/a"}

    bench = json.loads((path / "bench.json").read_text())
    (path / "bench.json").write_text(json.dumps({**bench, "task": "hh"}))
    (path / "gold.json").write_text(json.dumps({"n_pairs": 200, "accuracy": 0.55, "ci95": [0.48, 0.62]}))
    assert "(SMOKE TEST: no credible gold RM)" in write_report(path, figures=False).splitlines()[0]


def test_missing_and_broken_files_are_listed_and_the_report_is_still_written(tmp_path, capsys):
    path = make_run_dir(tmp_path / "run", draws=2, seeds=(0, 1), n_eval=6, n_val=4, bon_n=4)
    (path / "runs" / "ppo" / "kl_coef=0.01" / "draw0" / "seed0" / "run.json").unlink()
    eval_file = path / "runs" / "dpo" / "beta=0.05" / "draw1" / "seed1" / "eval.jsonl"
    eval_file.write_text(eval_file.read_text() + "{not json\n")
    (path / "draws" / "draw1" / "proxy.json").unlink()
    (path / "draws" / "draw0" / "best_of_n.jsonl").unlink()
    assert main(["bench", "report", str(path)]) == 0
    text = (path / "results.md").read_text()
    problems = text[text.index("## Problems"):]
    assert "draws/draw1/proxy.json: missing" in problems
    assert "config.draws" not in problems  # 2 planned, draw0 and draw1 on disk
    lines = 8 * 6 + 1  # 8 checkpoints x 6 eval prompts, then the broken line
    assert f"beta=0.05/draw1/seed1/eval.jsonl: 1 unreadable line(s) skipped (first: line {lines}; each needs step, " \
        "i, kl)" in problems
    assert "ppo/kl_coef=0.01/draw0/seed0 | ppo | main | 0.010 | 0 | 0 | 0.003 | missing | run.json not written" in text
    assert "gates" in capsys.readouterr().out.lower()
    assert main(["bench", "report", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_offline_runs_that_stop_at_different_steps_per_draw_align_by_checkpoint_position(tmp_path):
    """An offline run trains ceil(epochs x labelled rows / batch) steps and each draw has its own labelled rows, so
    dpo's checkpoints in draw 1 (max_steps 25) are not draw 0's (24): the best point and the frontier must still hold
    every cell (by step alone, draw 1 was missing at every step but 1-3 and the best-point verdict was n/a)."""
    from prefopt.bench.plan import checkpoint_steps

    path = make_run_dir(tmp_path / "run", labels=ORACLE_AHEAD, draws=2, seeds=(0,), n_eval=6, n_val=4, bon_n=4)
    moved = dict(zip(checkpoint_steps(24, 8), checkpoint_steps(25, 8)))
    for run in (path / "runs" / "dpo").glob("*/draw1/seed0"):
        for name in ("eval.jsonl", "pref.jsonl"):
            rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
            (run / name).write_text("".join(json.dumps({**r, "step": moved[r["step"]]}) + "\n" for r in rows))
    write_report(path, figures=False)
    best = pd.read_csv(path / "best.csv").set_index("label")
    # chosen beta 0.05 (KL 6 t / T): the last checkpoint under KL 2 is position 5 of 8: steps 7 (draw 0) and 6 (draw 1)
    assert best.loc["dpo", "cells"] == "2/2" and best.loc["dpo", "step"] == pytest.approx(6.5)
    verdict = _row(pd.read_csv(path / "verdicts.csv"), "ppo", "dpo", "best")
    assert np.isfinite(verdict["diff"])
    frontier = pd.read_csv(path / "frontier.csv")
    assert (frontier.loc[frontier["label"] == "dpo", "cells"] == 2).all()
    assert frontier.loc[frontier["label"] == "dpo", "step"].max() == pytest.approx(24.5)


def test_a_family_label_without_evaluated_runs_is_named_not_silently_dropped(tmp_path):
    path = make_run_dir(tmp_path / "run", labels=ORACLE_AHEAD, draws=2, seeds=(0, 1), n_eval=6, n_val=4, bon_n=4)
    for eval_file in (path / "runs" / "dpo").rglob("eval.jsonl"):
        eval_file.unlink()
    markdown = write_report(path, figures=False)
    assert "**Verdicts withheld**" not in markdown and "(no finished evaluated run, so no rows: dpo)" in markdown
    assert "dpo" not in set(pd.read_csv(path / "verdicts.csv")[["A", "B"]].to_numpy().ravel())


def test_single_replicate_rows_say_so_and_a_draw_count_mismatch_is_a_problem(tmp_path):
    path = make_run_dir(tmp_path / "run", labels=ORACLE_AHEAD, draws=1, seeds=(0,), n_eval=6, n_val=4, bon_n=4)
    bench = json.loads((path / "bench.json").read_text())
    bench["config"]["draws"] = 3
    (path / "bench.json").write_text(json.dumps(bench))
    markdown = write_report(path, figures=False)
    verdicts = pd.read_csv(path / "verdicts.csv")
    measured = verdicts[verdicts["diff"].notna()]
    assert len(measured) and (measured["verdict"] == "n/a: no interval from a single replicate (one draw, one "
                                                     "seed)").all() and verdicts["p"].isna().all()
    assert "(no interval)" in markdown and "nan" not in markdown.split("## Verdicts")[1]
    assert "bench.json: config.draws = 3 but draws/ holds draw0" in (path / "results.md").read_text()


def test_jsonl_rows_keep_unicode_line_separators(tmp_path):
    """A sampled response may hold U+2028 or U+0085 (the run directory is written with ensure_ascii=False); both
    readers split rows on "\\n" only, so such a row reads back whole (str.splitlines broke it in two and the report
    dropped it as unreadable). Ported from perf's test of the old bench reader (tests/test_bench.py, deleted)."""
    from prefopt.bench.files import read_jsonl, write_jsonl
    from prefopt.bench.report.reading import RunDir

    rows = [{"i": 0, "response": "a\u2028b\x85c\u2029d"}, {"i": 1, "response": "plain"}]
    path = tmp_path / "eval.jsonl"
    write_jsonl(path, rows)
    assert "\u2028" in path.read_text(encoding="utf-8") and read_jsonl(path) == rows
    data = RunDir(tmp_path)
    assert data.jsonl(path, keys=("i",)) == rows and data.problems == []
