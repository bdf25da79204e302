"""Sparrow's shared trunk, measured: A2C with one frozen trunk vs the same A2C with separate full models.

Glaese et al. 2022 (arXiv 2209.14375) freeze the bottom layers and share them between the policy, the reference,
the value function and the reward models, so the trunk is held once and computed once per batch. This compares

  * ``shared``        prefopt's ``a2c``: the trunk features its generation computed (kept while sampling, no
                      trunk pass afterwards), then the policy top (trained), the reference top, the value head (an
                      MLP on trunk features, the default) and the preference + rule heads (copies of the top
                      blocks) on those features, each top's last block only on the columns read from it;
  * ``shared_blocks`` the same with ``value_head: blocks`` (the value is a copy of the top blocks + scalar head,
                      so it trains exactly what the separate value model trains);
  * ``separate``      the same A2C loss and trainable blocks, but the policy, reference, value, preference and rule
                      models are each a full model computing its own full forward;

on the same HH prompts, rollout sizes and generation seeds, in one process, alternating the variants step by step
after warm-up. Step = generation (the full policy, KV cache; in ``shared*`` it also keeps the trunk's output, plus
one trunk step on the last sampled token) + update (forwards, loss, backward, AdamW step). The trunk trick acts on
both: the trunk runs once per token, inside generation, and the update runs only the tops. Peak memory is the
peak RSS of a separate subprocess per variant (VmHWM on Linux, else ``resource.getrusage``), also shown above that
process's RSS before any model was built.

    python benchmarks/a2c_shared_trunk.py --out results/a2c_shared_trunk.json

Prints a markdown table and writes the numbers, settings and versions as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from prefopt.algorithms.a2c import A2C, a2c_objective
from prefopt.config import DataConfig, build_run_config
from prefopt.data import build_dataloader, load_rows
from prefopt.functional import masked_whiten
from prefopt.models import load_tokenizer
from prefopt.registry import ADVANTAGES
from prefopt.rl.advantages import AdvantageInputs
from prefopt.rl.engine import generate, rollout_inputs
from prefopt.rl.kl import kl_penalty, kl_shaped_rewards
from prefopt.rules import label_rows
from prefopt.scoring import logps_from_hidden, position_ids
from prefopt.sparrow import last_token, layout_of
from prefopt.tiny import init_model

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
RULES = ["no_url", "no_email"]  # learned rules: one rule head with two outputs
VARIANTS = ("shared", "shared_blocks", "separate")


# ------------------------------------------------------------------------------------------------ variants


def sparrow_config(args: argparse.Namespace, value_head: str, work: Path):
    rows = label_rows([("Q:", " see https://x.org"), ("Q:", " mail a@b.org"), ("Q:", " no")], RULES)
    work.mkdir(parents=True, exist_ok=True)
    rule_data = work / "rules.jsonl"
    rule_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_run_config({
        "algorithm": {"name": "a2c", "trainable_layers": args.trainable_layers, "value_head": value_head,
                      "generation": {"max_new_tokens": args.max_new_tokens}, "preference_weight": 1.0,
                      "rules": {name: 1.0 for name in RULES}, "rule_data": str(rule_data)},
        "model": {"name_or_path": str(args.model)},
        "train": {"output_dir": str(work / "run"), "learning_rate": 1e-5},
    })


class Shared:
    """prefopt's a2c itself (reward heads left untrained: their cost, not their values, matters here)."""

    def __init__(self, args: argparse.Namespace, tokenizer, value_head: str, work: Path):
        run = sparrow_config(args, value_head, work)
        self.algorithm = A2C(run.algorithm, run, tokenizer)
        self.algorithm.build()
        self.tokenizer, self.gen = tokenizer, run.algorithm.generation
        self.params = [p for p in self.algorithm.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=run.train.learning_rate)

    def modules(self) -> list[nn.Module]:
        a = self.algorithm
        return [a.lm, a.model, a.reference, a.preference_head, a.rule_head]

    def generate(self, batch, seed: int):
        torch.manual_seed(seed)  # the draw of generate(seed=seed); collect also keeps the trunk features
        return self.algorithm.collect(batch)

    def update(self, rollout) -> float:
        algorithm = self.algorithm
        scored = algorithm.score(rollout)
        (out,) = algorithm.update(scored, algorithm.advantages(scored), {})  # one rollout, one micro-batch
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())


class FullScalarModel(nn.Module):
    """A full transformer (its own copy of every block) + a linear head at every position: [B, T, outputs]."""

    def __init__(self, lm: nn.Module, outputs: int, trainable_layers: int = 0):
        super().__init__()
        self.backbone = copy.deepcopy(lm.base_model).requires_grad_(False)
        self.head = nn.Linear(self.backbone.config.hidden_size, outputs)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if trainable_layers:
            unfreeze_top(self.backbone, trainable_layers)
        else:
            self.head.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        return self.head(hidden).float()


