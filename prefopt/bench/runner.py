"""``prefopt bench``: the phases of a bench in order, each spread over the worker processes, then the report.

Phases (each writes its part of the run directory):

1. ``data``: the pinned parts and prompt sets (prefopt.bench.data); ``bench.json``;
2. ``start``: the shared stages init -> pt -> sft (prefopt.bench.stages), then every draw's labels and proxy RM
   (and hh's gold RM), draws side by side;
3. ``draws``: per draw, the start's samples, best-of-n draws, held-out pairs with the start's log-probs, the
   labels' and the proxy's numbers (``draws/draw<d>/``; hh: ``gold.json``);
4. ``select``: per label, the learning rate (each at the middle knob value), then the knob value (each at the chosen
   rate), chosen on the val prompts by selection runs with their own seeds: the highest mean val gold at the last
   step (within ``select.kl_budget``); a choice on the edge of its grid extends the grid by one geometric step
   (``select.extend`` times), then stays flagged (``manifest.json``: selection);
5. ``probe``: one short FLOP-counted run per label;
6. ``main``: every label x knob value x draw x seed at the chosen rate (and the oracles), evaluated at >= 8
   log-spaced checkpoints on the eval prompts (prefopt.bench.plan);
7. ``report``: prefopt.bench.report.write_report(run_dir), from the files alone.

Workers: ``workers`` spawned processes (one torch thread each by default) take stages, draws and runs in turn; a
run's numbers depend only on its recipe and seeds, never on the process or the order, so 1 and 2 workers give
bit-identical files. Resuming: a stage is built once (``stage.json``), a draw evaluated once (its key in
``draw.json``), a run trained once (its key in ``run.json`` with status done); an unfinished run is trained again
from scratch. A failed run (a PrefoptError) is recorded as failed and the others go on; the bench then exits with
an error after the report. Ctrl-C / SIGTERM stop the workers; the next ``prefopt bench`` resumes.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prefopt.bench.config import BenchConfig
from prefopt.bench.data import PROMPT_SETS, prepare_data
from prefopt.bench.files import read_json, read_jsonl, write_json
from prefopt.bench.manifest import load_average, manifest
from prefopt.bench.plan import Label, Planner, Run, plan_labels
from prefopt.bench.recipes import load_bench
from prefopt.bench.stages import plan_start
from prefopt.bench.workers import Context, Workers, task_draw, task_gold, task_run, task_stages
from prefopt.errors import PrefoptError


class RunsFailed(PrefoptError):
    """Some runs of the bench failed (each is recorded in its run.json); the report lists them."""


def run_bench(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Run (or finish) the bench of a bench recipe; returns the path of its run directory."""
    cfg = load_bench(recipe, list(overrides))
    try:  # stop on SIGTERM like on Ctrl-C: the workers stop, the next bench resumes
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        return str(_run(cfg))
    try:
        return str(_run(cfg))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ------------------------------------------------------------------------------------------------ phases


def _run(cfg: BenchConfig) -> Path:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    if cfg.threads:  # the shared stages build here, with the workers' threads
        torch.set_num_threads(cfg.threads)
    try:
        return _phases(cfg)
    finally:
        torch.set_num_threads(threads)


