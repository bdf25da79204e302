"""Generation against the machine's limit: prefopt's engine, transformers' ``generate``, and one forward pass.

    python benchmarks/generation.py                                  # batch 32 (8 prompts x G = 4), 256 new tokens
    python benchmarks/generation.py --max-new-tokens 32 --arch qwen2 --vocab 151936

The three run in turn, ``--repeats`` times each, on the same model (``assets.py``, any shape), threads and prompts
(the first ``--prompts`` HH prompts of 24..96 tokens, left-padded), every response running the full
``--max-new-tokens`` (the EOS id is one no draw can give, so all three do the same work):

* ``prefopt engine``: ``prefopt.rl.engine.generate`` (prompts prefilled once, KV cache written in place, one model
  call and one Gumbel-max draw per token, behaviour log-probs);
* ``transformers generate``: the engine as it was before (``ablations.hf_decode`` through the same ``generate``:
  ``model.generate`` with ``output_logits``, its cache and its ``torch.multinomial`` sampler);
* ``one forward``: a plain forward (no grad) over the same prompt + response tokens, the rate a batched pass reaches
  on this machine: the ceiling generation is compared with (the issue's target: >= 50% of it).

Reported: the median seconds, milliseconds per new token (per decode step) and new tokens/s of each sampler, the
forward's tokens/s over all the tokens it runs, each sampler's tokens/s as a share of the forward's, and the machine's
load averages before and after (timings on a loaded machine are noisy; the shares are measured side by side). Writes
``results.md`` in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from ablations import hf_decode, swapped
from assets import add_shape_arguments, build_assets, shape_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_runs/generation"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    add_shape_arguments(parser)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import prefopt.rl.engine
    from prefopt.config import DataConfig, ModelConfig
    from prefopt.data import build_dataloader
    from prefopt.models import load_tokenizer
    from prefopt.rl.engine import GenerationConfig, generate
    from vs_trl_online import load_prompts

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    assets = build_assets(args.work, shape_of(args, 96 + args.max_new_tokens))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(assets["lm"])))
    model = AutoModelForCausalLM.from_pretrained(assets["lm"], dtype=torch.float32).eval()
    records = [{"prompt": p} for p in load_prompts(argparse.Namespace(max_prompt=96, prompts=args.prompts, warmup=0,
                                                                      steps=1), tokenizer)]
    config = DataConfig(path="-", format="prompts", eval_fraction=0.0, max_prompt_length=96)
    batch = next(iter(build_dataloader(records, "prompts", tokenizer, config, args.prompts, shuffle=False, seed=0)[0]))
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    no_eos = [model.config.get_text_config().vocab_size]  # an id no draw can give: every response runs the full length

    def engine():
        with swapped(prefopt.rl.engine, "eos_ids", lambda *_: no_eos):
            return generate(model, tokenizer, batch, gen, num_samples=args.num_samples, seed=0)

    def before():
        with swapped(prefopt.rl.engine, "eos_ids", lambda *_: no_eos), swapped(prefopt.rl.engine, "decode", hf_decode):
            return generate(model, tokenizer, batch, gen, num_samples=args.num_samples, seed=0)

    sequences = engine().sequences
    mask = torch.ones_like(sequences)

    def forward():
        with torch.no_grad():
            model(input_ids=sequences, attention_mask=mask)

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"prefopt engine": [], "transformers generate": [], "one forward": []}
    for _ in range(args.repeats):
        for name, fn in zip(times, (engine, before, forward)):
            start = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - start)
            if out is not None:
                assert out.response_ids.shape[1] == args.max_new_tokens
    new_tokens = sequences.shape[0] * args.max_new_tokens
    forward_rate = sequences.numel() / statistics.median(times["one forward"])
    lines = [f"`python benchmarks/generation.py {' '.join(sys.argv[1:])}`", "",
             f"{args.arch}, {args.layers} layers, width {args.width}, vocabulary {args.vocab}; {args.prompts} prompts "
             f"x G = {args.num_samples} = {sequences.shape[0]} rows, {batch.input_ids.shape[1]} prompt columns + "
             f"{args.max_new_tokens} new tokens, fp32, {args.threads} thread(s), median of {args.repeats}; "
             f"load averages {' '.join(f'{x:.2f}' for x in load_before)} before, "
             f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after.", "",
             "| | s | ms per step | tokens/s | share of the forward's tokens/s |", "|---|---|---|---|---|"]
    for name, values in times.items():
        seconds = statistics.median(values)
        rate = (sequences.numel() if name == "one forward" else new_tokens) / seconds
        step = "" if name == "one forward" else f"{seconds / args.max_new_tokens * 1e3:.1f}"
        lines.append(f"| {name} | {seconds:.3f} | {step} | {rate:.0f} | {rate / forward_rate:.2f} |")
    table = "\n".join(lines) + "\n"
    (args.work / "results.md").write_text(table)
    (args.work / "results.json").write_text(json.dumps(times, indent=1))
    print(table)


if __name__ == "__main__":
    main()
