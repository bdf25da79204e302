"""The three ways to run rows that share prefixes, timed side by side: padded rows, packed layout, cached layout.

For each setting (a model shape and a batch of groups: online G samples of a prompt, preference pairs, long pairs)
one forward + backward of the decoder trunk (the LM head's work is the same in every layout) in each layout, the
median of ``--repeats`` runs (the layouts take turns), beside ``prefopt.prefix.layout_costs``'s modelled costs
and the layout ``choose_layout`` picks; the last column says whether the pick is the fastest (or within 5% of
it). This is how ``prefix.choice.ATTENTION_WEIGHT`` and ``COPY_WEIGHT`` are fitted and checked.

    cd benchmarks && nice -n 10 python prefix_layouts.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

from prefopt.prefix import cache_prefixes, choose_layout, layout_costs, share_prefixes


@dataclass
class Setting:
    name: str
    shape: str  # "gpt2" (4 x 256, 4 heads) or "qwen2" (4 x 64, 4 heads, 2 KV heads)
    prompts: list[int]  # prompt length of each group
    branches: list[list[int]]  # branch lengths of each group


def settings() -> list[Setting]:
    rng = np.random.default_rng(0)

    def online(length: int, shape: str, samples: int = 8) -> Setting:
        lengths = [list(rng.integers(length // 2, length + 1, samples)) for _ in range(2)]
        for group in lengths:
            group[:3] = [length] * 3  # some run to the limit (truncated)
        return Setting(f"online G={samples} x 2, prompts 60/96, responses <= {length}", shape, [60, 96], lengths)

    hh = Setting("HH-like pairs x 8 (prompts 20-120, responses 10-150)", "gpt2",
                 list(rng.integers(20, 121, 8)), [list(rng.integers(10, 151, 2)) for _ in range(8)])
    return [online(16, "gpt2"), online(32, "gpt2"), online(128, "gpt2"), online(256, "gpt2"), online(256, "qwen2"),
            hh, Setting("pair 512 + 2 x 512 x 1 (long pairs)", "gpt2", [512], [[512, 512]]),
            Setting("pair 512 + 2 x 512 x 1 (long pairs)", "qwen2", [512], [[512, 512]]),
            Setting("ranking K=4, prompt 64 + 4 x 64, x 4", "qwen2", [64] * 4, [[64] * 4] * 4)]


def model_of(shape: str) -> torch.nn.Module:
    common = dict(vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if shape == "gpt2":
        config = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=2048, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common)
    else:
        config = Qwen2Config(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=192, max_position_embeddings=2048, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).train()


def rows_of(setting: Setting) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Right-padded rows: each group's prompt then each branch (random tokens), and the groups."""
    gen = torch.Generator().manual_seed(0)
    rows, groups = [], []
    for prompt, branches in zip(setting.prompts, setting.branches):
        head = torch.randint(1, 512, (int(prompt),), generator=gen)
        groups.append(list(range(len(rows), len(rows) + len(branches))))
        rows += [torch.cat([head, torch.randint(1, 512, (int(b),), generator=gen)]) for b in branches]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask, groups


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns (one warm-up round first)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="setting indices (0-based)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    print("| setting | shape | padded s | packed s | cached s | cost padded / packed / cached (M) | picked | "
          "fastest | pick ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for index, setting in enumerate(settings()):
        if args.only and str(index) not in args.only:
            continue
        model = models.setdefault(setting.shape, model_of(setting.shape))
        decoder = model.get_decoder()
        ids, mask, groups = rows_of(setting)

        def run(layout):
            def step():
                if layout is None:
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                    out.last_hidden_state.sum().backward()
                else:
                    layout.hidden(decoder).sum().backward()
                model.zero_grad(set_to_none=True)
            return step

        layouts = {"padded": None, "packed": share_prefixes(ids, mask, groups),
                   "cached": cache_prefixes(ids, mask, groups)}
        seconds = timed({name: run(layout) for name, layout in layouts.items()}, args.repeats)
        costs = layout_costs(ids, mask, groups, model.config.get_text_config().hidden_size)
        chosen = choose_layout(ids, mask, groups, model)
        picked = "padded" if chosen is None else ("cached" if hasattr(chosen, "prefix_ids") else "packed")
        fastest = min(seconds, key=seconds.get)
        ok = seconds[picked] <= 1.05 * seconds[fastest]
        print(f"| {setting.name} | {setting.shape} | {seconds['padded']:.3f} | {seconds['packed']:.3f} | "
              f"{seconds['cached']:.3f} | {' / '.join(f'{costs[k] / 1e6:.1f}' for k in layouts)} | {picked} | "
              f"{fastest} | {'yes' if ok else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
