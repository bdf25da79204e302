"""``prefopt generate`` and ``prefopt eval``: the evaluation core (prefopt.judge) on files.

generate: every model samples ``--samples`` replies per prompt of ``--prompts`` (any prompt file the data layer
reads: plain prompts, chat messages, HH rows), rendered with the model's chat template as training renders it,
with common random numbers across models (prefopt.judge.sampling); one JSON line per reply (prefopt.judge.replies).

eval: the same replies, drawn on the fly (``--models`` and ``--prompts``) or read back (``--replies``), judged by
``--judge`` (reward components), with the KL to ``--reference``, the win rate against ``--baseline`` and pass@k
(prefopt.judge.summary); the implicit-reward preference accuracy on ``--pairs`` (prefopt.judge.pairs). Writes
``summary.json``, ``prompts.jsonl`` (per model and prompt), ``replies.jsonl`` (per reply, with its scores) and
``pairs.jsonl``, and prints a short table.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

import prefopt
from prefopt.config import DataConfig, check
from prefopt.errors import ConfigError
from prefopt.judge.inputs import (ModelSpec, batches_of, build_judges, judge_names, judge_specs, load_policy,
                                  load_policy_tokenizer, model_specs, read_set, vocabulary)
from prefopt.judge.pairs import pair_logps, preference_rows
from prefopt.judge.replies import jsonl, prompt_records, read_replies, rebuilt_draws, write_replies, write_text
from prefopt.judge.sampling import draws, measure
from prefopt.judge.summary import preference_summary, prompt_frame, summarise, table
from prefopt.rl.engine import GenerationConfig

OUTPUTS = ("summary.json", "prompts.jsonl", "replies.jsonl", "pairs.jsonl")


def generation_config(args: Any) -> GenerationConfig:
    check(args.samples >= 1, "--samples", args.samples, "must be >= 1")
    check(args.batch_size >= 1, "--batch-size", args.batch_size, "must be >= 1")
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, do_sample=not args.greedy)


def data_config(args: Any, path: str) -> DataConfig:
    return DataConfig(path=path, format=args.format, split=args.split, chat_template=args.chat_template or "auto",
                      eval_fraction=0.0, max_length=args.max_length, max_prompt_length=args.max_prompt_length)


def device_of(args: Any) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def versions() -> dict[str, str]:
    return {"prefopt": prefopt.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def arguments(args: Any) -> dict[str, Any]:
    """The command's arguments as given (recorded next to its results)."""
    return {key: value for key, value in vars(args).items() if key != "func"}


