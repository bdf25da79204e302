"""Tables and plots of a bench run, built only from the files the runs wrote.

Per (algorithm, seed): the evaluation (``eval.json``), and the cost read from the run's own logs:
``s_per_step`` = mean of ``perf/step_s`` over the rows of metrics.jsonl (one row per step), ``tokens_per_s`` =
mean of ``perf/tokens_per_s`` over the same rows, ``train_s`` and ``peak_mem_mb`` from summary.json (the
training loop's wall time and the subprocess's peak RSS / CUDA max allocated), ``wall_s`` and ``cpu_s`` the whole
subprocess's wall and CPU (user + system) seconds, start-up and saving included (from run.json).

Aggregates over seeds: mean and the half-width of a 95% Student-t confidence interval,
``t_{0.975, n-1} * sd / sqrt(n)`` (no interval for n = 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

QUALITY = ["gold_reward", "proxy_reward", "kl", "win_rate", "pref_acc", "pref_acc_logprob", "length"]
COST = ["steps", "s_per_step", "tokens_per_s", "train_s", "wall_s", "cpu_s", "peak_mem_mb"]
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042]
"""Two-sided 95% Student-t quantiles for 1..30 degrees of freedom (1.96 beyond)."""


def t_quantile(df: int) -> float:
    return T_975[df - 1] if 1 <= df <= len(T_975) else 1.96


def ci_halfwidth(values: pd.Series) -> float:
    values = values.dropna()
    n = len(values)
    if n < 2:
        return float("nan")
    return t_quantile(n - 1) * float(values.std(ddof=1)) / math.sqrt(n)


def run_costs(run_dir: Path) -> dict[str, float]:
    """Cost of one Trainer run from its metrics.jsonl, summary.json and the bench's run.json."""
    from prefopt.metrics import read_metrics

    metrics = read_metrics(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = metrics["perf/step_s"].dropna() if "perf/step_s" in metrics else pd.Series(dtype=float)
    tokens = metrics["perf/tokens_per_s"].dropna() if "perf/tokens_per_s" in metrics else pd.Series(dtype=float)
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    return {"steps": float(summary.get("step", len(steps))), "s_per_step": float(steps.mean()),
            "tokens_per_s": float(tokens.mean()), "train_s": float(summary.get("perf/train_s", float("nan"))),
            "wall_s": float(run.get("wall_s", float("nan"))), "cpu_s": float(run.get("cpu_s", float("nan"))),
            "peak_mem_mb": float(summary.get("perf/peak_mem_mb", float("nan")))}


def per_seed_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    columns = ["algorithm", "name", "seed", "status"] + [c for c in QUALITY + COST if c in frame]
    return frame[[c for c in columns if c in frame]]


def aggregate(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI half-width over seeds of every metric, per algorithm (finished runs only)."""
    done = per_seed[per_seed["status"] == "done"]
    out = []
    for algorithm, group in done.groupby("algorithm", sort=False):
        row: dict[str, Any] = {"algorithm": algorithm, "name": group["name"].iloc[0], "n_seeds": len(group)}
        for column in QUALITY + COST:
            if column in group and group[column].notna().any():
                row[column] = float(group[column].mean())
                row[f"{column}_ci"] = ci_halfwidth(group[column])
        out.append(row)
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------------ the report


def write_report(bench: Any, total_s: float) -> str:
    """results.csv / results_agg.csv / results.md, the plots, samples and the manifest of a bench run
    (``bench``: prefopt.bench.runner.Bench); returns the mean ± CI table as markdown."""
    from prefopt.bench.data import read_jsonl, write_jsonl
    from prefopt.bench.manifest import manifest

    cfg, run_dir = bench.cfg, bench.run_dir
    if "start" not in bench.evals:
        bench._eval_start()
    start_stage = next((s.name for s in bench.start.stages if s.model == bench.start.policy), "model")
    rows = [{"algorithm": "start", "name": start_stage,
             "seed": None, "status": "done", **bench.evals["start"]["metrics"]}]
    curves: dict[str, dict[int, Path]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    for run in bench.runs:
        row: dict[str, Any] = {"algorithm": run.label, "name": run.name, "seed": run.seed, "status": run.status}
        result = bench.evals.get(f"{run.label}/{run.seed}")
        if run.status == "done" and result is not None:
            row.update(result["metrics"])
            row.update(run_costs(run.directory))
            curves.setdefault(run.label, {})[run.seed] = run.directory
            if run.label not in samples:
                samples[run.label] = read_jsonl(run.directory / "samples.jsonl")
        else:
            row["status"] = "failed" if run.status == "failed" else run.status
        rows.append(row)
    per_seed = per_seed_table(rows)
    per_seed["seed"] = per_seed["seed"].astype("Int64")
    agg = aggregate(per_seed)
    per_seed.to_csv(run_dir / "results.csv", index=False)
    agg.to_csv(run_dir / "results_agg.csv", index=False)

    stage_rows = [{"task": name, **cost} for name, cost in bench.times.items()]
    stage_rows.append({"task": "bench total (this invocation)", "wall_s": total_s})
    stages = pd.DataFrame(stage_rows)
    start_rows = []
    for stage in bench.start.stages:
        record = stage.record()
        start_rows.append({"stage": stage.name, "key": stage.key[:16],
                           "this run": "built" if stage.name in bench.built else "cached",
                           "wall_s": record.get("wall_s"), "cpu_s": record.get("cpu_s"),
                           "eval": _stage_eval(record.get("summary", {}))})
    start_table = pd.DataFrame(start_rows)
    notes = _notes(bench)
    write_markdown(run_dir / "results.md", f"prefopt bench: {cfg.name}", per_seed, agg, notes, stages,
                          start_table)
    start_metrics = bench.evals["start"]["metrics"]
    trained = per_seed[per_seed["algorithm"] != "start"]
    agg_trained = agg[agg["algorithm"] != "start"] if not agg.empty else agg
    plot_reward_vs_kl(run_dir / "reward_vs_kl.png", trained, agg_trained, start_metrics, bench.reward_name)
    plot_training_curves(run_dir / "training_curves.png", curves)
    start_samples = read_jsonl(run_dir / "eval" / "start_samples.jsonl")
    write_samples(run_dir / "samples.md", start_samples, samples, cfg.eval.samples_shown, bench.reward_name)
    shown = [{"algorithm": label, **row} for label, rows in {"start": start_samples, **samples}.items()
             for row in rows[:cfg.eval.samples_shown]]
    write_jsonl(run_dir / "samples.jsonl", shown)
    (run_dir / "manifest.json").write_text(json.dumps(manifest(bench, total_s), indent=2, default=str))
    columns = ["algorithm", "n", "gold_reward", "kl", "win_rate", "pref_acc", "s_per_step", "peak_mem_mb"]
    table = mean_ci_table(agg)
    return markdown_table(table[[c for c in columns if c in table]])


def _stage_eval(summary: dict[str, Any]) -> str:
    """The held-out metric of a start stage's summary.json, e.g. "eval/accuracy 0.61"."""
    for key in ("eval/accuracy", "eval/perplexity", "eval/nll"):
        if key in summary:
            return f"{key} {summary[key]:.3f}"
    return ""


def _notes(bench: Any) -> list[str]:
    from prefopt.bench.manifest import cpu_count, device, load_average, torch_threads

    cfg = bench.cfg
    gen = cfg.eval.generation
    notes = [
        f"- task `{cfg.task}`; online algorithms optimise the {'proxy RM' if cfg.reward == 'proxy_rm' else 'known reward'};"
        f" quality is the {bench.reward_name} of responses to {len(bench.data.eval_prompts)} eval prompts"
        f" (max_new_tokens {gen.max_new_tokens}, temperature {gen.temperature}, seed {cfg.eval.seed} + batch).",
        "- `kl`: mean over eval samples of sum_t log pi - log pi_SFT on the sampled tokens; `win_rate`: gold score"
        " above the start's sample for the same prompt (ties 1/2).",
        f"- `pref_acc`: implicit-reward accuracy log pi/pi_SFT(chosen) > log pi/pi_SFT(rejected) on"
        f" {len(bench.data.eval_pairs)} eval pairs (ties 1/2; the start scores 0.5); `pref_acc_logprob`: plain"
        " log-prob ranking.",
        f"- seeds {cfg.seeds}; CI: 95% Student-t over seeds. Cost: `s_per_step` and `tokens_per_s` are means over"
        " the steps in metrics.jsonl, `train_s` the training loop, `wall_s` the whole subprocess, `peak_mem_mb`"
        " its peak RSS (CPU) or CUDA max allocated.",
    ]
    notes.append(f"- host: {device()}, {cpu_count()} CPUs, {cfg.threads or torch_threads()} thread(s) per run; load"
                 f" average (1/5/15 min) at start {bench.load_at_start}, at the report {load_average()}"
                 " (timings on a shared machine are noisy: `cpu_s` is steadier than `wall_s`).")
    for label, message in bench.skipped.items():
        notes.append(f"- **skipped {label}**: {message}")
    for run in bench.runs:
        if run.status == "failed":
            notes.append(f"- **failed {run.label} seed {run.seed}**: see {run.directory / 'train.log'}")
    return notes


# ------------------------------------------------------------------------------------------------ markdown


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which this project does not depend on)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def mean_ci_table(agg: pd.DataFrame) -> pd.DataFrame:
    """``mean ± ci`` strings per metric, for results.md."""
    columns = {"algorithm": agg["algorithm"], "n": agg["n_seeds"]}
    for column in QUALITY + COST:
        if column not in agg:
            continue
        columns[column] = [_fmt(m) + (f" ± {_fmt(c)}" if not math.isnan(c) else "")
                           if not math.isnan(m) else "" for m, c in zip(agg[column], agg[f"{column}_ci"])]
    return pd.DataFrame(columns)


def write_markdown(path: Path, title: str, per_seed: pd.DataFrame, agg: pd.DataFrame, notes: list[str],
                   stages: pd.DataFrame, start: pd.DataFrame) -> None:
    text = [f"# {title}", "", *notes, "",
            "## Mean ± 95% CI over seeds", "", markdown_table(mean_ci_table(agg)), "",
            "## Per seed", "", markdown_table(per_seed), "",
            "## Start stages (wall / CPU seconds of the build, cached or not)", "", markdown_table(start), "",
            "## Time spent by this invocation (s; cached / finished tasks are not listed; cpu_s: the subprocess's user + system CPU)", "", markdown_table(stages), ""]
    path.write_text("\n".join(text))


# ------------------------------------------------------------------------------------------------ plots


def plot_reward_vs_kl(path: Path, per_seed: pd.DataFrame, agg: pd.DataFrame, start: dict[str, float],
                      reward_name: str) -> None:
    """Gold reward vs KL(pi || pi_0): every seed a small point, the seed mean with CI bars a large one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    done = per_seed[per_seed["status"] == "done"]
    for i, (algorithm, group) in enumerate(done.groupby("algorithm", sort=False)):
        color = colors[i % len(colors)]
        ax.scatter(group["kl"], group["gold_reward"], color=color, alpha=0.5, s=22)
        for _, row in group.iterrows():
            ax.annotate(str(row["seed"]), (row["kl"], row["gold_reward"]), fontsize=7, alpha=0.6,
                        xytext=(3, 3), textcoords="offset points")
        mean = agg[agg["algorithm"] == algorithm].iloc[0]
        xerr = None if math.isnan(mean["kl_ci"]) else mean["kl_ci"]
        yerr = None if math.isnan(mean["gold_reward_ci"]) else mean["gold_reward_ci"]
        ax.errorbar(mean["kl"], mean["gold_reward"], xerr=xerr, yerr=yerr, fmt="o", color=color, ms=8,
                    capsize=3, label=algorithm)
    ax.scatter([start["kl"]], [start["gold_reward"]], marker="*", s=160, color="black", label="start", zorder=5)
    ax.set_xlabel("KL(pi || pi_start) per sequence (nats, sampled tokens)")
    ax.set_ylabel(f"{reward_name} on eval prompts")
    ax.set_title(f"{reward_name} vs KL to the start (points: seeds; bars: 95% CI)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CURVE_KEYS = ["reward/total", "reward/score", "rewards/margin", "rewards/accuracy", "train/grad_norm"]


def plot_training_curves(path: Path, runs: dict[str, dict[int, Path]]) -> None:
    """Per algorithm: train/loss and its main progress metric against the step, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefopt.metrics import read_metrics

    labels = list(runs)
    fig, axes = plt.subplots(len(labels), 2, figsize=(10, 2.6 * max(len(labels), 1)), squeeze=False)
    for row, label in enumerate(labels):
        for seed, run_dir in sorted(runs[label].items()):
            frame = read_metrics(run_dir / "metrics.jsonl")
            frame = frame[frame["train/loss"].notna()] if "train/loss" in frame else frame.iloc[0:0]
            if frame.empty:
                continue
            axes[row, 0].plot(frame["step"], frame["train/loss"], label=f"seed {seed}", lw=1)
            key = next((k for k in CURVE_KEYS if k in frame and frame[k].notna().any()), None)
            if key is not None:
                axes[row, 1].plot(frame["step"], frame[key], label=f"seed {seed}", lw=1)
                axes[row, 1].set_ylabel(key, fontsize=8)
        axes[row, 0].set_ylabel(f"{label}\ntrain/loss", fontsize=8)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        axes[row, 0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ samples


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
