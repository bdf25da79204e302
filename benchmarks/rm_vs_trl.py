"""Reward-model accuracy: prefopt's ``reward`` stage vs TRL 1.16's RewardTrainer, same start, data, steps, batch.

Both train from the same SFT checkpoint on the same pinned train pairs (prefopt's hash split) with the same
steps, batch size, learning rate, warm-up and centering coefficient, in float32; both are then scored by the SAME
evaluation code (prefopt's RewardScorer on prefopt's eval batches), so the accuracies are comparable.

    python benchmarks/rm_vs_trl.py --sft runs/hh-tiny/sft/model --ours runs/hh-tiny/reward/model --out rm_vs_trl.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset

from prefopt.algorithms.reward import ranking_loss
from prefopt.config import load_config
from prefopt.data import build_dataloader, load_rows
from prefopt.models import load_reward_model, load_tokenizer
from prefopt.scoring import RewardScorer


@torch.no_grad()
def accuracy(model, loader) -> float:
    scorer, correct, total = RewardScorer(model).eval(), 0.0, 0
    for batch in loader:
        _, metrics = ranking_loss(scorer(batch.input_ids, batch.attention_mask), batch, 0.0)
        correct += float(metrics["rm/accuracy"].sum())
        total += batch.pairs.shape[0]
    return correct / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/hh_tiny/reward.yaml")
    parser.add_argument("--sft", default="runs/hh-tiny/sft/model")
    parser.add_argument("--ours", default="runs/hh-tiny/reward/model", help="our trained RM (from the recipe)")
    parser.add_argument("--out", default="rm_vs_trl.json")
    args = parser.parse_args()
    from trl import RewardConfig, RewardTrainer

    cfg = load_config(args.recipe, [f"model.name_or_path={args.sft}"])
    t = cfg.train
    tokenizer = load_tokenizer(cfg.model)
    pairs = load_rows(cfg.data, "pairs")
    eval_loader, _ = build_dataloader(load_rows(cfg.data, "ranks").eval, "ranks", tokenizer, cfg.data,
                                      t.eval_batch_size, shuffle=False, seed=0)
    trl_args = RewardConfig(
        output_dir="/tmp/trl_rm", report_to="none", use_cpu=True, bf16=False, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, learning_rate=t.learning_rate, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler, max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
        center_rewards_coefficient=cfg.algorithm.center_coef or None, max_length=cfg.data.max_length,
        seed=t.seed, save_strategy="no", logging_steps=20, disable_tqdm=True)
    start = time.perf_counter()
    trainer = RewardTrainer(model=load_reward_model(args.sft, cfg.model, trainable=True), args=trl_args,
                            train_dataset=Dataset.from_list(pairs.train), processing_class=tokenizer)
    trainer.train()
    trl_seconds = time.perf_counter() - start
    result = {
        "steps": t.max_steps, "batch_size": t.batch_size, "train_pairs": len(pairs.train),
        "eval_pairs": len(pairs.eval),
        "accuracy/sft_start_random_head": accuracy(load_reward_model(args.sft, cfg.model), eval_loader),
        "accuracy/trl": accuracy(trainer.model, eval_loader), "trl_train_s": trl_seconds,
    }
    if Path(args.ours).is_dir():
        result["accuracy/prefopt"] = accuracy(load_reward_model(args.ours, cfg.model), eval_loader)
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
