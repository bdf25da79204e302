"""``prefopt`` command line: train, data, list, init-model, merge-adapter, generate, eval, bench.

Every user error prints one line ``prefopt: error: ...`` and exits 2 (no traceback); a non-finite stop exits 3;
an interrupted run (SIGTERM/SIGINT) saves a checkpoint, prints ``prefopt: stopped: ...`` and exits 128 + the
signal number. Any other exception is a bug or something unforeseen: it prints ``prefopt: unexpected error:
<type>: <message>`` and a hint, and exits 1; ``-v`` or ``PREFOPT_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import traceback
from typing import Any

from prefopt.errors import PrefoptError


def quiet_loading() -> None:
    """No weight-loading, shard-writing or table-building bars (transformers, datasets): commands print their own
    lines."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def cmd_train(args: argparse.Namespace) -> int:
    from prefopt.config import load_config

    config = load_config(args.recipe, args.overrides)  # before the heavy imports: a bad recipe is refused at once
    from prefopt.trainer import Trainer

    if not config.train.progress:  # no bars at all: also the weight loading / saving and table building ones
        quiet_loading()
    trainer = Trainer(config)
    final = trainer.fit()
    if trainer.accelerator.is_main_process:  # under `accelerate launch`, one JSON
        print(json.dumps({"output_dir": config.train.output_dir, **final}, indent=2))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from prefopt.config import load_config
    from prefopt.data import run_tokenizer
    from prefopt.data.preview import preview
    from prefopt.registry import ALGORITHMS

    quiet_loading()
    config = load_config(args.recipe, args.overrides)
    kind = ALGORITHMS.get(config.algorithm_name).kind
    print(preview(config.data, kind, run_tokenizer(config), config.eval_data))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from prefopt.config import describe_fields
    from prefopt.registry import ADVANTAGES, ALGORITHMS, KINDS, LOSSES, POLICY_LOSSES, REWARDS

    if args.json:
        print(json.dumps({"algorithms": {n: c.kind for n, c in ALGORITHMS.items()}, "losses": LOSSES.available(),
                          "rewards": REWARDS.available(), "kinds": KINDS.available(),
                          "advantages": ADVANTAGES.available(), "policy_losses": POLICY_LOSSES.available()}, indent=2))
        return 0
    print("Algorithms (algorithm.name):")
    for name, cls in ALGORITHMS.items():
        print(f"\n  {name}  [kind: {cls.kind}]  {cls.describe()}")
        for field, type_name, default, doc in describe_fields(cls.Config):
            print(f"      {field}: {type_name} = {default!r}" + (f"  # {doc}" if doc else ""))
    print("\nPairwise losses (algorithm.loss, parameters in algorithm.loss_params):")
    for name, fn in LOSSES.items():
        print(f"  {name:10s} {_first_doc_line(fn)}{'  [reference-free]' if getattr(fn, 'reference_free', False) else ''}")
    print("\nReward components (rewards[].name):")
    for name, obj in REWARDS.items():
        print(f"  {name:14s} {_first_doc_line(obj)}")
    print("\nOnline advantage estimators (algorithm.advantage):", ", ".join(ADVANTAGES.available()))
    print("Online policy losses (algorithm.loss_type):", ", ".join(POLICY_LOSSES.available()))
    print("\nData kinds:", ", ".join(KINDS.available()))
    return 0


