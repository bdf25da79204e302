"""prefopt vs TRL 1.16, side by side: DPO, ORPO and reward modelling on the same model, batches and dtype.

    python benchmarks/vs_trl.py                      # fp32 and bf16 runs, ablations, memory: the full table
    python benchmarks/vs_trl.py --dtypes fp32 --algorithms dpo --steps 6 --no-memory    # a quick look
    python benchmarks/vs_trl.py --arch qwen2 --vocab 151936 --long-pairs --max-length 1024 --max-prompt-length 512 \\
        --batch 2 --dtypes fp32 --no-ablations --threads 1       # a Qwen2.5-like vocabulary, 1,024-token pairs

Protocol. The model is the tiny GPT-2 of ``prefopt.tiny`` (4 layers, width 256, byte-level BPE 4096 trained on the
HH text; built into ``--work`` on first use, ``assets.py``). Pairs are the HH-RLHF harmless-base rows of
../shared/data, tokenized once by prefopt (prompt cut from the left to 256 tokens, prompt + response <=
``--max-length`` 384), shuffled with a fixed seed and cut into batches of ``--batch`` 8 pairs (``--long-pairs``: each
lengthened to fill ``--max-length``, see ``lengthened``). Both libraries get exactly these
token ids in exactly this batch order: TRL's train set is the same rows, read sequentially, and a collator hands TRL
the same ids (TRL's own DataCollatorForPreference for DPO and RewardTrainer, the ORPO tensors for ORPOTrainer); the
first batches are checked to be equal tensors.

Every contestant (``offline_contestants.py``) is a real training loop in its own thread (``turns.py``):
``prefopt.trainer.Trainer.fit`` for ours, ``trainer.train()`` for TRL. A baton lets exactly one thread run at a
time, one optimizer step each in turn, so all contestants of a run see the same machine load; a step is timed from
its start to the end of its optimizer update (TRL: ``on_step_begin`` to ``on_step_end``; ours:
``Trainer._train_step``). The first ``--warmup`` steps are dropped and the median of the rest is reported.
accelerate's mixed-precision state is per process, so each dtype is one worker process (``measure.run_worker``;
fp32: TRL with ``bf16=False``; bf16: TRL's defaults as they are, ours with ``train.mixed_precision=bf16``), and the
losses are compared within one dtype.

Reported per contestant (``report.py``): median s/step, tokens/s (non-pad tokens of the batch's chosen + rejected
rows, the same count for both libraries), loss at step 0 (and the largest |loss difference| to TRL over the first
steps), MFU and peak RSS. MFU = 6 * N * tokens / step time / ceiling, N = the parameters a token passes through as
matmuls (blocks + the tied LM head, not the position table): the model FLOPs of the task, equal for both libraries,
so MFU ratios are speed ratios; the DPO reference forward and gradient checkpointing's recompute are not counted.
The ceiling is the best torch.mm throughput of this dtype on shapes of this model (and 1024^3), measured in the same
worker before and after the steps. Peak memory is ``ru_maxrss`` of a separate process that runs only that contestant
for ``--memory-steps`` steps, with the process's RSS before building the contestant (imports, data) shown as the
baseline. The ablation rows are prefopt with one speed choice undone (``ablations.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from assets import ROOT, add_shape_arguments, build_assets, shape_flags, shape_of
from measure import matmul_ceiling, parameters_per_token, peak_rss_mb, rss_mb, run_worker
from offline_contestants import KINDS, RECORDS, TRL, Ours, data_config, load_pairs
from report import MAIN, markdown, summarise
from turns import Contestant, run_in_turns


# ----------------------------------------------------------------------------------------------------- the run
def lineup(args: argparse.Namespace) -> list[tuple[str, str, type, dict[str, Any]]]:
    """(name, algorithm, class, options) of every contestant of this worker."""
    out = []
    for algo in args.algorithms:
        out.append((f"{algo}/prefopt", algo, Ours, {}))
        if algo == "dpo":
            out.append((f"{algo}/prefopt+precompute", algo, Ours, {"precompute": True}))
        out.append((f"{algo}/trl-default", algo, TRL, {}))
        out.append((f"{algo}/trl-best", algo, TRL, {"best": True}))
        if args.ablations and args.dtype == "fp32":
            if algo != "sft":
                out.append((f"{algo}/prefopt-no-prefix-sharing", algo, Ours, {"sharing": False}))
                out.append((f"{algo}/prefopt-no-packing", algo, Ours, {"no_packing": True}))
            out.append((f"{algo}/prefopt+length-bucketing", algo, Ours, {"bucketing": True}))
            if algo != "reward":
                out.append((f"{algo}/prefopt+full-logits", algo, Ours, {"full_logits": True}))
                out.append((f"{algo}/prefopt+unchunked-head", algo, Ours, {"unchunked": True}))
            if algo == "dpo":
                out.append((f"{algo}/prefopt-no-sharing+two-forwards", algo, Ours,
                            {"sharing": False, "two_forwards": True}))
    return [c for c in out if not args.only or c[0] in args.only]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run this worker's contestants in turn, one step each, and return their measurements."""
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer

    from prefopt.data import build_dataloader

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    assets = build_assets(args.work, shape_of(args, args.max_length))
    tokenizer = AutoTokenizer.from_pretrained(assets["lm"])
    pairs = load_pairs(args)
    shared = {"assets": assets, "tokenizer": tokenizer, "pad_id": tokenizer.pad_token_id, "pairs": pairs}
    for kind in ("pairs", "ranks", "sft"):  # every contestant of a kind trains on these batches, in this order
        loader, _ = build_dataloader([RECORDS[kind](r) for r in pairs], kind, tokenizer, data_config(args), args.batch,
                                     shuffle=False, seed=args.seed, length_bucketing=False)
        shared[f"features_{kind}"] = list(loader.dataset)
        shared[f"batches_{kind}"] = list(loader)
        shared[f"tokens_{kind}"] = [int(b.attention_mask.sum()) for b in shared[f"batches_{kind}"]]
    features, batches = shared["features_pairs"], shared["batches_pairs"]
    shared["features"] = features
    baseline_rss = rss_mb()
    ceiling_before = matmul_ceiling(args.dtype) if not args.memory_run else float("nan")

    contestants = [cls(name, algo, args, shared, **options) for name, algo, cls, options in lineup(args)]
    run_in_turns(contestants, check=lambda: check_same_batches(contestants, shared))
    ceiling_after = matmul_ceiling(args.dtype) if not args.memory_run else float("nan")

    tokens = [int(b.attention_mask.sum()) for b in batches]
    return {
        "token_slots_per_step": token_slots(batches, pairs, tokenizer, args),
        "dtype": args.dtype, "threads": torch.get_num_threads(), "baseline_rss_mb": baseline_rss,
        "peak_rss_mb": peak_rss_mb(),
        "ceiling_gflops": {"before": ceiling_before, "after": ceiling_after},
        "tokens_per_step": tokens, "padded_tokens_per_step": [b.input_ids.numel() for b in batches],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "contestants": {c.name: {"algorithm": c.algorithm, "side": c.side, "options": c.options, "times": c.times,
                                 "cpu_times": c.cpu_times,
                                 "losses": c.losses, "tokens": c.tokens, "setup_s": c.setup_s}
                        for c in contestants},
    }