def _phases(cfg: BenchConfig) -> Path:
    load_at_start = load_average()
    run_dir = Path(cfg.output_dir).resolve()
    times: dict[str, dict[str, float]] = {}
    clock = _Clock(times)
    with clock("data"):
        write_json(run_dir / "bench.json", {"profile": cfg.name, "task": cfg.task, "config": cfg.to_dict()})
        data = prepare_data(cfg, run_dir)
        start = plan_start(cfg, data)
    workers = None
    try:
        with clock("start"):
            clock.add(task_stages(start.shared if not start.gold_rm else start.shared[:-1]))  # init -> pt -> sft
            workers = Workers(Context(cfg, run_dir, start, {name: data.prompts[name] for name in PROMPT_SETS}))
            chains = [(task_stages, (d.stages,)) for d in start.draws]
            if start.gold_rm:
                chains.append((task_stages, ([start.shared[-1]],)))
            clock.add([cost for chain in workers.map("start", chains) for cost in chain])
        with clock("draws"):
            calls = [(task_draw, (d.draw,)) for d in start.draws] + ([(task_gold, ())] if start.gold_rm else [])
            clock.add(workers.map("draws", calls))
        labels, skipped = plan_labels(cfg, start.policy)
        for label, reason in skipped.items():
            tqdm.write(f"prefopt bench: skipping {label!r}: {reason}")
        weights = {d.draw: read_json(run_dir / "draws" / f"draw{d.draw}" / "proxy.json")["oracle_weight"]
                   for d in start.draws} if cfg.oracles else {}
        planner, plan = Planner(cfg, start, run_dir, weights), []
        with clock("select"):
            selection = select(workers, planner, labels, plan, clock)
        runs = {label.label: planner.main_runs(label, *_main_setting(cfg, label, selection)) for label in labels}
        per_token: dict[str, float | None] = {}
        with clock("probe"):
            probes = [planner.probe(runs[label.label][0], label) for label in labels
                      if cfg.frontier.flops_probe and runs[label.label]]
            plan += probes
            for probe, info in zip(probes, workers.map("probe", [(task_run, (p,)) for p in probes])):
                clock.add([info.get("cost", {})])
                cost = info.get("cost") or {}
                per_token[probe.label] = cost["flops"] / cost["tokens"] if cost.get("tokens") else None
        with clock("main"):
            mains = [run for label in labels for run in runs[label.label]]
            plan += mains
            _write_plan(run_dir, labels, plan)
            clock.add([info.get("cost", {}) for info in workers.map(
                "main", [(task_run, (run, per_token.get(run.label))) for run in mains])])
    except KeyboardInterrupt:
        if workers is not None:
            workers.close(interrupted=True)
            workers = None
        raise
    finally:
        if workers is not None:
            workers.close()
    _write_plan(run_dir, labels, plan)
    stages = [{**stage.record(), "cached": stage.key not in clock.built} for stage in start.stages]
    draws = [{"draw": d.draw, "seed": d.seed} for d in start.draws]
    write_json(run_dir / "manifest.json", manifest(cfg, data.manifest, draws, selection, stages, times, skipped,
                                                   load_at_start))
    with clock("report"):
        summary = _report(run_dir)
    write_json(run_dir / "manifest.json", manifest(cfg, data.manifest, draws, selection, stages, times, skipped,
                                                   load_at_start))
    print(summary)
    failed = [run.id for run in plan if read_json(run_dir / run.dir / "run.json").get("status") == "failed"]
    if failed:
        raise RunsFailed(f"{len(failed)} run(s) failed: {', '.join(failed)}; their run.json says why (logs: "
                         f"<run>/train.log); the report in {run_dir} lists the others")
    return run_dir


def _report(run_dir: Path) -> str:
    from prefopt.bench.report import write_report

    return write_report(run_dir)


class _Clock:
    """Wall seconds of each phase, with the CPU seconds of this process and of the tasks the workers ran."""

    def __init__(self, times: dict[str, dict[str, float]]):
        self.times, self.cpu, self.built = times, 0.0, set()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        wall, cpu, self.cpu = time.perf_counter(), time.process_time(), 0.0
        try:
            yield
        finally:
            self.times[phase] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu + self.cpu}

    def add(self, costs: list[dict[str, Any]]) -> None:
        """Count the CPU seconds of tasks (built stages are remembered by their key)."""
        for cost in costs:
            self.cpu += float(cost.get("cpu_s") or 0.0) + float(cost.get("eval_cpu_s") or 0.0)
            if cost.get("built"):
                self.built.add(cost["key"])


def _write_plan(run_dir: Path, labels: list[Label], runs: list[Run]) -> None:
    write_json(run_dir / "plan.json", {"labels": {label.label: label.row() for label in labels},
                                       "runs": [run.row() for run in runs]})


# ------------------------------------------------------------------------------------------------ selection


