"""The report of ``vs_trl.py``: one row per contestant and dtype from a worker's measurements, and the markdown.

Per contestant: median s/step over the timed steps, tokens/s (non-pad tokens of the batch's chosen + rejected rows,
the same count for both libraries), the loss at step 0 and the largest |loss difference| to TRL's default over the
steps, MFU, peak RSS and the median CPU seconds of the contestant's thread per step (``turns.py``). MFU = 6 * N *
tokens / step time / ceiling, with N from ``measure.parameters_per_token`` and the ceiling the highest
``measure.matmul_ceiling`` of the worker. Speed-ups are ratios of median s/step within one dtype; ablation rows
(names outside ``MAIN``) go to a table of their own.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from typing import Any


def summarise(result: dict[str, Any], warmup: int, n_params: dict[str, int],
              memory: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one worker's result (one dtype); ``n_params``: algorithm -> matmul parameters per token;
    ``memory``: name -> peak and baseline RSS of its own process."""
    rows = []
    ceiling = max(result["ceiling_gflops"].values())
    trl_losses = {c["algorithm"]: c["losses"] for name, c in result["contestants"].items()
                  if name.endswith("/trl-default")}
    for name, c in result["contestants"].items():
        times, tokens = c["times"][warmup:], c["tokens"][warmup:]
        flops = [6 * n_params[c["algorithm"]] * n / t / 1e9 for n, t in zip(tokens, times)]
        reference = trl_losses.get(c["algorithm"], [])
        diffs = [abs(a - b) for a, b in zip(c["losses"], reference)]
        mem = memory.get(name, {})
        rows.append({
            "name": name, "dtype": result["dtype"], "s_per_step": statistics.median(times),
            "cpu_s_per_step": statistics.median(c["cpu_times"][warmup:]) if c.get("cpu_times") else float("nan"),
            "tokens_per_s": sum(tokens) / sum(times), "mfu": statistics.median(flops) / ceiling,
            "loss0": c["losses"][0] if c["losses"] else float("nan"),
            "loss0_diff": diffs[0] if diffs else float("nan"), "max_loss_diff": max(diffs) if diffs else float("nan"),
            "peak_rss_mb": mem.get("peak_rss_mb", float("nan")), "baseline_rss_mb": mem.get("baseline_rss_mb",
                                                                                           float("nan")),
            "setup_s": c["setup_s"], "steps_timed": len(times),
        })
    return rows



MAIN = ("prefopt", "prefopt+precompute", "trl-default", "trl-best")
PARITY = {"fp32": 1e-5, "bf16": 1e-3}  # |step-0 loss - TRL default's| allowed (bf16: differently shaped roundings)


def parity(rows: list[dict[str, Any]]) -> str:
    """The parity gate: every contestant's step-0 loss equals TRL default's on the same batch (within PARITY;
    length bucketing trains on other batches by design)."""
    same_batches = [r for r in rows if "length-bucketing" not in r["name"]]  # bucketing reorders the rows
    failed = [f"{r['name']} {r['dtype']}: {r['loss0_diff']:.1e}" for r in same_batches
              if not r["loss0_diff"] <= PARITY[r["dtype"]]]
    if failed:
        return "**Parity check FAILED** (step-0 loss differs from TRL default's): " + "; ".join(failed)
    return ("Parity check passed: every contestant's step-0 loss equals TRL default's on the same batch within "
            + ", ".join(f"{v:g} ({k})" for k, v in PARITY.items()) + ".")


def markdown(rows: list[dict[str, Any]], results: dict[str, Any], args: argparse.Namespace, batch: int) -> str:
    """The tables: prefopt vs TRL per algorithm and dtype, then the ablations and the token positions per step."""
    first = results[next(iter(results))]
    lines = [f"# prefopt vs TRL {first['versions']['trl']} (torch {first['versions']['torch']}, transformers "
             f"{first['versions']['transformers']})", "", f"`python {' '.join(sys.argv)}`", "",
             f"{args.steps} timed steps per contestant after {args.warmup} warm-up, batch {batch} pairs, max length "
             f"{args.max_length}, torch threads {first['threads']}; the same batches for every contestant.", ""]
    for dtype, result in results.items():
        c = result["ceiling_gflops"]
        lines.append(f"- matmul ceiling {dtype}: {max(c.values()):.0f} GFLOP/s (before the steps {c['before']:.0f}, "
                     f"after {c['after']:.0f})")
    by_key = {(r["name"], r["dtype"]): r for r in rows}

    def ratio(r: dict[str, Any], other: str, key: str = "s_per_step") -> str:
        o = by_key.get((f"{r['name'].split('/')[0]}/{other}", r["dtype"]))
        return f"{o[key] / r[key]:.2f}x" if o else "-"

    def added(r: dict[str, Any], other: str | None = None) -> str:
        """Peak RSS above the process's baseline, MB; with ``other``: as a share of that contestant's."""
        o = r if other is None else by_key.get((f"{r['name'].split('/')[0]}/{other}", r["dtype"]))
        if o is None or math.isnan(o["peak_rss_mb"]) or math.isnan(r["peak_rss_mb"]):
            return "-"
        mine, theirs = r["peak_rss_mb"] - r["baseline_rss_mb"], o["peak_rss_mb"] - o["baseline_rss_mb"]
        return f"{mine:.0f}" if other is None else f"{100 * mine / theirs:.0f}%"

    lines += ["", "## prefopt vs TRL", "",
              "| algorithm | contestant | dtype | s/step | speed-up vs TRL default | vs TRL best | tokens/s | MFU "
              "| peak RSS MB (baseline) | MB added | added vs TRL default / best | loss at step 0 "
              "| \\|Δ loss\\| vs TRL default: step 0 (max, all steps) | setup s | CPU s/step (vs TRL best) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        algo, who = r["name"].split("/")
        if who not in MAIN:
            continue
        lines.append(
            f"| {algo} | {who} | {r['dtype']} | {r['s_per_step']:.3f} | {ratio(r, 'trl-default')} | "
            f"{ratio(r, 'trl-best')} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_rss_mb']:.0f} ({r['baseline_rss_mb']:.0f}) | {added(r)} | "
            f"{added(r, 'trl-default')} / {added(r, 'trl-best')} | {r['loss0']:.6f} | "
            f"{r['loss0_diff']:.1e} ({r['max_loss_diff']:.1e}) | {r['setup_s']:.1f} | "
            f"{r['cpu_s_per_step']:.3f} ({ratio(r, 'trl-best', 'cpu_s_per_step')}) |")
    lines += ["", parity(rows)]
    ablations = [r for r in rows if r["name"].split("/")[1] not in MAIN]
    if ablations:
        lines += ["", "## Ablations (fp32): prefopt with one thing changed, in the same alternating run", "",
                  "| algorithm | variant | s/step | prefopt s/step | time vs prefopt (>1: slower) | tokens/s |",
                  "|---|---|---|---|---|---|"]
        for r in ablations:
            algo, who = r["name"].split("/")
            base = by_key[(f"{algo}/prefopt", r["dtype"])]
            lines.append(f"| {algo} | {who} | {r['s_per_step']:.3f} | {base['s_per_step']:.3f} | "
                         f"{r['s_per_step'] / base['s_per_step']:.2f} | {r['tokens_per_s']:.0f} |")
        slots = results.get("fp32", first)["token_slots_per_step"]
        lines += ["", "Token positions one forward runs per step (mean over the timed batches):", ""]
        lines += [f"- {name}: {value:.0f}" for name, value in slots.items()]
    return "\n".join(lines) + "\n"

