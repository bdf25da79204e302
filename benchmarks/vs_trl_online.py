"""prefopt's online algorithms vs TRL 1.16, side by side: ``grpo`` vs GRPOTrainer and ``rloo`` vs RLOOTrainer.

    python benchmarks/vs_trl_online.py --max-new-tokens 256         # grpo and rloo, G = 8, the GPT-2 model, memory
    python benchmarks/vs_trl_online.py --algorithms grpo --steps 2 --no-memory      # a quick look
    python benchmarks/vs_trl_online.py --arch qwen2 --vocab 151936 --algorithms grpo --max-new-tokens 256 \\
        --prompts 2 --steps 2 --warmup 1                                 # a Qwen2.5-like vocabulary

Protocol (as ``vs_trl.py``: the contestants of ``online_contestants.py`` in the threads of ``turns.py``, the model
of ``assets.py``, any shape). fp32 on both sides. Prompts are the HH-RLHF harmless-base prompts of ../shared/data
(up to the last "\\n\\nAssistant:") of 24..``--max-prompt`` tokens, in file order, ``--prompts`` per step; each is
answered ``--num-samples`` (G) times, ``--max-new-tokens`` tokens at most, temperature 1, top-p 1, top-k 0. Neither
side shuffles (TRL: ``shuffle_dataset=False``), so step k of both sides answers the same prompts, tokenized to the
same ids (checked). The reward is the same deterministic function of the completion text on both sides (``reward``).
Learning rate 1e-6 (TRL's default), constant, clip 1.0, seed 0; TRL's default loss type (``dapo``) for GRPO on both
sides, beta 0; RLOO with beta = 0.05 (TRL's default). "trl-default" is TRL as it ships (gradient checkpointing on);
"trl-best" turns it off; "prefopt-no-prefix" is prefopt with ``prefix_sharing: false``; "prefopt-before" is prefopt
with this work's three changes undone (transformers' ``generate`` as the sampler, the LM head unchunked, prefix
sharing always on: ``ablations.before_online``), the before/after comparison in one run.

The same completions for everyone (``SharedCompletions``): before the contestants start, the starting policy
samples every step's completions once (prefopt's engine, seed 1000 + step), each then ended by EOS at a seeded
length between half and all of ``--max-new-tokens`` (``ended_early``: so the step-0 losses are not 0 by symmetry). Each contestant then runs its own
generation at every step, timed (so the generation column is each library's own sampler at these settings), and
trains on the shared completions of that step instead of its own draw: TRL's ``_generate_single_turn`` and
prefopt's ``collect`` hand the shared token ids on. So every contestant trains on the same completions, and the
step-0 losses must agree (the parity gate of the table; the policy has not moved yet, so the ratio is exactly 1 and
the loss is a function of the completions and the rewards only).

Every contestant is a real training loop in its own thread (``Trainer.fit`` / ``trainer.train()``), one optimizer
step each in turn (``turns.run_in_turns``). Reported: median s/step over the timed steps and its parts (generation;
scoring = rewards and the old / reference log-probs the step needs; update = the rest: the policy forward, backward
and optimizer step), generated tokens/s of the contestant's own sampler, the loss at step 0, and peak RSS of a
process that runs only that contestant (``--memory-steps`` steps; ``measure.run_worker``) above its baseline (RSS
after imports, the model files and the shared completions, before the contestant is built).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from assets import HH, add_shape_arguments, build_assets, shape_flags, shape_of
from measure import peak_rss_mb, rss_mb, run_worker
from online_contestants import TRL, Ours, SharedCompletions
from turns import run_in_turns

PARITY = 1e-5  # |step-0 loss - TRL default's|


def load_prompts(args: argparse.Namespace, tokenizer: Any) -> list[str]:
    from prefopt.config import DataConfig
    from prefopt.data import load_rows

    rows = load_rows(DataConfig(path=str(HH), format="hh", eval_fraction=0.0), "prompts").train
    prompts = [r["prompt"] for r in rows if 24 <= len(tokenizer(r["prompt"])["input_ids"]) <= args.max_prompt]
    return prompts[:args.prompts * (args.warmup + args.steps)]


def lineup(args: argparse.Namespace) -> list[tuple[str, str, type, dict[str, Any]]]:
    out = []
    for algo in args.algorithms:
        out += [(f"{algo}/prefopt", algo, Ours, {}), (f"{algo}/trl-default", algo, TRL, {}),
                (f"{algo}/trl-best", algo, TRL, {"best": True})]
        if args.ablations:
            out += [(f"{algo}/prefopt-no-prefix", algo, Ours, {"prefix_sharing": False}),
                    (f"{algo}/prefopt-before", algo, Ours, {"before": True})]
    return [c for c in out if not args.only or c[0] in args.only]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run this worker's contestants, one step each in turn; return their measurements."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    assets = build_assets(args.work, shape_of(args, args.max_prompt + args.max_new_tokens))
    tokenizer = AutoTokenizer.from_pretrained(assets["lm"])
    prompts = load_prompts(args, tokenizer)
    prompts_file = args.work / f"prompts-{time.time_ns()}.jsonl"  # one per worker: memory runs may overlap
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    shared = {"assets": assets, "tokenizer": tokenizer, "prompts": prompts, "prompts_file": prompts_file}
    shared["completions"] = SharedCompletions(args, shared)
    baseline = rss_mb()
    args.dtype = "fp32"
    contestants = [cls(name, algo, args, shared, **options) for name, algo, cls, options in lineup(args)]
    run_in_turns(contestants)
    prompts_file.unlink()
    return {"contestants": [{"name": c.name, "times": c.times, "cpu_times": c.cpu_times, "losses": c.losses,
                             "tokens": c.tokens, "parts": c.parts, "rewards": c.rewards} for c in contestants],
            "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
            "completion_tokens": [int(r.response_mask.sum()) for r in shared["completions"].rollouts]}


def summarise(result: dict[str, Any], warmup: int, memory: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for c in result["contestants"]:
        times, parts = c["times"][warmup:], c["parts"][warmup:len(c["times"])]
        mem = memory.get(c["name"], {})
        cpu = c.get("cpu_times", [])[warmup:]
        rows.append({"name": c["name"], "s_per_step": statistics.median(times),
                     "cpu_s_per_step": statistics.median(cpu) if cpu else float("nan"),
                     "generation_s": statistics.median(p["generation"] for p in parts),
                     "scoring_s": statistics.median(p["scoring"] for p in parts),
                     "update_s": statistics.median(t - p["generation"] - p["scoring"] for t, p in zip(times, parts)),
                     "gen_tokens_per_s": sum(c["tokens"][warmup:len(c["times"])]) / sum(p["generation"] for p in parts),
                     "loss_step0": c["losses"][0] if c["losses"] else float("nan"),
                     "reward_step0": c["rewards"][0] if c["rewards"] else float("nan"),
                     "peak_rss_mb": mem.get("peak_rss_mb", float("nan")),
                     "added_mb": mem.get("peak_rss_mb", float("nan")) - mem.get("baseline_rss_mb", float("nan"))})
    return rows


def speedup(other: dict[str, Any] | None, row: dict[str, Any], key: str = "s_per_step") -> str:
    """``other``'s s/step over ``row``'s ("-" when ``other`` did not run); ``key`` cpu_s_per_step: CPU seconds."""
    return f"{other[key] / row[key]:.2f}x" if other else "-"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, result: dict[str, Any]) -> str:
    by_name = {r["name"]: r for r in rows}
    lines = [f"`python benchmarks/vs_trl_online.py {' '.join(args.argv)}`", "",
             f"{args.arch}, {args.layers} layers, width {args.width}, vocabulary {args.vocab}; G = {args.num_samples}, "
             f"{args.prompts} prompts x {args.num_samples} = {args.prompts * args.num_samples} completions a step, "
             f"max_new_tokens {args.max_new_tokens} (the shared completions: {statistics.mean(result['completion_tokens']):.0f} "
             f"tokens a step), fp32, {args.threads} thread(s); median of {args.steps} steps after {args.warmup} warm-up.",
             "", "| contestant | s/step | generation s | scoring s | update s | own gen tokens/s | loss step 0 "
             "| peak RSS MB | MB added | added vs TRL default / best | TRL default s/step over this | vs TRL best "
             "| CPU s/step (vs TRL best) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        algo = row["name"].split("/")[0]
        default, best = by_name.get(f"{algo}/trl-default"), by_name.get(f"{algo}/trl-best")

        def share(other):
            return f"{100 * row['added_mb'] / other['added_mb']:.0f}%" if other and other["added_mb"] > 0 else "-"

        lines.append(f"| {row['name']} | {row['s_per_step']:.3f} | {row['generation_s']:.3f} | {row['scoring_s']:.3f} "
                     f"| {row['update_s']:.3f} | {row['gen_tokens_per_s']:.0f} | {row['loss_step0']:.6f} "
                     f"| {row['peak_rss_mb']:.0f} | {row['added_mb']:.0f} | {share(default)} / {share(best)} "
                     f"| {speedup(default, row)} | {speedup(best, row)} "
                     f"| {row['cpu_s_per_step']:.3f} ({speedup(best, row, 'cpu_s_per_step')}) |")
    failed = []
    for r in rows:
        default = by_name.get(r["name"].split("/")[0] + "/trl-default")
        for key in ("loss_step0", "reward_step0") if default else ():  # no TRL contestant (--only): no gate
            if not abs(r[key] - default[key]) <= PARITY:
                failed.append(f"{r['name']} {key} {r[key]:.6f} vs {default[key]:.6f}")
    gated = any(r["name"].endswith("/trl-default") for r in rows)
    lines += ["", "No TRL contestant ran (--only): no parity gate." if not gated else
              f"**Parity check FAILED** (step 0 vs TRL default): {'; '.join(failed)}" if failed else
              f"Parity check passed: every contestant trains on the same completions; the step-0 loss and mean reward "
              f"are within {PARITY:g} of TRL default's (RLOO's step-0 loss is 0 by construction: the leave-one-out "
              "advantages of a prompt sum to 0 and the ratio is 1)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_runs/vs_trl_online"))
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "rloo"], choices=["grpo", "rloo"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-ablations", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure prefopt-no-prefix's peak memory")
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    add_shape_arguments(parser)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        args.worker.write_text(json.dumps(worker(args)))
        return
    flags = ["--work", str(args.work), "--max-new-tokens", str(args.max_new_tokens), "--max-prompt",
             str(args.max_prompt), "--threads", str(args.threads), "--num-samples", str(args.num_samples),
             "--prompts", str(args.prompts), "--algorithms", *args.algorithms, *shape_flags(args),
             "--ablations" if args.ablations else "--no-ablations"]

    def run(extra: list[str]) -> dict[str, Any]:
        return run_worker(__file__, args.work, [*flags, *extra], quiet=True)

    result = run(["--steps", str(args.steps), "--warmup", str(args.warmup), "--only", *args.only])
    memory = {}
    if not args.no_memory:
        for name, *_ in lineup(args):
            if name.endswith("-no-prefix") and not args.memory_ablations:
                continue  # the ablations' memory only when asked (each memory run is a process of its own)
            one = run(["--steps", str(args.memory_steps), "--warmup", "0", "--only", name])
            memory[name] = {"peak_rss_mb": one["peak_rss_mb"], "baseline_rss_mb": one["baseline_rss_mb"]}
    rows = summarise(result, args.warmup, memory)
    args.argv = __import__("sys").argv[1:]
    table = markdown(rows, args, result)
    (args.work / "results.json").write_text(json.dumps({"result": result, "rows": rows}, indent=1))
    (args.work / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