def _first_doc_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    if not doc and hasattr(obj, "__module__"):
        doc = (sys.modules[obj.__module__].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def cmd_init_model(args: argparse.Namespace) -> int:
    from prefopt.export import new_model_folder
    from prefopt.tiny import init_model

    new_model_folder(pathlib.Path(args.out), args.overwrite, "the new model")
    quiet_loading()
    path = init_model(args.out, corpus=args.corpus, arch=args.arch, size=args.size, vocab_size=args.vocab_size,
                      seed=args.seed, max_texts=args.max_texts, chat_template=args.chat_template)
    print(path)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from prefopt.export import merge_adapter

    quiet_loading()
    merge_adapter(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
    print(args.out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from prefopt.judge.commands import run_generate

    quiet_loading()
    return run_generate(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from prefopt.judge.commands import run_eval

    quiet_loading()
    return run_eval(args)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The prompt set and sampling options shared by ``generate`` and ``eval``."""
    p.add_argument("--prompts", help="prompts file, directory or hub dataset (any format the data layer reads: "
                                     "prompts, chat messages, HH pairs, ...)")
    p.add_argument("--format", default="auto", help="row format of the prompts file (data.format)")
    p.add_argument("--split", default="train", help="split to read (data.split)")
    p.add_argument("--chat-template", default=None,
                   help="auto (the tokenizer's), none (HH text), chatml, llama3 or a template file (data.chat_template)")
    p.add_argument("--samples", type=int, default=1, help="replies per prompt and model")
    p.add_argument("--seed", type=int, default=0, help="sample j of prompt batch b uses seed + 104729 j + b")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="decode greedily instead of sampling")
    p.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept (from the end)")
    p.add_argument("--max-length", type=int, default=512, help="prompt + response tokens of a pair (--pairs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip rows of --prompts / --pairs the data layer cannot use (counted, with their places, "
                        "in the manifest / summary) instead of stopping at the first")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results at --out")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.recipe == "report":  # prefopt bench report RUN_DIR: results.md from the run directory alone
        return cmd_bench_report(args.overrides)
    from prefopt.bench.runner import run_bench

    out = run_bench(args.recipe, args.overrides)
    print(out)
    return 0


def cmd_bench_report(paths: list[str]) -> int:
    from pathlib import Path

    from prefopt.bench.report import write_report
    from prefopt.errors import DataError

    if len(paths) != 1:
        raise DataError(f"usage: prefopt bench report RUN_DIR (one run directory), got {len(paths)} arguments")
    if not Path(paths[0]).is_dir():
        raise DataError(f"{paths[0]}: not a directory (a bench run directory holds bench.json, plan.json, runs/)")
    print(write_report(paths[0]))
    print(f"\nwritten: {Path(paths[0]) / 'results.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level and print tracebacks (also PREFOPT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one recipe: prefopt train RECIPE.yaml [section.key=value ...]")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=10 algorithm.beta=0.2")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="show what a recipe's data becomes, without training: formats, rows per split, "
                                     "skips with places, the first example of each split as tokens")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.path=prefs.parquet data.split=test")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("list", help="registered algorithms (with config fields), losses, reward components")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("init-model", help="train a byte-level BPE tokenizer on a corpus and build a tiny causal LM")
    p.add_argument("out")
    p.add_argument("--corpus", nargs="+", required=True,
                   help="texts to train the tokenizer on: .txt, HH files/dirs, or any data file data.path takes")
    p.add_argument("--arch", choices=["gpt2", "llama", "qwen2"], default="gpt2")
    p.add_argument("--size", default="tiny", help="nano (~0.4M parameters), micro (~1.3M), tiny (~4.3M), small, base")
    p.add_argument("--chat-template", choices=["chatml", "llama3"], default=None,
                   help="add this chat template and its special tokens (ChatML: <|im_end|> is the EOS)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-texts", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing OUT folder")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("merge-adapter", help="merge a saved LoRA adapter into its base model")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--base", default=None, help="the base model (hub id or folder); default: the one the adapter names")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing OUT folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="sample replies from one or more models on a prompts file (JSON lines)")
    p.add_argument("--models", nargs="+", required=True, metavar="[NAME=]PATH",
                   help="models (full weights or LoRA adapters; local folders or hub ids)")
    p.add_argument("--out", required=True, help="the replies file to write (.jsonl; a .manifest.json beside it)")
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="judge models' replies: scores, win rate with a CI, KL, length, pass@k, "
                                    "preference accuracy")
    p.add_argument("--models", nargs="+", metavar="[NAME=]PATH", help="models to sample from (with --prompts), or "
                                                                      "paths of the models of --replies")
    p.add_argument("--replies", help="judge the replies of a `prefopt generate` file instead of sampling")
    p.add_argument("--judge", action="append", metavar="SPEC",
                   help="a reward component (format_validity), a function module:function, or a YAML mapping "
                        "{name: reward_model, params: {path: ...}}; repeatable, the first is the score")
    p.add_argument("--baseline", help="the model (by name) every model's win rate is against")
    p.add_argument("--reference", help="model name or path: KL(pi || reference) and the implicit reward's pi_ref")
    p.add_argument("--pairs", help="held-out preference pairs: implicit-reward preference accuracy")
    p.add_argument("--pass-threshold", type=float, default=None,
                   help="a reply is correct when its score >= this (pass@k); default: 1 when scores are all 0/1")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--out", required=True, help="directory for summary.json, prompts.jsonl, replies.jsonl")
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="run a benchmark recipe: several algorithms, same start, same splits; "
                                      "`prefopt bench report RUN_DIR` rebuilds results.md from a run directory")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors are one line and exit 2, never a traceback (see the module docstring)."""
    args = build_parser().parse_args(argv)
    debug = args.verbose or os.environ.get("PREFOPT_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except PrefoptError as exc:
        if debug:
            traceback.print_exc()
        print(f"prefopt: {getattr(exc, 'label', 'error')}: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("prefopt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, or an error we did not foresee: one line unless asked for the traceback
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split()) or "(no message)"
        hint = "" if debug else " (rerun with -v or PREFOPT_DEBUG=1 for the traceback)"
        print(f"prefopt: unexpected error: {type(exc).__name__}: {message}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