def unfreeze_top(decoder: nn.Module, trainable_layers: int) -> None:
    layout = layout_of(decoder)
    for block in list(getattr(decoder, layout.blocks))[-trainable_layers:]:
        block.requires_grad_(True)
    getattr(decoder, layout.norm).requires_grad_(True)


def a2c_update_loss(logps: Tensor, values: Tensor, entropy: Tensor, ref_logps: Tensor, scores: Tensor, rollout,
                    cfg) -> Tensor:
    """A2C's loss from response-aligned tensors, through the functions A2C's stages use: the k1 KL and its
    shaping of the rewards (score), the estimator and the whitening (advantages), ``a2c_objective`` (loss)."""
    mask = rollout.response_mask.float()
    kl = kl_penalty(logps.detach(), ref_logps, "k1") * mask
    rewards = kl_shaped_rewards(scores, kl, mask, cfg.kl_coef if cfg.kl_in == "reward" else 0.0)
    inputs = AdvantageInputs(rewards, mask, rollout.group, values.detach())
    advantages, returns = ADVANTAGES.get(cfg.advantage)(inputs, cfg)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return a2c_objective(logps, values, entropy, ref_logps, advantages, returns, mask, cfg)[0]


class Separate:
    """The same A2C with a full model each for the policy, reference, value, preference and rule models."""

    def __init__(self, args: argparse.Namespace, tokenizer, work: Path):
        run = sparrow_config(args, "blocks", work)
        self.cfg, self.tokenizer, self.gen = run.algorithm, tokenizer, run.algorithm.generation
        self.policy = AutoModelForCausalLM.from_pretrained(args.model)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.value = FullScalarModel(self.policy, 1, trainable_layers=args.trainable_layers)
        self.preference = FullScalarModel(self.policy, 1).eval()
        self.rules = FullScalarModel(self.policy, len(RULES)).eval()
        self.policy.requires_grad_(False)
        head = self.policy.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())  # untied and trained, as in the shared variant
        self.policy.config.tie_word_embeddings = False
        unfreeze_top(self.policy.base_model, args.trainable_layers)
        self.params = [p for m in (self.policy, self.value) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=run.train.learning_rate)

    def modules(self) -> list[nn.Module]:
        return [self.policy, self.reference, self.value, self.preference, self.rules]

    def generate(self, batch, seed: int):
        return generate(self.policy, self.tokenizer, batch, self.gen, seed=seed)

    def logps(self, lm: nn.Module, sequences, attention_mask, score_mask, with_entropy: bool):
        hidden = lm.base_model(input_ids=sequences, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        return logps_from_hidden(hidden, lm.get_output_embeddings(), sequences, score_mask,
                                 self.gen.logprob_temperature, with_entropy)

    def update(self, rollout) -> float:
        sequences, attention_mask, score_mask = rollout_inputs(rollout)
        width = rollout.prompt_ids.shape[1]
        logps, entropy = self.logps(self.policy, sequences, attention_mask, score_mask, True)
        values = F.pad(self.value(sequences, attention_mask).squeeze(-1)[:, :-1], (1, 0)) * score_mask
        with torch.no_grad():
            ref_logps, _ = self.logps(self.reference, sequences, attention_mask, score_mask, False)
            preference = last_token(self.preference(sequences, attention_mask), attention_mask).squeeze(-1)
            rules_ok = torch.sigmoid(-last_token(self.rules(sequences, attention_mask), attention_mask))
            scores = preference + rules_ok.sum(-1)
        loss = a2c_update_loss(*(x[:, width:] for x in (logps, values, entropy, ref_logps)), scores, rollout,
                               self.cfg)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def build_variant(name: str, args: argparse.Namespace, tokenizer, work: Path):
    if name == "separate":
        return Separate(args, tokenizer, work)
    return Shared(args, tokenizer, "blocks" if name == "shared_blocks" else "mlp", work)


def parameters_held(variant) -> int:
    """Distinct parameter values held by the variant (shared storage counted once)."""
    seen: dict[int, int] = {}
    for module in variant.modules():
        for p in module.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------ measuring


def prompt_batches(args: argparse.Namespace, tokenizer) -> list[Any]:
    cfg = DataConfig(path=str(args.data), split="test", max_prompt_length=args.max_prompt_length,
                     max_length=args.max_prompt_length + args.max_new_tokens, eval_fraction=0.0,
                     max_examples=args.batch_size * (args.warmup + args.steps))
    loaded = load_rows(cfg, "prompts")
    loader, _ = build_dataloader(loaded.train, "prompts", tokenizer, cfg, args.batch_size, shuffle=False, seed=0)
    batches = [b for b in loader if b.input_ids.shape[0] == args.batch_size]
    return batches[:args.warmup + args.steps]


def timed_step(variant, batch, seed: int) -> dict[str, float]:
    start = time.perf_counter()
    rollout = variant.generate(batch, seed)
    generated = time.perf_counter()
    variant.update(rollout)
    done = time.perf_counter()
    return {"generate_s": generated - start, "update_s": done - generated, "step_s": done - start,
            "response_tokens": float(rollout.response_mask.sum(-1).float().mean())}


def medians(records: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in records) for key in records[0]}


