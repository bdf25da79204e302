"""The contestants of ``vs_trl.py`` and what they train on: prefopt's ``Trainer`` and TRL 1.16's trainers on the
same HH pairs, tokenized once by prefopt (``load_pairs``, ``RECORDS``), with TRL's learning-rate defaults on both
sides. ``SameTokens`` hands TRL prefopt's token ids for the same rows; the protocol is in ``vs_trl.py``'s docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from typing import Any

from ablations import variant_class
from assets import HH, lengthened
from turns import Contestant, fit_in_turns, train_in_turns

TRL_LR = {"dpo": 1e-6, "orpo": 1e-6, "reward": 1e-4, "sft": 2e-5}  # TRL's default learning rates; ours uses the same


# ----------------------------------------------------------------------------------------------------- data
def load_pairs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The HH pair records in benchmark order: a seeded shuffle, cut to the rows the run uses."""
    from prefopt.config import DataConfig
    from prefopt.data import load_rows

    rows = load_rows(DataConfig(path=str(HH), eval_fraction=0.0), "pairs").train
    random.Random(args.seed).shuffle(rows)
    if args.long_pairs:
        rows = [lengthened(rows, i, args) for i in range(len(rows))]
    return rows[:(args.warmup + args.steps) * args.batch]


def data_config(args: argparse.Namespace):
    from prefopt.config import DataConfig

    return DataConfig(path=str(HH), eval_fraction=0.0, max_length=args.max_length,
                      max_prompt_length=args.max_prompt_length)