def _middle(values: list[float | None]) -> float | None:
    return values[len(values) // 2]


def _main_setting(cfg: BenchConfig, label: Label, selection: dict[str, Any]) -> tuple[float | None, list]:
    """The main runs' learning rate (the chosen one, or the recipe's) and knob values (the grid + the chosen)."""
    chosen = selection.get(label.oracle_of or label.label)
    if chosen is None:
        return None, label.values
    values = label.values if label.knob is None else sorted(set(label.values) | {chosen["chosen_value"]})
    return chosen["chosen_learning_rate"], values


def select(workers: Workers, planner: Planner, labels: list[Label], plan: list[Run], clock: _Clock) -> dict:
    """The learning rate, then the knob value, of every label (module docstring, phase 4): ``manifest.selection``."""
    cfg = planner.cfg
    choosing = [label for label in labels if not label.oracle_of]
    if not cfg.select.learning_rates:
        return {}
    table: dict[str, dict[tuple, dict[str, Any]]] = {label.label: {} for label in choosing}
    lrs = {label.label: sorted(cfg.select.learning_rates) for label in choosing}
    values = {label.label: list(label.values) for label in choosing}
    extended = {label.label: {"learning_rate": [], "knob": []} for label in choosing}
    chosen_lr: dict[str, float] = {}

    def settle(axis: str, grid: dict[str, list], setting) -> dict[str, Any]:
        """Run every label's grid along ``axis``, extending it where its best sits on an edge; the best per label."""
        best: dict[str, Any] = {}
        pending = {label.label: list(grid[label.label]) for label in choosing}
        left = {label.label: cfg.select.extend for label in choosing}
        while any(pending.values()):
            runs = [run for label in choosing for point in pending[label.label]
                    if setting(label, point) not in table[label.label]
                    for run in planner.select_runs(label, [setting(label, point)])]
            plan.extend(runs)
            infos = workers.map(f"select {axis}", [(task_run, (run,)) for run in runs])
            clock.add([info.get("cost", {}) for info in infos])
            _tabulate(planner.run_dir, runs, infos, table)
            pending = {label.label: [] for label in choosing}
            for label in choosing:
                points = grid[label.label]
                best[label.label] = _best(table[label.label], [setting(label, p) for p in points], cfg.select.kl_budget)
                edge = _extension(points, best[label.label][0 if axis == "learning_rate" else 1])
                if edge is not None and left[label.label] > 0:
                    left[label.label] -= 1
                    points.append(edge)
                    points.sort()
                    extended[label.label][axis].append(edge)
                    pending[label.label] = [edge]
        return best

    best_lr = settle("learning_rate", lrs, lambda label, lr: (lr, _middle(label.values)))
    chosen_lr = {name: point[0] for name, point in best_lr.items()}
    knobbed = {label.label: values[label.label] if label.knob is not None else [None] for label in choosing}
    best = settle("knob", knobbed, lambda label, value: (chosen_lr[label.label], value))
    out = {}
    for label in choosing:
        lr, value = best[label.label]
        on_edge = [axis for axis, grid, point in (("learning_rate", lrs[label.label], lr),
                                                  ("knob", knobbed[label.label], value))
                   if point is not None and len(grid) > 0 and point in (grid[0], grid[-1])]
        out[label.label] = {
            "knob": label.knob, "learning_rates": lrs[label.label], "knob_values": knobbed[label.label],
            "chosen_learning_rate": lr, "chosen_value": value, "on_edge": on_edge,
            "criterion": "highest mean val gold at the last step" + (
                f" among settings with mean val KL <= {cfg.select.kl_budget}" if cfg.select.kl_budget else ""),
            "kl_budget": cfg.select.kl_budget, "extended": extended[label.label],
            "table": [{"learning_rate": k[0], "value": k[1], **v} for k, v in sorted(
                table[label.label].items(), key=lambda item: (item[0][0], -1 if item[0][1] is None else item[0][1]))]}
    return out


def _tabulate(run_dir: Path, runs: list[Run], infos: list[dict[str, Any]], table: dict) -> None:
    """Mean val gold and KL at the last step over the selection seeds of each (label, lr, value)."""
    groups: dict[tuple, list[Path]] = {}
    for run, info in zip(runs, infos):
        if info.get("status") == "done":
            groups.setdefault((run.label, run.learning_rate, run.value), []).append(run_dir / run.dir)
    for (label, lr, value), dirs in groups.items():
        rows = [row for d in dirs for row in read_jsonl(d / "eval.jsonl")]
        n = max(len(rows), 1)
        table[label][(lr, value)] = {"seeds": len(dirs), "val_gold": sum(r["gold"] for r in rows) / n,
                                     "val_kl": sum(r["kl"] for r in rows) / n}


def _best(entries: dict[tuple, dict[str, Any]], points: list[tuple], kl_budget: float | None) -> tuple:
    """The point of highest val gold (within the KL budget when any point is; first on ties)."""
    measured = [p for p in points if p in entries]
    if not measured:
        return points[len(points) // 2]
    within = [p for p in measured if kl_budget is None or entries[p]["val_kl"] <= kl_budget] or measured
    return max(within, key=lambda p: entries[p]["val_gold"])


def _extension(grid: list[float | None], point: float | None) -> float | None:
    """One geometric step beyond the grid's edge when ``point`` sits on it (None: interior, or no step possible)."""
    if point is None or len(grid) < 2 or grid[0] is None:
        return None
    if point == grid[-1] and grid[-2] > 0:
        return float(f"{grid[-1] * grid[-1] / grid[-2]:.4g}")
    if point == grid[0] and grid[0] > 0:
        return float(f"{grid[0] * grid[0] / grid[1]:.4g}")
    return None
