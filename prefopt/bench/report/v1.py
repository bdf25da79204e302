"""The report of a bench run, built only from the files the runs wrote (prefopt.bench.tables).

results.md opens with the verdict table (A vs B at matched KL and at each one's val-selected best point), then the
frontier plot and table with Gao et al.'s fitted coefficients, the step-matched and compute-matched views with
every budget counter, the learning-rate sweep, the per-seed table, the reward-hacking diagnostics with the
samples that show them, and the notes of the protocol. CSV files hold every table; manifest.json pins the
config, splits, seeds, versions, commit, host and the chosen learning rates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd


def write_report(bench: Any, total_s: float) -> str:
    """results.md / *.csv / plots / samples / manifest of a bench run (``bench``: prefopt.bench.plan.Bench);
    returns the verdict table as markdown."""
    from prefopt.bench.data import read_jsonl
    from prefopt.bench.diagnostics import flagged_samples
    from prefopt.bench.manifest import manifest
    from prefopt.bench.plots import plot_compute, plot_frontiers, plot_training_curves
    from prefopt.bench.tables import bench_tables, compute_curves

    cfg, run_dir = bench.cfg, bench.run_dir
    tables = bench_tables(run_dir, cfg)
    for name in ("verdicts", "frontier", "fits", "final", "compute", "per_seed", "diagnostics", "lr_sweep"):
        tables[name].to_csv(run_dir / f"{name}.csv", index=False)
    tables["per_seed"].to_csv(run_dir / "results.csv", index=False)
    if not tables["frontier"].empty:
        plot_frontiers(run_dir / "reward_vs_kl.png", tables["frontier"], tables["fits"], tables["start_gold"],
                       bench.reward_name, list(cfg.frontier.kl_levels))
        curves = compute_curves(tables["logs"])
        if not curves.empty and curves["flops"].notna().any():
            plot_compute(run_dir / "gold_vs_flops.png", curves, tables["start_gold"], bench.reward_name)
    final_dirs: dict[str, dict[int, Path]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    for run in bench.runs:
        if run.status == "done" and tables["best"].get(run.label) == run.value or (
                run.value is None and run.label in tables["best"]):
            final_dirs.setdefault(run.label, {})[run.seed] = run.directory
            if run.label not in samples and (run.directory / "eval.jsonl").is_file():
                rows = [r for r in read_jsonl(run.directory / "eval.jsonl") if r["set"] == "eval"]
                last = max(r["step"] for r in rows)
                samples[run.label] = [r for r in rows if r["step"] == last]
    if final_dirs:
        plot_training_curves(run_dir / "training_curves.png", final_dirs)
    start_samples = read_jsonl(run_dir / "eval" / "start_samples.jsonl")
    write_samples(run_dir / "samples.md", start_samples, samples, cfg.eval.samples_shown, bench.reward_name)
    hacking = flagged_samples(tables["diagnostics"], tables["logs"].prompts, tables["start"]) \
        if not tables["diagnostics"].empty else []
    verdicts = verdict_markdown(tables["verdicts"])
    text = [f"# prefopt bench: {cfg.name}", "", "## Verdicts", "", _verdict_note(cfg), "", verdicts, "",
            "## Frontiers: gold reward vs KL", "", "![reward vs KL](reward_vs_kl.png)", "",
            markdown_table(_frontier_view(tables["frontier"])), "",
            "Gao et al. 2022 functional forms (d = sqrt(KL), R = gold - gold(start)):", "",
            markdown_table(tables["fits"]), "",
            "## Step-matched view (val-selected knob value, last step) and budgets", "",
            markdown_table(_with_ci(tables["final"], "gold")), "",
            "## Compute-matched view (gold at the same training FLOPs)", "",
            markdown_table(_with_ci(tables["compute"], "gold", "gold_at_budget")), "", "![gold vs FLOPs](gold_vs_flops.png)",
            "", "## Learning-rate sweep (val prompts, last step)", "", markdown_table(tables["lr_sweep"]), "",
            "## Per seed (last step of every main run)", "", markdown_table(tables["per_seed"]), "",
            "## Reward-hacking diagnostics", "", _diagnostics_note(cfg), "",
            markdown_table(tables["diagnostics_summary"]), "", *hacking,
            "## Start stages (wall / CPU seconds of the build, cached or not)", "", markdown_table(_start_table(bench)), "",
            "## Notes", "", *_notes(bench), "",
            "## Time spent by this invocation (s)", "", markdown_table(_times(bench, total_s)), ""]
    (run_dir / "results.md").write_text("\n".join(text))
    (run_dir / "manifest.json").write_text(json.dumps(manifest(bench, total_s), indent=2, default=str))
    return verdicts


def verdict_markdown(verdicts: pd.DataFrame) -> str:
    if verdicts.empty:
        return "(no comparisons: fewer than two labels)"
    rows = []
    for row in verdicts.to_dict("records"):
        diff = row.get("diff", float("nan"))
        measured = isinstance(diff, float) and not math.isnan(diff)
        rows.append({"A": row["A"], "B": row["B"], "at": row["at"], "A between KL": _text(row.get("A between KL")),
                     "B between KL": _text(row.get("B between KL")),
                     "gold A - B": f"{diff:+.4f}" if measured else "",
                     "95% CI": f"[{row['lo']:+.4f}, {row['hi']:+.4f}]" if measured else "",
                     "p": f"{row['p']:.4f}" if measured else "", "verdict": row["verdict"]})
    return markdown_table(pd.DataFrame(rows))


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _verdict_note(cfg: Any) -> str:
    return (f"A vs B on the same {cfg.eval.num_prompts} eval prompts and sampling seeds, paired per prompt and "
            f"training seed ({len(cfg.seeds)} seeds); matched KL: each seed's gold interpolated along all of its "
            "points (knob values x checkpoints, start at 0) at that KL; best: each algorithm at its knob value of "
            "highest val gold (last step). 95% CI and two-sided p from a seeds x prompts bootstrap "
            f"({cfg.frontier.bootstrap} resamples); better / worse when the CI excludes 0; no multiple-comparison "
            "correction. `between KL`: the seed-mean KLs of the two measured points a matched value is interpolated "
            "between; a range from 0 (the start) to a far first checkpoint is a straight chord, not a measured curve.")


def _diagnostics_note(cfg: Any) -> str:
    d = cfg.diagnostics
    return (f"Flags (prefopt/bench/diagnostics.py): gold-proxy gap_z > {d.gap_z}; length ratio > {d.length_ratio} or "
            f"< {1 / d.length_ratio:.2f}; entropy ratio < {d.entropy_ratio}; KL acceleration > {d.kl_acceleration} with "
            "final KL > 1 nat. Columns: mean over seeds; `flagged`: seeds flagged / seeds.")


def _frontier_view(frontier: pd.DataFrame) -> pd.DataFrame:
    if frontier.empty:
        return frontier
    view = frontier.copy()
    view["gold 95% CI"] = [f"[{lo:.3f}, {hi:.3f}]" if not pd.isna(lo) else "" for lo, hi in
                           zip(view.get("gold_lo", pd.Series(dtype=float)), view.get("gold_hi", pd.Series(dtype=float)))]
    keep = ["label", "value", "step", "n_seeds", "kl", "gold", "gold 95% CI", "proxy", "length", "entropy"]
    return view[[c for c in keep if c in view]]


def _with_ci(frame: pd.DataFrame, prefix: str, column: str | None = None) -> pd.DataFrame:
    if frame.empty:
        return frame
    view = frame.copy()
    column = column or prefix
    view[f"{column} 95% CI"] = [f"[{lo:.3f}, {hi:.3f}]" if not pd.isna(lo) else "" for lo, hi in
                                zip(view[f"{prefix}_lo"], view[f"{prefix}_hi"])]
    return view.drop(columns=[f"{prefix}_lo", f"{prefix}_hi"])


def _start_table(bench: Any) -> pd.DataFrame:
    rows = []
    for stage in bench.start.stages:
        record = stage.record()
        rows.append({"stage": stage.name, "key": stage.key[:16], "this run": "built" if stage.name in bench.built
                     else "cached", "wall_s": record.get("wall_s"), "cpu_s": record.get("cpu_s"),
                     "summary": _stage_eval(record.get("summary", {}))})
    return pd.DataFrame(rows)


def _times(bench: Any, total_s: float) -> pd.DataFrame:
    rows = [{"task": name, **cost} for name, cost in bench.times.items()]
    rows.append({"task": "bench total (this invocation)", "wall_s": total_s})
    return pd.DataFrame(rows)


def _notes(bench: Any) -> list[str]:
    from prefopt.bench.manifest import cpu_count, device, load_average, torch_threads

    cfg = bench.cfg
    gen = cfg.eval.generation
    notes = [
        f"- task `{cfg.task}`; online algorithms optimise the {'proxy RM' if cfg.reward == 'proxy_rm' else 'known reward'};"
        f" quality is the {bench.reward_name} of one sample per eval prompt ({len(bench.data.eval_prompts)} prompts,"
        f" max_new_tokens {gen.max_new_tokens}, temperature {gen.temperature}, seed {cfg.eval.seed} + batch).",
        "- `kl`: mean over eval samples of sum_t log pi - log pi_start on the sampled tokens; best-of-n at its"
        " analytic KL log n - (n-1)/n, its n draws ranked by the proxy RM.",
        f"- budget: every algorithm the same `train.max_steps` unless its recipe says otherwise; `updates` counts the"
        " optimizer updates actually made (PPO: epochs x minibatches per step), `samples_generated` the sampled"
        " responses, `tokens` the tokens the updates processed, `flops` = tokens x the FLOPs per token counted"
        " exactly (torch.utils.flop_counter: sampling, reference, reward model and updates) on a short probe run"
        " of the same recipe, `wall_s` / `cpu_s` the run's wall time and this process's CPU time.",
        f"- learning rates chosen on the val prompts from {list(cfg.lr_sweep.learning_rates) or 'no sweep'}"
        " (manifest: `learning_rates`).",
        f"- host: {device()}, {cpu_count()} CPUs, {cfg.threads or torch_threads()} thread(s); load average (1/5/15 min)"
        f" at start {bench.load_at_start}, at the report {load_average()} (on a shared machine `cpu_s` is steadier"
        " than `wall_s`).",
    ]
    for stage in bench.start.stages:
        summary = stage.record().get("summary") or {}
        if stage.name == "labels" and "policy_train" in summary:
            part = summary["policy_train"]
            notes.append(f"- world labels (policy_train): {part['prompts']} prompts x {cfg.world.responses_per_prompt}"
                         f" responses, {part['pairs']} implied pairs; agreement of the noisy labels with the true order"
                         f" {part['label_agreement_with_true_reward']:.3f} (tau {cfg.world.label_temperature}); the"
                         f" start's mean true reward {part['start_true_reward']:.3f}; lambda {cfg.world.penalty}.")
        if stage.name == "proxy_rm" and "eval/accuracy" in summary:
            notes.append(f"- proxy RM: accuracy {summary['eval/accuracy']:.3f} on the val pairs' noisy labels.")
    for label, message in bench.skipped.items():
        notes.append(f"- **skipped {label}**: {message}")
    for run in bench.runs + bench.sweep_runs:
        if run.status == "failed":
            notes.append(f"- **failed {run.directory.relative_to(bench.run_dir)}**: {run.error.splitlines()[0]}")
    return notes


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e6 else f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which this project does not depend on)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])




def _stage_eval(summary: dict[str, Any]) -> str:
    """The held-out metric of a start stage's summary.json, e.g. "eval/accuracy 0.61"."""
    for key in ("eval/accuracy", "eval/perplexity", "eval/nll"):
        if key in summary:
            return f"{key} {summary[key]:.3f}"
    return ""




def write_samples(path: Path, start_samples: list[dict[str, Any]], samples: dict[str, list[dict[str, Any]]],
                  count: int, reward_name: str) -> None:
    """The first ``count`` eval prompts with the start's and every algorithm's response and gold score."""
    lines = ["# Sample generations", "",
             f"First {count} eval prompts; responses sampled with the evaluation seed; `{reward_name}` in brackets.", ""]
    for i, start in enumerate(start_samples[:count]):
        prompt = start["prompt"][-600:]
        lines += [f"## Prompt {i + 1}", "", "```", prompt.strip(), "```", "",
                  f"- **start (SFT)** [{start['gold']:.3f}]: {_one_line(start['response'])}"]
        for label, rows in samples.items():
            if i < len(rows):
                lines.append(f"- **{label}** [{rows[i]['gold']:.3f}, KL {rows[i]['kl']:.2f}]: "
                             f"{_one_line(rows[i]['response'])}")
        lines.append("")
    path.write_text("\n".join(lines))


def _one_line(text: str, limit: int = 400) -> str:
    text = text.replace("\n", "⏎ ").strip()
    return (text[:limit] + " …") if len(text) > limit else text or "(empty)"