def as_ranks(record: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": record["prompt"], "responses": [record["chosen"], record["rejected"]], "scores": [1.0, 0.0]}


def as_sft(record: dict[str, Any]) -> dict[str, Any]:
    """SFT on the chosen response (InstructGPT step 1 on HH): the same prompt and response tokens as the pair's."""
    return {"prompt": record["prompt"], "completion": record["chosen"]}


KINDS = {"dpo": "pairs", "orpo": "pairs", "reward": "ranks", "sft": "sft"}
RECORDS = {"pairs": lambda r: r, "ranks": as_ranks, "sft": as_sft}


# ----------------------------------------------------------------------------------------------------- contestants
class Ours(Contestant):
    side = "prefopt"

    def train(self) -> None:
        from prefopt.config import build_run_config
        from prefopt.data import build_dataloader
        from prefopt.trainer import Trainer

        args = self.args
        config = build_run_config(self.recipe())
        trainer = Trainer(config)
        kind = KINDS[self.algorithm]
        records = [RECORDS[kind](r) for r in self.shared["pairs"]]
        bucketing = self.options.get("bucketing", False)  # other batches of the same rows, in shuffled order
        loader, _ = build_dataloader(records, kind, trainer.tokenizer, config.data, args.batch, shuffle=bucketing,
                                     seed=args.seed, length_bucketing=bucketing)
        trainer.loaders = {"train": loader}
        trainer.algorithm = variant_class(self.algorithm, self.options)(config.algorithm, config, trainer.tokenizer)

        step_fn = trainer.algorithm.step

        def recorded_step(batch):
            for out in step_fn(batch):
                self.losses.append(float(out.loss.detach()))
                self.tokens.append(out.num_tokens)
                yield out

        trainer.algorithm.step = recorded_step
        fit_in_turns(self, trainer)

    def recipe(self) -> dict[str, Any]:
        """The recipe this contestant trains with (as a YAML recipe would give it)."""
        args, assets = self.args, self.shared["assets"]
        algorithm: dict[str, Any] = {"name": self.algorithm}
        if self.algorithm != "sft":
            algorithm["prefix_sharing"] = self.options.get("sharing", True)
        if self.algorithm == "dpo":
            algorithm.update(beta=0.1, precompute_reference=self.options.get("precompute", False))
        elif self.algorithm == "orpo":
            algorithm.update(beta=0.1, nll_on="full")  # TRL's ORPO also scores the chosen prompt tokens
        return {
            "algorithm": algorithm,
            "model": {"name_or_path": str(assets["rm" if self.algorithm == "reward" else "lm"]),
                      **({"logits": {"keep_mb": args.keep_mb}} if args.keep_mb is not None else {})},
            "data": dataclasses.asdict(data_config(args)),
            "train": {"output_dir": str(args.work / "runs" / self.dtype / self.name), "max_steps": self.steps,
                      "batch_size": args.batch, "learning_rate": TRL_LR[self.algorithm], "lr_scheduler": "constant",
                      "warmup_steps": 0, "max_grad_norm": 1.0, "seed": args.seed,
                      "mixed_precision": "bf16" if self.dtype == "bf16" else "no", "progress": False,
                      "save_model": False, "log_every": 10, "overwrite": True},  # a rerun replaces the last
        }


class TRL(Contestant):
    side = "TRL"

    def train(self) -> None:
        from datasets import Dataset

        args, assets, best = self.args, self.shared["assets"], self.options.get("best", False)
        common = dict(output_dir=str(args.work / "runs" / self.dtype / self.name), per_device_train_batch_size=args.batch,
                      max_steps=self.steps, learning_rate=TRL_LR[self.algorithm], lr_scheduler_type="constant",
                      warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=args.seed, report_to="none",
                      save_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", use_cpu=True,
                      dataloader_num_workers=0, remove_unused_columns=False)
        if best:
            common["gradient_checkpointing"] = False
        if self.dtype == "fp32":
            common["bf16"] = False  # bf16: TRL's default (bf16=True) is left as it is
        pairs, features = self.shared["pairs"], self.shared["features"]
        rows = [{**r, "index": i} for i, r in enumerate(pairs)]
        if self.algorithm == "dpo":
            from trl import DPOConfig, DPOTrainer
            from trl.trainer.dpo_trainer import DataCollatorForPreference

            inner = DataCollatorForPreference(pad_token_id=self.shared["pad_id"])
            trainer = DPOTrainer(
                model=str(assets["lm"]), train_dataset=Dataset.from_list(rows),
                processing_class=self.shared["tokenizer"], data_collator=SameTokens(features, inner),
                args=DPOConfig(**common, beta=0.1, max_length=None, precompute_ref_log_probs=best))
        elif self.algorithm == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            trainer = ORPOTrainer(model=str(assets["lm"]), train_dataset=Dataset.from_list(rows),
                                  processing_class=self.shared["tokenizer"],
                                  data_collator=SameTokens(features, orpo_tensors(self.shared["pad_id"])),
                                  args=ORPOConfig(**common, beta=0.1))
        elif self.algorithm == "sft":
            from trl import SFTConfig, SFTTrainer

            ids = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in self.shared["features_sft"]]
            trainer = SFTTrainer(model=str(assets["lm"]), train_dataset=Dataset.from_list(ids),
                                 processing_class=self.shared["tokenizer"],
                                 args=SFTConfig(**common, max_length=args.max_length))
        else:
            from trl import RewardConfig, RewardTrainer

            ids = [{"chosen_ids": f["prompt_ids"] + f["chosen_ids"],
                    "rejected_ids": f["prompt_ids"] + f["rejected_ids"]} for f in features]
            trainer = RewardTrainer(model=str(assets["rm"]), train_dataset=Dataset.from_list(ids),
                                    processing_class=self.shared["tokenizer"],
                                    args=RewardConfig(**common, max_length=args.max_length))
        compute_loss = trainer.compute_loss

        def recorded_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            self.losses.append(float((out[0] if return_outputs else out).detach()))
            return out

        trainer.compute_loss = recorded_loss
        self.tokens = self.shared[f"tokens_{KINDS[self.algorithm]}"][:self.steps]  # prefopt's batches, in order
        self.trainer = trainer
        train_in_turns(self, trainer)


class SameTokens:
    """A TRL data collator that swaps each example for prefopt's tokenization of the same row (by ``index``)."""

    def __init__(self, features: list[dict[str, Any]], inner: Any):
        self.features, self.inner = features, inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        keep = ("ref_chosen_logps", "ref_rejected_logps")
        return self.inner([{**self.features[e["index"]], **{k: e[k] for k in keep if k in e}} for e in examples])


def orpo_tensors(pad_id: int):
    """prefopt's pair batch as the tensors ORPOTrainer's collator makes (labels -100 off the responses)."""
    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        from prefopt.data.collate import pair_batch

        batch = pair_batch(features, pad_id)
        n = batch.num_pairs
        labels = batch.input_ids.masked_fill(batch.completion_mask == 0, -100)
        return {"chosen_input_ids": batch.input_ids[:n], "chosen_attention_mask": batch.attention_mask[:n],
                "chosen_labels": labels[:n], "rejected_input_ids": batch.input_ids[n:],
                "rejected_attention_mask": batch.attention_mask[n:], "rejected_labels": labels[n:]}
    return collate