def rss_mb() -> float:
    """Peak RSS of this process so far, in MB.

    On Linux from /proc/self/status VmHWM (per address space, so it starts afresh in an exec'd child), since
    ``getrusage``'s ru_maxrss survives exec and would report the parent's peak in a child spawned by it.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def child(args: argparse.Namespace) -> None:
    """Run one variant alone (warm-up + steps) and print its peak RSS as one JSON line.

    The prompt batches come tokenized from the parent, so reading the data does not set the peak.
    """
    tokenizer = load_tokenizer(_model_config(args.model))
    batches = torch.load(args.batches, weights_only=False)
    with tempfile.TemporaryDirectory() as work:
        baseline = rss_mb()
        variant = build_variant(args.child, args, tokenizer, Path(work))
        records = [timed_step(variant, batch, seed) for seed, batch in enumerate(batches)]
        print(json.dumps({"peak_rss_mb": rss_mb(), "baseline_rss_mb": baseline,
                          "alone": medians(records[args.warmup:])}))


def _model_config(path: Path):
    from prefopt.config import ModelConfig

    return ModelConfig(name_or_path=str(path))


def measure_memory(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS of ``name`` run alone in a fresh process (1 warm-up + up to 3 steps: the peak comes early)."""
    command = [sys.executable, __file__, "--child", name, "--batches", str(args.batches), "--model", str(args.model),
               "--steps", str(min(args.steps, 3)), "--warmup", "1", "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(args.max_new_tokens), "--max-prompt-length", str(args.max_prompt_length),
               "--trainable-layers", str(args.trainable_layers), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/a2c_shared_trunk.json"))
    parser.add_argument("--model", type=Path, default=None, help="a causal LM dir; default: build the tiny GPT-2")
    parser.add_argument("--data", type=Path, default=HH, help="HH-RLHF file whose prompts are used")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--trainable-layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        if args.model is None:
            args.model = init_model(work / "tiny", [str(args.data)], arch="gpt2", size="tiny", vocab_size=4096,
                                    seed=0, max_texts=800)
        if args.child:
            child(args)
            return 0
        names = args.variants.split(",")
        tokenizer = load_tokenizer(_model_config(args.model))
        batches = prompt_batches(args, tokenizer)
        args.batches = work / "batches.pt"
        torch.save(batches, args.batches)
        variants = {name: build_variant(name, args, tokenizer, work / name) for name in names}
        records: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for seed, batch in enumerate(batches):  # alternate the order so no variant always runs first
            for name in (names if seed % 2 == 0 else names[::-1]):
                records[name].append(timed_step(variants[name], batch, seed))
        held = {name: parameters_held(v) for name, v in variants.items()}
        del variants
        results = {name: {**medians(records[name][args.warmup:]), "parameters_held": held[name],
                          **measure_memory(name, args)} for name in names}
    report = summarise(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(report["table"])
    print(f"\nwrote {args.out}")
    return 0


def summarise(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    lines = ["| variant | step s | update s | generate s | resp. tokens | params held (M) | peak RSS MB "
             "| RSS above start MB |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        above = r["peak_rss_mb"] - r["baseline_rss_mb"]
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['update_s']:.3f} | {r['generate_s']:.3f} | "
                     f"{r['response_tokens']:.1f} | {r['parameters_held'] / 1e6:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{above:.0f} |")
    ratios = {}
    if "separate" in results:
        sep = results["separate"]
        for name in (n for n in results if n != "separate"):
            r = results[name]
            ratios[name] = {
                "step_speedup": sep["step_s"] / r["step_s"], "update_speedup": sep["update_s"] / r["update_s"],
                "peak_rss_ratio": r["peak_rss_mb"] / sep["peak_rss_mb"],
                "rss_above_start_ratio": (r["peak_rss_mb"] - r["baseline_rss_mb"])
                / max(sep["peak_rss_mb"] - sep["baseline_rss_mb"], 1e-9),
                "parameters_ratio": r["parameters_held"] / sep["parameters_held"]}
            lines.append(f"\n{name} vs separate: step {ratios[name]['step_speedup']:.2f}x faster, update "
                         f"{ratios[name]['update_speedup']:.2f}x faster; peak RSS x{ratios[name]['peak_rss_ratio']:.2f}"
                         f" (above start x{ratios[name]['rss_above_start_ratio']:.2f}); parameters "
                         f"x{ratios[name]['parameters_ratio']:.2f}")
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("child", "batches")}
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "threads": args.threads, "device": "cpu"}
    return {"results": results, "ratios": ratios, "settings": settings, "environment": env,
            "table": "\n".join(lines)}


if __name__ == "__main__":
    sys.exit(main())
