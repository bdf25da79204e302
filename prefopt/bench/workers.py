"""The bench's worker processes and the tasks they run: a chain of stages, a draw's evaluation, one run.

``Workers(context)`` spawns ``cfg.workers`` processes (one torch thread each by default; for 1 it runs the tasks in
this process) that each receive the ``Context`` once and keep one ``Judge`` per world draw (tokenizer, start,
scorers, tokenized prompt sets: loaded once per process, not per run). A task's numbers depend only on its inputs
(recipes, seeds, the context), never on the process that ran it or the order, so 1 and 2 workers write
bit-identical files.

Tasks write their part of the run directory (prefopt/bench/files.py lists the layout) and return what the runner
needs: ``task_stages`` (build stages in order), ``task_draw`` (``draws/draw<d>/``), ``task_gold`` (hh's
``gold.json``), ``task_run`` (train, evaluate every checkpoint, ``runs/<id>/``; ``run.json`` last, so a run without
it, or whose key differs, is unfinished and trained again from scratch).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from prefopt.bench.config import BenchConfig
from prefopt.bench.evaluate import Evaluation, evaluate_policy, evaluate_start, pair_accuracy, text_rollout
from prefopt.bench.files import content_key, read_json, read_jsonl, write_json, write_jsonl
from prefopt.bench.launch import train
from prefopt.bench.plan import Run
from prefopt.bench.stages import Start, build_stage
from prefopt.bench.recipes import gold_judge, proxy_reward
from prefopt.bench.world import oracle_weight
from prefopt.errors import PrefoptError
from prefopt.stopping import Interrupted


@dataclass
class Context:
    """What every worker needs: picklable, sent once when the worker starts."""

    cfg: BenchConfig
    run_dir: Path
    start: Start
    prompts: dict[str, list[dict[str, Any]]]


_CONTEXT: Context | None = None
_EVALUATIONS: dict[int, Evaluation] = {}


def _init_worker(context: Context) -> None:
    global _CONTEXT
    _CONTEXT = context
    _EVALUATIONS.clear()
    if context.cfg.threads:
        import torch

        torch.set_num_threads(context.cfg.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # a reward model built from the start says its new head is new, every load


class Workers:
    """``workers`` spawned processes (or this one, for 1) running module-level tasks; results in order. A task
    found done in this process (``already_done``) is not sent; the processes start at the first task that is not."""

    def __init__(self, context: Context):
        self.context, self.pool, self.threads, self.verbosity = context, None, None, None

    def _start(self) -> None:
        if self.pool is not None or self.threads is not None:
            return
        import torch
        from transformers.utils import logging as hf_logging

        self.threads, self.verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
        if self.context.cfg.workers > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self.pool = ProcessPoolExecutor(self.context.cfg.workers, mp_context=get_context("spawn"),
                                            initializer=_init_worker, initargs=(self.context,))
        else:
            _init_worker(self.context)

    def map(self, name: str, calls: list[tuple[Callable[..., Any], tuple]]) -> list[Any]:
        """Run ``fn(*args)`` for every call not already done; a bar named ``name``."""
        results = [already_done(self.context, fn, args) for fn, args in calls]
        todo = [k for k, result in enumerate(results) if result is None]
        if todo:
            self._start()
        bar = tqdm(total=len(todo), desc=f"bench {name}", unit="task", dynamic_ncols=True, leave=False)
        try:
            if self.pool is None:
                for k in todo:
                    fn, args = calls[k]
                    results[k] = fn(*args)
                    bar.update(1)
                return results
            futures = {k: self.pool.submit(calls[k][0], *calls[k][1]) for k in todo}
            for future in futures.values():
                future.add_done_callback(lambda _: bar.update(1))
            for k, future in futures.items():
                results[k] = future.result()
            return results
        finally:
            bar.close()

    def close(self, interrupted: bool = False) -> None:
        if self.threads is not None:  # this process's settings as they were (1 worker: the tasks ran here)
            import torch
            from transformers.utils import logging as hf_logging

            torch.set_num_threads(self.threads)
            hf_logging.set_verbosity(self.verbosity)
        if self.pool is None:
            return
        if interrupted:  # the processes this bench started, by id
            for process in list(getattr(self.pool, "_processes", {}).values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        self.pool.shutdown(wait=True, cancel_futures=True)


def already_done(ctx: Context, fn: Callable[..., Any], args: tuple) -> Any:
    """What a task returns when its outputs are already there (None: it has work to do)."""
    if fn is task_stages and all(stage.done for stage in args[0]):
        return [build_stage(stage) for stage in args[0]]
    if fn is task_draw:
        path = ctx.run_dir / "draws" / f"draw{args[0]}" / "draw.json"
        if path.is_file() and read_json(path).get("key") == draw_key(ctx, args[0]):
            return {"wall_s": 0.0, "cpu_s": 0.0}
    if fn is task_gold:
        path = ctx.run_dir / "gold.json"
        if path.is_file() and read_json(path).get("key") == gold_key(ctx):
            return {"wall_s": 0.0, "cpu_s": 0.0}
    if fn is task_run:
        return finished(ctx.run_dir / args[0].dir, args[0].key)
    return None


# ------------------------------------------------------------------------------------------------ tasks


def task_stages(stages: list[Any]) -> list[dict[str, float]]:
    """Build stages in order (a draw's labels, then its proxy RM)."""
    return [build_stage(stage) for stage in stages]


def evaluation(draw: int) -> Evaluation:
    """This worker's evaluation context of a draw (built once)."""
    if draw not in _EVALUATIONS:
        ctx = _CONTEXT
        cfg, the_draw = ctx.cfg, ctx.start.draws[draw]
        lengths = (cfg.data.max_length, cfg.data.max_prompt_length)
        proxy, gold = proxy_reward(cfg, the_draw.proxy_rm), gold_judge(cfg, ctx.start.gold_rm)
        pairs = read_jsonl(the_draw.held_out_pairs)[:cfg.eval.num_pairs]
        _EVALUATIONS[draw] = Evaluation(str(ctx.start.policy), gold, proxy, cfg.eval.generation, ctx.prompts, pairs,
                                        lengths, cfg.eval.batch_size, cfg.eval.seed)
    return _EVALUATIONS[draw]


DRAW_FILES = 2
"""The version of a draw's files (2: proxy.json has the oracle's weight); a draw written by another is made again."""


def draw_key(ctx: Context, draw: int) -> str:
    the_draw = ctx.start.draws[draw]
    return content_key("draw", {"stages": [s.key for s in ctx.start.shared + the_draw.stages], "seed": the_draw.seed,
                                "eval": asdict(ctx.cfg.eval), "best_of_n": max(ctx.cfg.frontier.best_of_n, default=0),
                                "prompts": str(ctx.run_dir / "prompts.jsonl"), "files": DRAW_FILES},
                       ctx.start.known)


def task_draw(draw: int) -> dict[str, float]:
    """``draws/draw<d>/``: the start's rows, best-of-n, held-out pairs, labels.json, proxy.json, draw.json."""
    ctx, wall, cpu = _CONTEXT, time.perf_counter(), time.process_time()
    cfg, the_draw = ctx.cfg, ctx.start.draws[draw]
    directory, key = ctx.run_dir / "draws" / f"draw{draw}", draw_key(ctx, draw)
    evals = evaluation(draw)
    out = evaluate_start(evals, max(cfg.frontier.best_of_n, default=0), the_draw.seed)
    for name in ("start", "best_of_n", "pairs"):
        write_jsonl(directory / f"{name}.jsonl", out[name])
    stages = {stage.name: stage for stage in the_draw.stages}
    if cfg.task == "world":
        labels = read_json(stages["labels"].directory / "stage.json")["summary"]
        write_json(directory / "labels.json", {"label_temperature": cfg.world.label_temperature,
                                               "responses_per_prompt": cfg.world.responses_per_prompt,
                                               "parts": labels})
        val = read_jsonl(the_draw.val_pairs)
        proxy = pair_accuracy(evals.proxy, evals.tokenizer, val)
        report = {"n_pairs": len(val), "val_accuracy": proxy["accuracy"], "val_accuracy_ci95": proxy["ci95"],
                  "val_accuracy_true": pair_accuracy(evals.proxy, evals.tokenizer, true_order(evals, val))["accuracy"],
                  "rule_val_accuracy": pair_accuracy(evals.judges["rule"], evals.tokenizer, val)["accuracy"],
                  "ceiling_val_accuracy": pair_accuracy(evals.gold, evals.tokenizer, val)["accuracy"],
                  **oracle_scale(out["best_of_n"] or out["start"])}
    else:
        report = pair_accuracy(evals.proxy, evals.tokenizer, read_jsonl(ctx.run_dir / "data" / "eval.jsonl"))
    proxy_stage = stages["proxy_rm"]
    write_json(directory / "proxy.json", {**report, "seed": the_draw.seed,
                                          "steps": proxy_stage.spec["train"].get("max_steps")})
    write_json(directory / "draw.json", {"draw": draw, "seed": the_draw.seed, "key": key,
                                         "start_key": next((s.key for s in ctx.start.shared
                                                            if s.model == ctx.start.policy), None),
                                         "labels_key": stages["labels"].key if "labels" in stages else None,
                                         "proxy_key": proxy_stage.key})
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def oracle_scale(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The oracle's reward weight (prefopt.bench.world.oracle_weight: the proxy's slope on the true reward over the
    start's replies, best-of-n's when drawn): ``oracle_slope`` as fitted, ``oracle_weight`` the weight the oracle
    runs use (1.0 where the slope is not positive or the true reward is constant: then the proxy carries no scale)."""
    try:
        slope = oracle_weight([row["gold"] for row in rows], [row["proxy"] for row in rows])
    except ValueError:
        slope = None
    return {"oracle_slope": slope, "oracle_weight": slope if slope is not None and slope > 0 else 1.0}


def true_order(evals: Evaluation, pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs with chosen and rejected swapped where the true reward prefers the rejected reply."""
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = (evals.gold(text_rollout(evals.tokenizer, prompts, [p[side] for p in pairs])).tolist()
                        for side in ("chosen", "rejected"))
    return [pair if c >= r else {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
            for pair, c, r in zip(pairs, chosen, rejected)]


def gold_key(ctx: Context) -> str:
    return content_key("gold", {"gold": str(ctx.start.gold_rm), "pairs": str(ctx.run_dir / "data" / "eval.jsonl")},
                       ctx.start.known)


def task_gold() -> dict[str, float]:
    """hh: the gold RM's accuracy on every held-out human pair of the eval part (``gold.json``)."""
    ctx, wall, cpu = _CONTEXT, time.perf_counter(), time.process_time()
    pairs = read_jsonl(ctx.run_dir / "data" / "eval.jsonl")
    evals = evaluation(0)
    write_json(ctx.run_dir / "gold.json", {**pair_accuracy(evals.gold, evals.tokenizer, pairs), "method": "normal",
                                          "part": "eval", "key": gold_key(ctx)})
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def finished(directory: Path, key: str) -> dict[str, Any] | None:
    path = directory / "run.json"
    if path.is_file():
        info = read_json(path)
        if info.get("key") == key and info.get("status") == "done":
            return info
    return None


def task_run(run: Run, flops_per_token: float | None = None) -> dict[str, Any]:
    """Train ``run`` (unless finished), evaluate its checkpoints, write its files; run.json last."""
    ctx = _CONTEXT
    directory = ctx.run_dir / run.dir
    done = finished(directory, run.key)
    if done is not None:
        return done
    shutil.rmtree(directory, ignore_errors=True)
    snapshots = [step for step in run.checkpoints if step < run.max_steps]
    try:
        out = train(run.recipe, directory, snapshots, count_flops=run.phase == "probe")
    except Interrupted as exc:
        raise KeyboardInterrupt(str(exc)) from None
    except PrefoptError as exc:
        info = {**run.row(), "key": run.key, "status": "failed", "error": str(exc)}
        write_json(directory / "run.json", info)
        return info
    wall, cpu = time.perf_counter(), time.process_time()
    rows, pairs = [], []
    for step in run.checkpoints:
        path = out["snapshots"].get(step, directory / "model")
        last = run.eval_set == "eval" and step == run.max_steps  # pair margins at the last step of a main run
        got = evaluate_policy(evaluation(run.draw), path, step, run.eval_set, last)
        rows += got[0]
        pairs += got[1]
    write_jsonl(directory / "eval.jsonl", rows)
    write_jsonl(directory / "pref.jsonl", pairs)
    if not ctx.cfg.keep_checkpoints:
        for name in ("snapshots", "checkpoints", "model"):
            shutil.rmtree(directory / name, ignore_errors=True)
    flops, method = out.get("flops"), "counted"
    if flops is None:
        flops = out["tokens"] * flops_per_token if flops_per_token is not None else None
        method = "probe-per-token" if flops is not None else None
    offline = run.train_rows is not None
    cost = {"wall_s": out["wall_s"], "cpu_s": out["cpu_s"], "eval_wall_s": time.perf_counter() - wall,
            "eval_cpu_s": time.process_time() - cpu, "peak_rss_mb": out["peak_rss_mb"], "updates": out["updates"],
            "rows": out["rows"], "samples": out["samples"], "tokens": out["tokens"], "flops": flops,
            "flops_method": method, "labels_consumed": min(out["rows"], run.labels) if offline else run.labels,
            "epochs_over_pairs": out["rows"] / run.train_rows if offline and run.train_rows else 0.0}
    info = {**run.row(), "key": run.key, "status": "done", "error": None, "final_step": out["final_step"],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "cost": cost}
    write_json(directory / "run.json", info)
    return info
