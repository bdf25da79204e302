"""prefopt's online algorithms vs TRL 1.16, side by side: ``grpo`` vs GRPOTrainer and ``rloo`` vs RLOOTrainer.

    python benchmarks/vs_trl_online.py                     # grpo and rloo, 2 warm-up + 6 timed steps, memory
    python benchmarks/vs_trl_online.py --algorithms grpo --steps 2 --no-memory      # a quick look

Protocol (as ``vs_trl.py``: the contestant threads of ``turns.py``, the model of ``assets.py``). The model is the
tiny GPT-2 of ``prefopt.tiny`` (4 layers, width 256, BPE 4096 trained on the HH text), fp32 on both sides. Prompts
are the HH-RLHF harmless-base prompts of ../shared/data (up to the last "\\n\\nAssistant:") of 24..``--max-prompt``
tokens, in file order, 8 per step; each is answered G = 4 times (32 completions a step), ``--max-new-tokens`` 32
tokens, temperature 1, top-p 1, top-k 0. Neither side shuffles (TRL: ``shuffle_dataset=False``), so step k of both
sides answers the same 8 prompts. The reward is the same deterministic function of the completion text on both sides
(the share of its words that are common English words, ``reward``). Learning rate 1e-6 (TRL's default), constant,
clip 1.0, seed 0; TRL's default loss type (``dapo``) for GRPO on both sides; RLOO with beta = 0.05 (TRL's default).
"trl-default" is TRL as it ships (gradient checkpointing on); "trl-best" turns it off; "prefopt-no-prefix" is
prefopt with ``prefix_sharing: false`` (each of the G samples scored with its own copy of the prompt, as TRL does),
the ablation that shows how much of the gap prefix sharing makes.

Every contestant is a real training loop in its own thread (``Trainer.fit`` / ``trainer.train()``), one optimizer
step each in turn (``turns.run_in_turns``). Reported: median s/step over the timed steps and its parts (generation;
scoring = rewards and the old / reference log-probs the step needs; update = the rest: the policy forward, backward
and optimizer step), generated tokens/s, the loss at step 0, and peak RSS of a process that runs only that
contestant (``--memory-steps`` steps; ``measure.run_worker``). The samples differ between the sides (different
random streams), so losses are equal only where they do not depend on the samples;
``tests/test_parity_trl_online.py`` shows the losses equal on the same batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from assets import HH, build_assets
from measure import peak_rss_mb, run_worker
from turns import Contestant, fit_in_turns, run_in_turns, train_in_turns

G, PROMPTS_PER_STEP, LR = 4, 8, 1e-6
COMMON_WORDS = {"the", "a", "and", "to", "of", "i", "you", "is", "it", "that", "in", "be", "not", "for", "are"}


def reward(prompts: list[str], responses: list[str], meta: list[dict]) -> list[float]:
    """Share of the words of each response that are common English words (0 for an empty one)."""
    out = []
    for response in responses:
        words = response.lower().split()
        out.append(sum(w in COMMON_WORDS for w in words) / len(words) if words else 0.0)
    return out


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    return reward(prompts, completions, [])


def load_prompts(args: argparse.Namespace, tokenizer: Any) -> list[str]:
    from prefopt.config import DataConfig
    from prefopt.data import load_rows

    rows = load_rows(DataConfig(path=str(HH), format="hh", eval_fraction=0.0), "prompts").train
    prompts = [r["prompt"] for r in rows if 24 <= len(tokenizer(r["prompt"])["input_ids"]) <= args.max_prompt]
    return prompts[:PROMPTS_PER_STEP * (args.warmup + args.steps)]


class Ours(Contestant):
    side = "prefopt"

    def train(self) -> None:
        from prefopt.config import build_run_config
        from prefopt.data import build_dataloader, load_rows
        from prefopt.trainer import Trainer

        config = build_run_config(self.recipe())
        trainer = Trainer(config)
        records = load_rows(config.data, "prompts").train
        loader, _ = build_dataloader(records, "prompts", trainer.tokenizer, config.data, PROMPTS_PER_STEP,
                                     shuffle=False, seed=0)
        trainer.loaders = {"train": loader}
        algorithm = trainer.algorithm
        step_fn, collect_fn = algorithm.step, algorithm.collect
        self.parts: list[dict[str, float]] = []

        def collect(batch):
            rollout = collect_fn(batch)
            self.tokens.append(rollout.new_tokens)
            return rollout

        def recorded_step(batch):
            for i, out in enumerate(step_fn(batch)):
                if i == 0:
                    self.losses.append(float(out.loss.detach()))
                    self.parts.append({"generation": out.metrics["perf/gen_s"], "scoring": out.metrics["perf/score_s"]})
                yield out

        algorithm.collect, algorithm.step = collect, recorded_step
        fit_in_turns(self, trainer)

    def recipe(self) -> dict[str, Any]:
        args = self.args
        algorithm: dict[str, Any] = {"name": self.algorithm, "num_samples": G,
                                     "rewards": [{"name": "callable", "params": {"fn": "vs_trl_online:trl_reward"}}],
                                     "generation": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                                                    "top_p": 1.0, "top_k": 0}}
        if self.algorithm == "grpo":
            algorithm.update(loss_type="dapo", kl_coef=0.0)
        else:
            algorithm.update(kl_coef=0.05)
        algorithm["prefix_sharing"] = self.options.get("prefix_sharing", True)
        return {"algorithm": algorithm, "model": {"name_or_path": str(self.shared["assets"]["lm"])},
                "data": {"path": str(self.shared["prompts_file"]), "format": "prompts", "eval_fraction": 0.0,
                         "max_prompt_length": args.max_prompt},
                "train": {"output_dir": str(args.work / "runs" / self.name), "max_steps": self.steps,
                          "batch_size": PROMPTS_PER_STEP, "learning_rate": LR, "lr_scheduler": "constant",
                          "warmup_steps": 0, "max_grad_norm": 1.0, "seed": 0, "mixed_precision": "no",
                          "progress": False, "save_model": False, "log_every": 100,
                          "overwrite": True}}  # a rerun (the memory process) replaces the last


class TRL(Contestant):
    side = "TRL"

    def train(self) -> None:
        from datasets import Dataset

        args = self.args
        common = dict(output_dir=str(args.work / "runs" / self.name), per_device_train_batch_size=PROMPTS_PER_STEP * G,
                      num_generations=G, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
                      top_k=0, max_steps=self.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                      weight_decay=0.0, max_grad_norm=1.0, seed=0, report_to="none", save_strategy="no",
                      disable_tqdm=True, use_cpu=True, bf16=False, shuffle_dataset=False, logging_steps=100,
                      dataloader_num_workers=0)
        if self.options.get("best"):
            common["gradient_checkpointing"] = False
        dataset = Dataset.from_list([{"prompt": p} for p in self.shared["prompts"]])
        if self.algorithm == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            trainer = GRPOTrainer(model=str(self.shared["assets"]["lm"]), reward_funcs=trl_reward,
                                  args=GRPOConfig(**common, beta=0.0), train_dataset=dataset,
                                  processing_class=self.shared["tokenizer"])
        else:
            from trl import RLOOConfig, RLOOTrainer

            trainer = RLOOTrainer(model=str(self.shared["assets"]["lm"]), reward_funcs=trl_reward,
                                  args=RLOOConfig(**common, beta=0.05), train_dataset=dataset,
                                  processing_class=self.shared["tokenizer"])
        self.parts = []
        generate, generate_and_score = trainer._generate, trainer._generate_and_score_completions
        timing: dict[str, float] = {}

        def timed_generate(*a, **k):
            start = time.perf_counter()
            out = generate(*a, **k)
            timing["generation"] = time.perf_counter() - start
            return out

        def timed_generate_and_score(*a, **k):
            start = time.perf_counter()
            out = generate_and_score(*a, **k)
            self.parts.append({"generation": timing["generation"],
                               "scoring": time.perf_counter() - start - timing["generation"]})
            self.tokens.append(int(out["completion_mask"].sum()))
            return out

        trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_generate_and_score
        compute_loss = trainer.compute_loss

        def recorded_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            self.losses.append(float(out.detach()))
            return out

        trainer.compute_loss = recorded_loss
        train_in_turns(self, trainer)


def lineup(args: argparse.Namespace) -> list[tuple[str, str, type, dict[str, Any]]]:
    out = []
    for algo in args.algorithms:
        out += [(f"{algo}/prefopt", algo, Ours, {}), (f"{algo}/prefopt-no-prefix", algo, Ours, {"prefix_sharing": False}),
                (f"{algo}/trl-default", algo, TRL, {}),
                (f"{algo}/trl-best", algo, TRL, {"best": True})]
    return [c for c in out if not args.only or c[0] in args.only]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run this worker's contestants, one step each in turn; return their measurements."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    assets = build_assets(args.work)
    tokenizer = AutoTokenizer.from_pretrained(assets["lm"])
    prompts = load_prompts(args, tokenizer)
    prompts_file = args.work / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    shared = {"assets": assets, "tokenizer": tokenizer, "prompts": prompts, "prompts_file": prompts_file}
    args.dtype = "fp32"
    contestants = [cls(name, algo, args, shared, **options) for name, algo, cls, options in lineup(args)]
    run_in_turns(contestants)
    return {"contestants": [{"name": c.name, "times": c.times, "losses": c.losses, "tokens": c.tokens,
                             "parts": c.parts} for c in contestants],
            "peak_rss_mb": peak_rss_mb()}


def summarise(result: dict[str, Any], warmup: int, memory: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for c in result["contestants"]:
        times, parts = c["times"][warmup:], c["parts"][warmup:len(c["times"])]
        step = statistics.median(times)
        generation = statistics.median(p["generation"] for p in parts)
        scoring = statistics.median(p["scoring"] for p in parts)
        tokens = sum(c["tokens"][warmup:len(c["times"])]) / sum(times)
        rows.append({"name": c["name"], "s_per_step": step, "generation_s": generation, "scoring_s": scoring,
                     "update_s": statistics.median(t - p["generation"] - p["scoring"] for t, p in zip(times, parts)),
                     "gen_tokens_per_s": tokens, "loss_step0": c["losses"][0] if c["losses"] else float("nan"),
                     "peak_rss_mb": memory.get(c["name"], float("nan"))})
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"G = {G}, {PROMPTS_PER_STEP} prompts x {G} = {PROMPTS_PER_STEP * G} completions a step, "
             f"max_new_tokens {args.max_new_tokens}, fp32, {args.threads} thread(s); median of {args.steps} "
             f"steps after {args.warmup} warm-up.", "",
             "| contestant | s/step | generation s | scoring s | update s | gen tokens/s | loss step 0 | peak RSS MB "
             "| prefopt speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ours = next(r for r in rows if r["name"].split("/")[0] == row["name"].split("/")[0]
                    and r["name"].endswith("/prefopt"))
        lines.append(f"| {row['name']} | {row['s_per_step']:.3f} | {row['generation_s']:.3f} | {row['scoring_s']:.3f} "
                     f"| {row['update_s']:.3f} | {row['gen_tokens_per_s']:.0f} | {row['loss_step0']:.5f} "
                     f"| {row['peak_rss_mb']:.0f} | {row['s_per_step'] / ours['s_per_step']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_runs/vs_trl_online"))
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "rloo"], choices=["grpo", "rloo"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        args.worker.write_text(json.dumps(worker(args)))
        return
    flags = ["--work", str(args.work), "--max-new-tokens", str(args.max_new_tokens), "--max-prompt",
             str(args.max_prompt), "--threads", str(args.threads), "--algorithms", *args.algorithms]

    def run(extra: list[str]) -> dict[str, Any]:
        return run_worker(__file__, args.work, [*flags, *extra], quiet=True)

    result = run(["--steps", str(args.steps), "--warmup", str(args.warmup), "--only", *args.only])
    memory = {}
    if not args.no_memory:
        for name, *_ in lineup(args):
            memory[name] = run(["--steps", str(args.memory_steps), "--warmup", "0", "--only", name])["peak_rss_mb"]
    rows = summarise(result, args.warmup, memory)
    table = markdown(rows, args)
    (args.work / "results.json").write_text(json.dumps({"result": result, "rows": rows}, indent=1))
    (args.work / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