def token_slots(batches: list[Any], pairs: list[dict[str, Any]], tokenizer: Any,
                args: argparse.Namespace) -> dict[str, float]:
    """Mean token positions one forward runs per step: padded rows, shared prefixes (one pair per row, packed, or the
    prompt once with its two responses on its KV cache; prefopt picks the cheapest, prefopt.prefix.choose_layout)."""
    from prefopt.data import build_dataloader
    from prefopt.prefix import cache_prefixes, pair_groups, share_prefixes

    def packed(b: Any, pack: bool = True) -> int:
        return share_prefixes(b.input_ids, b.attention_mask, pair_groups(b.num_pairs), pack=pack).num_tokens

    bucketed, _ = build_dataloader(pairs, "pairs", tokenizer, data_config(args), args.batch, shuffle=True,
                                   seed=args.seed, length_bucketing=True)
    mean = statistics.mean
    return {"real tokens": mean(int(b.attention_mask.sum()) for b in batches),
            "padded rows (TRL, prefopt-no-prefix-sharing)": mean(b.input_ids.numel() for b in batches),
            "shared prefix, one pair per row": mean(packed(b, pack=False) for b in batches),
            "shared prefix, packed": mean(packed(b) for b in batches),
            "shared prefix, cached": mean(cache_prefixes(b.input_ids, b.attention_mask, pair_groups(b.num_pairs))
                                          .num_tokens for b in batches),
            "padded rows, length-bucketed batches": mean(b.input_ids.numel() for b in bucketed),
            "shared prefix, packed, length-bucketed batches": mean(packed(b) for b in bucketed)}


