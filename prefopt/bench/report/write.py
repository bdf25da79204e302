"""results.md, the CSVs and the figures of a bench run, from its run directory alone (``write_report(run_dir)``).

results.md opens with the gates; a blocking gate that does not pass replaces the verdicts with its failure and
numbers (HH without a credible gold RM is titled a smoke test). Then the verdict table (every row of the declared
family with its measured KL brackets), the frontier figure, the best points under the KL budget, the frontier table
(length and conditional accuracy beside every point), Gao et al.'s fits, preference accuracy, the equal-footing
table, the training curves, every run, the manifest, and whatever could not be read. Every table is also a CSV.
A section that cannot be computed says so in place (and in ``problems``); the report is always written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from prefopt.bench.report import tables as t
from prefopt.bench.report.curves import BON, Arrays, build, column
from prefopt.bench.report.gates import all_gates, gate_table
from prefopt.bench.report.reading import RunDir, chosen_settings, config, read_run_dir
from prefopt.bench.report.verdicts import decided_text, length_slope, seeds_note, summary_table, verdict_table


def write_report(run_dir: str | Path, figures: bool = True) -> str:
    """Write results.md, *.csv and (``figures``) *.png into ``run_dir``; returns the markdown of the gates and the
    verdicts."""
    data = read_run_dir(run_dir)
    if not data.path.is_dir():
        return f"# prefopt bench report\n\n{data.path} is not a directory.\n"
    task = str(data.bench.get("task", "world"))
    kl_levels = [float(k) for k in config(data, "frontier", "kl_levels", [])]
    budget = float(config(data, "select", "kl_budget", max(kl_levels, default=math.inf)))
    try:
        arrays = build(data, config(data, "frontier", "best_of_n", None))
    except Exception as exc:  # malformed rows: the report still says what it could read
        data.problems.append(f"the runs' evaluations could not be assembled ({type(exc).__name__}: {exc})")
        arrays = Arrays(np.array([]), sorted(data.draws), {}, {}, [])
    slope = length_slope(arrays, data.best_of_n)
    chosen = chosen_settings(data)
    gates = all_gates(data, arrays, task, budget, slope, chosen)
    withheld = [g for g in gates if g.withholds]
    smoke = task == "hh" and any(g.name.startswith("gold RM") and g.status != "pass" for g in gates)
    family = [label for label, meta in data.labels.items() if not (meta or {}).get("oracle_of")] or \
        [label for label, entry in arrays.labels.items() if entry.phase == "main" and label != BON]
    family += [BON] if BON in arrays.labels else []
    out: dict[str, pd.DataFrame] = {"gates": gate_table(gates)}
    sections = {}

    def section(name: str, make: Callable[[], list[str]]) -> None:
        try:
            sections[name] = make()
        except Exception as exc:  # one section's failure must not lose the rest of the report
            message = f"{name}: could not be computed ({type(exc).__name__}: {exc})"
            data.problems.append(message)
            sections[name] = [message, ""]

    def verdicts() -> list[str]:
        table = verdict_table(arrays, family, kl_levels, budget, slope, chosen)
        flags = [(g.short or g.name, set(g.labels)) for g in gates if g.status == "flag"]
        if not table.empty:
            table["flags"] = ["; ".join(f"{word}: {', '.join(sorted(names & {a, b}))}" for word, names in flags
                                        if names & {a, b}) for a, b in zip(table["A"], table["B"])]
            if withheld:
                table.loc[table["verdict"].isin(["better", "worse", "inconclusive"]), "verdict"] = "withheld"
        out["verdicts"] = table
        head = _verdict_note(family, kl_levels, budget, arrays, slope)
        if withheld:
            return ["**Verdicts withheld**: " + "; ".join(f"gate `{g.name}`: {g.status} ({g.numbers})"
                                                        for g in withheld), "",
                    "The measured differences are in verdicts.csv (verdict `withheld`); they are not verdicts.", ""]
        out["summary"] = summary_table(arrays, kl_levels, budget, chosen)
        return [decided_text(table), "", "Gold of every label at each point (matched KL: the upper envelope over its "
                "settings per cell; oracles for reference; 95% intervals over draws; n/a: the cells that reach "
                "it):", "",
                t.markdown_table(_summary_view(out["summary"])), "", head, "",
                t.markdown_table(_verdict_view(table)), ""]

    def frontier() -> list[str]:
        out["frontier"] = t.frontier_table(arrays, slope)
        out["fits"] = t.fits_table(out["frontier"], arrays) if not out["frontier"].empty else pd.DataFrame()
        out["best"] = t.best_table(arrays, budget, slope, chosen)
        if figures and not out["frontier"].empty:
            from prefopt.bench.report.plots import plot_frontier

            plot_frontier(data.path / "reward_vs_kl.png", out["frontier"], out["fits"], t.start_means(arrays)["gold"],
                          "true reward" if task == "world" else "gold RM score", kl_levels, budget)
        best = t.with_shares(t.with_interval(t.with_interval(out["best"], "gold", "gold_lo", "gold_hi"),
                                             "win vs start", "win_lo", "win_hi"))
        view = t.with_interval(out["frontier"], "gold", "gold_lo", "gold_hi").drop(columns=["proxy", "entropy"],
                                                                                 errors="ignore")
        return [*(["![true reward vs KL](reward_vs_kl.png)", ""] if figures else []),
                f"### Best points under the KL budget ({budget:g} nats)", "",
                "Gold and win rate against the start's sample on the same prompt, 95% intervals over world draws; "
                "`shares d/s/p`: the variance of the gold's grand mean carried by draws / seeds / prompts (ANOVA).", "",
                t.markdown_table(best), "",
                "### Every setting and checkpoint (means over draws x seeds; win: vs the start's sample; proxy and "
                "entropy in frontier.csv; a setting whose runs stop at different steps is aligned by checkpoint "
                "position from the last, its step the cells' mean)", "",
                t.markdown_table(view), "",
                "### Gao et al. 2022 forms per curve (R = gold - gold(start), d = sqrt(KL))", "",
                t.markdown_table(out["fits"]), ""]

    def pref() -> list[str]:
        out["pref"] = t.pref_table(data)
        view = t.with_interval(t.with_interval(out["pref"], "vs labels", "vs labels lo", "vs labels hi"), "vs true",
                               "vs true lo", "vs true hi")
        return ["Share of held-out pairs whose implicit reward margin (log pi/pi_start of chosen minus rejected) "
                "agrees with the draw's label / with the true order.", "", t.markdown_table(view), ""]

    def footing() -> list[str]:
        out["footing"] = t.footing_table(data)
        return [t.markdown_table(out["footing"]), ""]

    def curves() -> list[str]:
        runs = _training_curves(data, arrays, chosen) if figures else {}
        if not runs:
            return ["(no metrics.jsonl to plot)" if figures else "(figures not drawn)", ""]
        from prefopt.bench.report.plots import plot_training_curves

        plot_training_curves(data.path / "training_curves.png", runs)
        return ["![training curves](training_curves.png)", ""]

    def runs() -> list[str]:
        out["runs"] = t.runs_table(data, arrays)
        view = out["runs"]
        if "status" in view:
            view = view.sort_values("status", key=lambda s: s != "done", ascending=False, kind="stable")
        return [t.markdown_table(view), ""]

    section("Verdicts", verdicts)
    section("Frontiers: true reward vs KL", frontier)
    section("Implicit-reward preference accuracy on held-out pairs (last step)", pref)
    section("Equal footing: the budget each label spent (means over its finished runs)", footing)
    section("Training curves (the chosen setting's runs)", curves)
    section("Runs", runs)
    section("Samples (draw 0, first seed: the start and each label's best point)", lambda: _samples(data, arrays,
                                                                                                   budget, chosen))
    for name, frame in out.items():
        if isinstance(frame, pd.DataFrame) and not frame.empty:
            frame.to_csv(data.path / f"{name}.csv", index=False)
    title = f"# prefopt bench: {data.bench.get('profile', data.path.name)}" + (
        " (SMOKE TEST: no credible gold RM)" if smoke else "")
    gates_md = ["## Gates", "", t.markdown_table(out["gates"]), ""]
    verdicts_md = ["## Verdicts", "", *sections["Verdicts"]]
    text = [title, "", *gates_md, *verdicts_md]
    for name, lines in sections.items():
        if name != "Verdicts":
            text += [f"## {name}", "", *lines]
    text += ["## Manifest", "", *_manifest(data), "", "## Problems reading the run directory", "",
             *([f"- {p}" for p in data.problems] or ["(none)"]), ""]
    (data.path / "results.md").write_text("\n".join(text))
    return "\n".join([title, "", *gates_md, *verdicts_md])


def _verdict_note(family: list[str], kl_levels: list[float], budget: float, arrays: Arrays, slope: float) -> str:
    absent = [label for label in family if label not in arrays.labels]
    return (f"Family (declared by the config, Holm-corrected over its tested rows): every pair of {', '.join(family)} "
            + (f"(no finished evaluated run, so no rows: {', '.join(absent)}) " if absent else "") +
            f"at matched KL {', '.join(f'{k:g}' for k in kl_levels) or '(none)'} and at each one's best point under "
            f"KL {budget:g} (its setting chosen on val by the selection runs, its last checkpoint within the budget). "
            "A matched-KL row exists only where both labels have measured checkpoints bracketing the KL in every "
            "(draw, seed) cell (`A KL`, `B KL`: the mean KLs of the bracketing checkpoints; no chord from the start). "
            f"Units: {seeds_note(arrays, family)}; 95% intervals: Student's t on the world draws' means (each the mean "
            "over its seeds and the pinned eval prompts; one draw: over seeds), for the expectation over draws and "
            "seeds on these prompts (prefopt/bench/report/stats.py; coverage measured on simulated bench-shaped data: "
            "prefopt/bench/report/coverage.py). "
            f"`win`: P(gold A > gold B) on the same prompt; `adj`: {_adjustment_note(slope)}; `shares`: the "
            "variance of the difference carried by draws / seeds / prompts.")


def _adjustment_note(slope: float) -> str:
    if not np.isfinite(slope):
        return "not computed (the start's best-of-n samples do not vary in length within a prompt, or are missing)"
    return (f"the difference less {slope:.4f} x the length difference (gold per token within prompts among the "
            "start's best-of-n samples)")


def _summary_view(summary: pd.DataFrame) -> pd.DataFrame:
    """Labels as rows, points as columns: "0.412 [0.380, 0.444]" or "n/a (3/12)"."""
    if summary.empty:
        return summary
    text = [f"n/a ({r['cells']} cells)" if pd.isna(r.get("gold")) else t.fmt(r["gold"]) if pd.isna(r.get("lo"))
            else f"{t.fmt(r['gold'])} [{t.fmt(r['lo'])}, {t.fmt(r['hi'])}]" for r in summary.to_dict("records")]
    view = summary.assign(text=text).pivot(index="label", columns="at", values="text")
    return view[list(dict.fromkeys(summary["at"]))].reindex(list(dict.fromkeys(summary["label"]))).reset_index()


def _diff_text(row: dict) -> str:
    """"+0.0123 [-0.0040, +0.0286]", or the difference alone where one replicate gives no interval."""
    if pd.isna(row.get("lo")):
        return f"{row['diff']:+.4f} (no interval)"
    return f"{row['diff']:+.4f} [{row['lo']:+.4f}, {row['hi']:+.4f}]"


def _verdict_view(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table
    rows = []
    for row in table.to_dict("records"):
        measured = "diff" in row and not pd.isna(row.get("diff"))
        view = {"A": row["A"], "B": row["B"], "at": row["at"], "A KL": row.get("A KL", "") if measured else "",
                "B KL": row.get("B KL", "") if measured else ""}
        if measured:
            view.update({"gold A": row["gold A"], "gold B": row["gold B"],
                         "A - B [95% CI]": _diff_text(row),
                         "p (Holm)": f"{row['p']:.3g} ({row['p holm']:.3g})" if not pd.isna(row["p"]) else "",
                         "win A>B [95% CI]": f"{row['win A over B']:.3f}" + (
                             f" [{row['win lo']:.3f}, {row['win hi']:.3f}]" if not pd.isna(row["win lo"]) else ""),
                         "length A / B": f"{row['length A']:.1f} / {row['length B']:.1f}",
                         "adj A - B": row["diff length-adjusted"],
                         "cond_acc A / B": f"{t.fmt(row['cond_acc A'])} / {t.fmt(row['cond_acc B'])}",
                         "shares d/s/p": t.shares_text(row)})
        view.update({"verdict": row["verdict"], "flags": row.get("flags", "")})
        rows.append(view)
    return pd.DataFrame(rows)


def _training_curves(data: RunDir, arrays: Arrays, chosen: dict[str, object]) -> dict[str, list]:
    from prefopt.bench.report.views import _same

    out: dict[str, list] = {}
    if data.runs.empty or "label" not in data.runs:
        return out
    done = data.runs[(data.runs["status"] == "done") & data.runs.get("phase", "main").isin(["main", "oracle"])]
    for label, group in done.groupby("label", sort=False):
        value = chosen.get(label)
        rows = group[[_same(v, value) for v in group["value"]]] if value is not None else group
        for run in rows.head(6).to_dict("records"):
            path = data.path / str(run["dir"]) / "metrics.jsonl"
            frame = pd.DataFrame(data.jsonl(path, required=False))
            if not frame.empty and "step" in frame:
                out.setdefault(str(label), []).append((str(run["id"]), frame))
    return out


def _samples(data: RunDir, arrays: Arrays, budget: float, chosen: dict[str, object], count: int = 3) -> list[str]:
    """The first eval prompts with the start's response and each trained label's at its best point (draw 0)."""
    from prefopt.bench.report.views import best_point

    prompts = {int(r["i"]): str(r.get("prompt", "")) for r in data.jsonl(data.path / "prompts.jsonl", required=False)
               if r.get("set") == "eval" and "i" in r}
    draw = arrays.draws[0] if arrays.draws else 0
    start = {int(r["i"]): r for r in data.jsonl(data.path / "draws" / f"draw{draw}" / "start.jsonl", required=False)
             if r.get("set", "eval") == "eval" and "i" in r}
    shown = {}
    for label in arrays.labels.values():
        point, _ = best_point(label, budget, chosen.get(label.name))
        cells = sorted(cell for cell in point.cells if cell[0] == draw)
        if not cells:
            continue
        gold = dict(zip(arrays.prompts.tolist(), point.cells[cells[0]][:, column("gold")]))
        run = next((c.run_id for c in label.curves if (c.draw, c.seed) == cells[0] and c.value == point.setting), None)
        responses = data.responses(run, point.steps[cells[0]]) if run is not None and \
            label.algorithm != "best_of_n" else {}
        shown[label.name] = (responses, gold)
    lines = []
    for i in list(arrays.prompts)[:count]:
        text = prompts.get(int(i), "").strip().replace("\n", " ")[-300:]
        lines += [f"**prompt {i}**: `{text}`", ""]
        if int(i) in start:
            lines.append(f"- start [{t.fmt(start[int(i)].get('gold'))}]: `{_one_line(start[int(i)].get('response'))}`")
        lines += [f"- {label} [{t.fmt(gold.get(i))}]: " + (f"`{_one_line(responses.get(int(i)))}`" if responses
                  else "(expected gold over the n_max samples)") for label, (responses, gold) in shown.items()]
        lines.append("")
    return lines or ["(no eval prompts)"]


def _one_line(text: object, limit: int = 200) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in str(text or "").replace("\n", " ⏎ ")).replace("`", "'")
    text = text.strip()
    return (text[:limit] + " …") if len(text) > limit else text or "(empty)"


def _manifest(data: RunDir) -> list[str]:
    manifest = data.manifest
    if not manifest:
        return ["(no manifest.json)"]
    lines = []
    for key in ("command", "versions", "git", "host", "seeds", "draws", "times"):
        if key in manifest:
            lines.append(f"- **{key}**: `{json.dumps(manifest[key], default=str)}`")
    for label, entry in sorted((manifest.get("selection") or {}).items()):
        entry = entry or {}
        extended = any((entry.get("extended") or {}).values())
        lines.append(f"- **selection {label}**: learning rate {entry.get('chosen_learning_rate')} of "
                     f"{entry.get('learning_rates')}, {entry.get('knob')} {entry.get('chosen_value')} of "
                     f"{entry.get('knob_values')}; {entry.get('criterion', '')}"
                     + (f"; on edge: {entry['on_edge']}" if entry.get("on_edge") else "")
                     + (f"; grid extended by {entry['extended']}" if extended else ""))
        table = pd.DataFrame(entry.get("table") or [])
        if not table.empty:
            lines += ["", t.markdown_table(table.drop(columns=["seeds"], errors="ignore")), ""]
    for stage in manifest.get("stages") or []:
        lines.append(f"- stage {stage.get('stage')} draw {stage.get('draw')}: "
                     f"{'cached' if stage.get('cached') else 'built'}, wall {stage.get('wall_s')} s")
    return lines or ["(empty manifest.json)"]
