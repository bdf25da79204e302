"""prefopt.bench.report end to end: results.md, CSVs and figures from a synthetic run directory alone
(tests/report_rundir.py), numbers recomputed by hand from the files, gates that withhold verdicts, and a report
that is always written, with what it could not read listed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prefopt.bench.report import write_report
from prefopt.cli import main
from report_rundir import write_run_dir

T_975_2 = 4.302653  # Student's t, 2 degrees of freedom (3 draws), two-sided 95%


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_run_dir(tmp_path_factory.mktemp("bench") / "run", fail="dpo/beta=4/draw1/seed0")
    write_report(path)
    return path


def _eval(path: Path, run_id: str) -> pd.DataFrame:
    return pd.read_json(path / "runs" / run_id / "eval.jsonl", lines=True)


def test_results_open_with_the_gates_then_the_verdicts_and_every_table_is_a_csv(report):
    text = (report / "results.md").read_text()
    assert text.index("## Gates") < text.index("## Verdicts") < text.index("## Frontiers") < text.index("## Manifest")
    for name in ("gates", "verdicts", "frontier", "fits", "best", "footing", "pref", "runs"):
        assert not pd.read_csv(report / f"{name}.csv").empty, name
    for name in ("reward_vs_kl.png", "training_curves.png"):
        assert (report / name).stat().st_size > 10_000, name
    gates = pd.read_csv(report / "gates.csv").set_index("gate")["status"].to_dict()
    assert [status for gate, status in gates.items() if gate.startswith(("proxy", "oracle", "learning"))] == \
        ["pass"] * 3
    assert gates["runs finished"] == "flag" and "dpo/beta=4/draw1/seed0" in text  # the failed run is named


def test_best_point_verdict_recomputed_by_hand_from_the_files(report):
    verdicts = pd.read_csv(report / "verdicts.csv")
    row = verdicts[(verdicts["A"] == "ppo") & (verdicts["B"] == "dpo") & verdicts["at"].str.startswith("best")].iloc[0]
    # the chosen setting (manifest: 2) at its last checkpoint whose mean KL over the cells is <= the budget 4
    diffs = []
    for draw in range(3):
        means = {}
        for label, knob in (("ppo", "kl_coef"), ("dpo", "beta")):
            runs = [_eval(report, f"{label}/{knob}=2/draw{draw}/seed{s}") for s in range(2)]
            kl = pd.concat(runs).groupby("step")["kl"].mean()
            step = kl[kl <= 4.0].index.max()
            means[label] = np.mean([r[r["step"] == step]["gold"].mean() for r in runs])
        diffs.append(means["ppo"] - means["dpo"])
    half = T_975_2 * np.std(diffs, ddof=1) / math.sqrt(3)
    assert (row["diff"], row["lo"], row["hi"]) == pytest.approx((np.mean(diffs), np.mean(diffs) - half,
                                                                 np.mean(diffs) + half), abs=1e-6)
    assert row["p holm"] >= row["p"] and row["unit"] == "draws"


def test_matched_kl_rows_rest_on_measured_brackets(report):
    verdicts = pd.read_csv(report / "verdicts.csv")
    at_kl = verdicts[verdicts["at"].str.startswith("KL")]
    assert len(at_kl) == 6 and at_kl["verdict"].str.startswith("n/a").sum() == 2  # best-of-n stops at KL 1.84
    for row in at_kl[at_kl["diff"].notna()].itertuples():
        k = float(row.at.split()[1])
        for bracket in (getattr(row, "_4"), getattr(row, "_5")):  # "A KL", "B KL": mean KLs of the two checkpoints
            low, high = map(float, bracket.split("-"))
            assert low <= k + 0.1 and high >= k - 0.1 and high > low, (row.A, row.B, bracket)
    tested = verdicts["p"].notna()
    assert tested.sum() == 7 and set(verdicts.loc[tested, "verdict"]) <= {"better", "worse", "inconclusive"}


def test_best_of_n_at_n_max_is_the_proxy_argmax(report):
    frontier = pd.read_csv(report / "frontier.csv")
    bon = frontier[(frontier["label"] == "best_of_n") & (frontier["step"] == 16)].iloc[0]
    picked = []
    for draw in range(3):
        samples = pd.read_json(report / "draws" / f"draw{draw}" / "best_of_n.jsonl", lines=True)
        picked += [group.loc[group["proxy"].idxmax(), "gold"] for _, group in samples.groupby("i")]
    assert bon["gold"] == pytest.approx(np.mean(picked)) and bon["kl"] == pytest.approx(math.log(16) - 15 / 16)


def test_equal_footing_reads_run_costs(report):
    footing = pd.read_csv(report / "footing.csv").set_index("label")
    assert footing.loc["dpo", "runs"] == 17 and footing.loc["dpo", "samples"] == 0  # one dpo run failed
    assert footing.loc["dpo", "labels_consumed"] == 120 and footing.loc["ppo", "samples"] == 1024


def test_failed_or_unchecked_gates_withhold_the_verdicts(tmp_path):
    path = write_run_dir(tmp_path / "run", draws=2, prompts=6, proxy_accuracy=0.6, oracle=False)
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
    path = write_run_dir(tmp_path / "run", draws=2, prompts=6)
    (path / "runs" / "ppo" / "kl_coef=1" / "draw0" / "seed0" / "run.json").unlink()
    eval_file = path / "runs" / "dpo" / "beta=2" / "draw1" / "seed1" / "eval.jsonl"
    eval_file.write_text(eval_file.read_text() + "{not json\n")
    (path / "draws" / "draw1" / "proxy.json").unlink()
    (path / "draws" / "draw0" / "best_of_n.jsonl").unlink()
    assert main(["bench", "report", str(path)]) == 0
    text = (path / "results.md").read_text()
    problems = text[text.index("## Problems"):]
    assert "draws/draw1/proxy.json: missing" in problems
    assert "beta=2/draw1/seed1/eval.jsonl: 1 unreadable line(s) skipped (first: line 49; each needs step, i, kl)" \
        in problems
    assert "ppo/kl_coef=1/draw0/seed0 | ppo | main | 1 | 0 | 0 | 3e-05 | missing | run.json not written" in text
    assert "gates" in capsys.readouterr().out.lower()
    assert main(["bench", "report", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