def check_same_batches(contestants: list[Contestant], shared: dict[str, Any]) -> None:
    """TRL's first DPO / SFT / reward batches hold exactly prefopt's tensors (ORPO's collator is built from them)."""
    import torch

    for c in contestants:
        if not isinstance(c, TRL):
            continue
        kind = "pairs" if c.algorithm == "reward" else KINDS[c.algorithm]  # TRL's RM collator: chosen, then rejected
        for k, ours in enumerate(shared[f"batches_{kind}"][:2]):
            got = c.trainer.data_collator([c.trainer.train_dataset[i] for i in range(k * c.args.batch, (k + 1) * c.args.batch)])
            if c.algorithm == "orpo":
                n = ours.num_pairs
                got = {"input_ids": torch.cat([got["chosen_input_ids"], got["rejected_input_ids"]]),
                       "attention_mask": torch.cat([got["chosen_attention_mask"], got["rejected_attention_mask"]]),
                       "completion_mask": torch.cat([got["chosen_labels"], got["rejected_labels"]]) != -100}
                assert n == c.args.batch
            assert torch.equal(got["input_ids"], ours.input_ids), c.name
            assert torch.equal(got["attention_mask"], ours.attention_mask), c.name
            if "completion_mask" in got:
                assert torch.equal(got["completion_mask"].long(), ours.completion_mask), c.name
            if "labels" in got:  # SFT: -100 on the prompt and the padding
                assert torch.equal(got["labels"], ours.labels), c.name


def common_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--algorithms", ",".join(args.algorithms), "--warmup", str(args.warmup), "--seed", str(args.seed),
             "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
             "--work", str(args.work), "--batch", str(args.batch), *shape_flags(args)]
    flags += (["--long-pairs"] if args.long_pairs else []) + (["--keep-mb", str(args.keep_mb)] if args.keep_mb is not None else [])
    flags += ["--ablations" if args.ablations else "--no-ablations"]
    return flags + (["--threads", str(args.threads)] if args.threads else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default="dpo,orpo,reward,sft", type=lambda s: s.split(","))
    parser.add_argument("--dtypes", default="fp32,bf16", type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per contestant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--memory-steps", type=int, default=4, help="steps of each peak-memory process (0: none)")
    parser.add_argument("--no-memory", dest="memory_steps", action="store_const", const=0)
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--max-length", type=int, default=384, help="prompt + response tokens, at most")
    parser.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens (cut from the left)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (the same batches for every contestant)")
    parser.add_argument("--long-pairs", action="store_true",
                        help="pairs lengthened to fill --max-length (see lengthened): the HH pairs are short")
    parser.add_argument("--keep-mb", type=float, help="prefopt's model.logits.keep_mb (default: the recipe default)")
    add_shape_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "bench_runs" / "vs_trl")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--only", default="", type=lambda s: [x for x in s.split(",") if x],
                        help="contestants to run, e.g. dpo/prefopt+precompute,dpo/trl-best (default: all)")
    parser.add_argument("--memory-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        result = worker(args)
        args.worker.write_text(json.dumps(result))
        return

    assets = build_assets(args.work, shape_of(args, args.max_length))
    lm_params = parameters_per_token(assets["lm"])
    n_params = {a: parameters_per_token(assets["rm"], reward_model=True) if a == "reward" else lm_params
                for a in args.algorithms}
    results, rows = {}, []
    for dtype in args.dtypes:
        flags = common_flags(args) + ["--dtype", dtype]
        results[dtype] = run_worker(__file__, args.work, flags + ["--steps", str(args.steps),
                                                                  "--only", ",".join(args.only)])
        memory = {}
        if args.memory_steps:
            warm = max(args.memory_steps - args.warmup, 0)
            for name in results[dtype]["contestants"]:
                if name.split("/")[1] not in MAIN:
                    continue  # ablations: timing only
                one = run_worker(__file__, args.work, [*flags, "--steps", str(warm), "--only", name, "--memory-run"])
                memory[name] = {"peak_rss_mb": one["peak_rss_mb"], "baseline_rss_mb": one["baseline_rss_mb"]}
        rows += summarise(results[dtype], args.warmup, n_params, memory)
    table = markdown(rows, results, args, args.batch)
    (args.work / "results.json").write_text(json.dumps({"results": results, "rows": rows}, indent=1))
    (args.work / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