def claim(path: Path, overwrite: bool, what: str) -> None:
    """Refuse to write over earlier results unless asked (they are removed whole: nothing of both is mixed)."""
    exists = path.is_dir() and any(path.iterdir()) if what == "directory" else path.exists()
    if exists and not overwrite:
        raise ConfigError(f"--out {str(path)!r} already holds results; pass --overwrite to replace them")
    if exists and what == "directory":
        for name in OUTPUTS:
            (path / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- generate


def run_generate(args: Any) -> int:
    out = Path(args.out)
    claim(out, args.overwrite, "file")
    gen, device = generation_config(args), device_of(args)
    data = data_config(args, args.prompts)
    prompts = read_set(data, "prompts", "prompts file", args.skip_bad_rows)
    records, places = prompts.records, prompts.places
    rows = []
    for spec in model_specs(args.models):  # the models in the order given, each in prompt then sample order
        model, tokenizer = load_policy(spec.path, args.dtype, device), load_policy_tokenizer(spec.path)
        batches = batches_of(records, places, "prompts", tokenizer, data, args.batch_size, "prompts file")
        replies = [reply_row(spec.name, row, records) for draw in draws(model, tokenizer, batches, gen, args.seed,
                                                                         args.samples) for row in measure(draw)]
        rows += sorted(replies, key=lambda r: (r["prompt_index"], r["sample"]))
        del model
    manifest = {"models": {s.name: s.path for s in model_specs(args.models)}, "prompts": prompts.sources,
                "skipped": prompts.skipped, "generation": dataclasses.asdict(gen), "seed": args.seed, "samples": args.samples,
                "batch_size": args.batch_size, "data": dataclasses.asdict(data), "dtype": args.dtype,
                "replies": len(rows), "versions": versions(), "arguments": arguments(args)}
    write_replies(out, rows, manifest)
    print(f"{len(rows)} replies ({len(records)} prompts x {args.samples} samples x {len(args.models)} models) -> {out}")
    return 0


def reply_row(model: str, row: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """A line of the replies file: the model's name and the prompt as the prompts file gave it (no rendered text)."""
    record = records[row["prompt_index"]]
    out = {"model": model, "prompt_index": row["prompt_index"], "sample": row["sample"], "seed": row["seed"],
           "prompt": record["prompt"], "meta": record.get("meta", {})}
    out.update({k: v for k, v in row.items() if k not in out and k != "prompt_text"})
    return out


# --------------------------------------------------------------------------------------------------- eval


@dataclass
class Plan:
    """What ``prefopt eval`` judges: the models, the prompt set and how the replies come (drawn or read)."""

    models: dict[str, ModelSpec]
    records: list[dict[str, Any]]
    places: list[str]
    data: DataConfig
    gen: GenerationConfig
    seed: int
    samples: int
    replies: dict[str, list[dict[str, Any]]] | None
    """Per model, the replies read from a generate file; None: draw them."""
    skipped: dict[str, Any]
    """Bad rows skipped (--skip-bad-rows) per set, by reason with example places."""
    sources: list[dict[str, Any]]
    """The files the prompts were read from (path, sha256, size)."""


def plan_from_prompts(args: Any) -> Plan:
    if not args.models or not args.prompts:
        raise ConfigError("give --models and --prompts (to sample replies), or --replies (a generate file)")
    data = data_config(args, args.prompts)
    prompts = read_set(data, "prompts", "prompts file", args.skip_bad_rows)
    return Plan({s.name: s for s in model_specs(args.models)}, prompts.records, prompts.places, data,
                generation_config(args), args.seed, args.samples, None, {"prompts": prompts.skipped},
                prompts.sources)


def plan_from_replies(args: Any) -> Plan:
    rows, manifest = read_replies(args.replies)
    paths = {s.name: s for s in model_specs([f"{n}={p}" for n, p in manifest["models"].items()])}
    paths.update({s.name: s for s in model_specs(args.models or [])})
    replies = {name: [r for r in rows if r["model"] == name] for name in dict.fromkeys(r["model"] for r in rows)}
    unknown = [name for name in replies if name not in paths]
    if unknown:
        raise ConfigError(f"{args.replies}: no path for model {unknown[0]!r}: name it with --models NAME=PATH")
    records = prompt_records(rows, args.replies)
    data = DataConfig(**{**manifest["data"], "chat_template": args.chat_template or manifest["data"]["chat_template"]})
    return Plan({name: paths[name] for name in replies}, records, [f"{args.replies} prompt {i}" for i in
                range(len(records))], data, GenerationConfig(**manifest["generation"]), manifest["seed"],
                manifest["samples"], replies, {"prompts": manifest.get("skipped", {})}, manifest["prompts"])


def run_eval(args: Any) -> int:
    out = Path(args.out)
    claim(out, args.overwrite, "directory")
    specs = judge_specs(args.judge or [])
    names = judge_names(specs)
    if args.baseline and not names:
        raise ConfigError("--baseline needs a --judge (the win rate compares judged scores)")
    plan = plan_from_replies(args) if args.replies else plan_from_prompts(args)
    if args.baseline and args.baseline not in plan.models:
        raise ConfigError(f"--baseline {args.baseline!r} is not one of the models: {', '.join(plan.models)}")
    pairs = None
    if args.pairs:
        if not args.reference:
            raise ConfigError("--pairs needs --reference (the implicit reward is log pi / pi_ref)")
        pair_set = read_set(dataclasses.replace(plan.data, path=args.pairs, format="auto"), "pairs", "pairs file",
                            args.skip_bad_rows)
        pairs, plan.skipped["pairs"] = (pair_set.records, pair_set.places), pair_set.skipped
    device = device_of(args)
    tokenizers = {name: load_policy_tokenizer(spec.path) for name, spec in plan.models.items()}
    reference = None
    if args.reference:
        path = plan.models[args.reference].path if args.reference in plan.models else args.reference
        theirs = vocabulary(load_policy_tokenizer(path))
        for name, tokenizer in tokenizers.items():
            if vocabulary(tokenizer) != theirs:
                raise ConfigError(f"--reference {args.reference!r} has another vocabulary than model {name!r}: KL "
                                  "and the implicit reward compare log-probs of the same tokens")
        reference = load_policy(path, args.dtype, device)
    judges: dict[Any, dict[str, Any]] = {}  # per distinct vocabulary: a reward model is loaded once
    samples, pair_rows = {}, {}
    for name, spec in plan.models.items():
        tokenizer, model = tokenizers[name], None
        if args.reference in (name, spec.path):
            model = reference  # the same weights: one copy, and its KL is 0 by construction
        elif plan.replies is None or reference is not None:  # draws, KL and pairs need the policy itself
            model = load_policy(spec.path, args.dtype, device)
        vocab = vocabulary(tokenizer)
        if vocab not in judges:
            judges[vocab] = build_judges(specs, tokenizer, device)
        batches = batches_of(plan.records, plan.places, "prompts", tokenizer, plan.data, args.batch_size, "prompts")
        source = draws(model, tokenizer, batches, plan.gen, plan.seed, plan.samples) if plan.replies is None \
            else rebuilt_draws(plan.replies[name], batches, tokenizer.pad_token_id)
        rows = []
        for draw in source:
            draw.rollout = draw.rollout.to(device)
            rows += [reply_row(name, row, plan.records) for row in measure(
                draw, judges[vocab], model, reference, plan.gen.logprob_temperature, entropy=model is not None)]
        samples[name] = sorted(rows, key=lambda r: (r["prompt_index"], r["sample"]))
        if pairs:
            pair_batches = batches_of(*pairs, "pairs", tokenizer, plan.data, args.batch_size, "pairs file")
            policy, ref = pair_logps(model, pair_batches), pair_logps(reference, pair_batches)
            pair_rows[name] = [{"model": name, **row} for row in preference_rows(policy, ref)]
        del model
    settings = {"seed": plan.seed, "samples": plan.samples, "generation": dataclasses.asdict(plan.gen),
                "data": dataclasses.asdict(plan.data), "sources": plan.sources, "skipped": plan.skipped}
    return write_eval(args, out, names, samples, pair_rows, settings)


def write_eval(args: Any, out: Path, names: list[str], samples: dict[str, list[dict[str, Any]]],
               pair_rows: dict[str, list[dict[str, Any]]], settings: dict[str, Any]) -> int:
    """summary.json, prompts.jsonl, replies.jsonl, pairs.jsonl in ``out`` (summary last), and the table."""
    baseline = samples.get(args.baseline) if args.baseline else None
    summaries, prompt_rows = {}, []
    for name, rows in samples.items():
        frame = prompt_frame(rows, names, baseline, args.pass_threshold)
        summaries[name] = summarise(frame, args.level)
        prompt_rows += [{"model": name, **row} for row in frame.to_dict(orient="records")]
        if name in pair_rows:
            summaries[name].update(preference_summary(pair_rows[name], args.level))
    summary = {"models": summaries, "judges": names, "baseline": args.baseline, "reference": args.reference,
               "replies": args.replies, "prompts": args.prompts, "pairs": args.pairs, "batch_size": args.batch_size,
               "level": args.level, "pass_threshold": args.pass_threshold, **settings, "versions": versions(),
               "arguments": arguments(args)}
    write_text(out / "replies.jsonl", jsonl([r for rows in samples.values() for r in rows]))
    write_text(out / "prompts.jsonl", jsonl(prompt_rows))
    if pair_rows:
        write_text(out / "pairs.jsonl", jsonl([r for rows in pair_rows.values() for r in rows]))
    write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(table(summaries, names))
    print(f"-> {out}")
    return 0
