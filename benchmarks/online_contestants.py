"""The contestants of ``vs_trl_online.py`` and what they share: prefopt's ``Trainer`` and TRL 1.16's
``GRPOTrainer`` / ``RLOOTrainer``, each running its own sampler (timed) and then training on the same completions
(``SharedCompletions``), rewarded by the same function of the text (``reward``); the protocol is in
``vs_trl_online.py``'s docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ablations import before_online
from turns import Contestant, fit_in_turns, train_in_turns

LR = 1e-6
COMMON_WORDS = {"the", "a", "and", "to", "of", "i", "you", "is", "it", "that", "in", "be", "not", "for", "are"}


def reward(prompts: list[str], responses: list[str], meta: list[dict]) -> list[float]:
    """Share of the words of each response that are common English words, plus characters / 1000 (so the samples
    of a prompt differ even when they have no words: a random model's draws from a 151,936-token vocabulary)."""
    out = []
    for response in responses:
        words = response.lower().split()
        out.append((sum(w in COMMON_WORDS for w in words) / len(words) if words else 0.0) + len(response) / 1000)
    return out


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    return reward(prompts, completions, [])


class SharedCompletions:
    """Every step's completions, sampled once from the starting policy: what every contestant trains on."""

    def __init__(self, args: argparse.Namespace, shared: dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM

        from prefopt.rl.engine import GenerationConfig, generate

        model = AutoModelForCausalLM.from_pretrained(shared["assets"]["lm"], dtype=torch.float32)
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
        tokenizer = shared["tokenizer"]
        self.rollouts = [ended_early(generate(model, tokenizer, batch, gen, args.num_samples, seed=1000 + step),
                                     tokenizer, seed=step)
                         for step, batch in enumerate(prompt_loader(args, tokenizer, shared["prompts_file"]))]

    def swap_into(self, step: int, rollout: Any) -> Any:
        """prefopt's rollout of ``step`` with the shared completions (its prompts, generation time and count kept)."""
        import torch

        shared = self.rollouts[step]
        assert torch.equal(shared.prompt_ids, rollout.prompt_ids), "prefopt's prompts differ from the shared ones"
        return dataclasses.replace(rollout, response_ids=shared.response_ids, response_mask=shared.response_mask,
                                   logprobs=shared.logprobs, ended=shared.ended, responses=shared.responses)

    def token_lists(self, step: int, prompt_ids: list[list[int]]) -> list[list[int]]:
        """The completions of ``step`` as TRL hands them on (each cut after its first EOS), for TRL's prompt ids."""
        shared = self.rollouts[step]
        ours = [row[m.bool()].tolist() for row, m in zip(shared.prompt_ids, shared.prompt_mask)]
        assert ours == [list(p) for p in prompt_ids], "TRL's prompt ids differ from prefopt's"
        return [row[:int(n)].tolist() for row, n in zip(shared.response_ids, shared.response_mask.sum(-1))]


def ended_early(rollout: Any, tokenizer: Any, seed: int) -> Any:
    """The rollout with each response ended by EOS at a seeded length between half and all of its tokens: a random
    model rarely samples its EOS, and with every response as long as the others the group-centred losses are 0 at
    step 0 whatever the advantages, which would make the parity gate empty."""
    import torch

    rows, width = rollout.response_ids.shape
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.minimum(rollout.response_mask.sum(-1),
                            torch.randint((width + 1) // 2, width + 1, (rows,), generator=generator))
    keep = torch.arange(width)[None, :] < lengths[:, None]
    ids = rollout.response_ids.masked_fill(~keep, tokenizer.pad_token_id)
    ids[torch.arange(rows), lengths - 1] = tokenizer.eos_token_id
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(ids, lengths)]
    return dataclasses.replace(rollout, response_ids=ids, response_mask=keep.long(), logprobs=rollout.logprobs * keep,
                               ended=torch.ones(rows, dtype=torch.bool), responses=texts)


def prompt_loader(args: argparse.Namespace, tokenizer: Any, prompts_file: Path) -> Any:
    """prefopt's batches of the prompts, in file order, as TRL reads them (``load_rows`` would order them by hash)."""
    from prefopt.config import DataConfig
    from prefopt.data import build_dataloader

    config = DataConfig(path=str(prompts_file), format="prompts", eval_fraction=0.0, max_prompt_length=args.max_prompt)
    records = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    return build_dataloader(records, "prompts", tokenizer, config, args.prompts, shuffle=False, seed=0)[0]


class Ours(Contestant):
    side = "prefopt"

    def train(self) -> None:
        from prefopt.config import build_run_config
        from prefopt.trainer import Trainer

        config = build_run_config(self.recipe())
        trainer = Trainer(config)
        self.rewards: list[float] = []
        trainer.loaders = {"train": prompt_loader(self.args, trainer.tokenizer, self.shared["prompts_file"])}
        if self.options.get("before"):
            trainer.algorithm = before_online(type(trainer.algorithm))(config.algorithm, config, trainer.tokenizer)
        algorithm = trainer.algorithm
        step_fn, collect_fn = algorithm.step, algorithm.collect
        self.parts: list[dict[str, float]] = []

        def collect(batch):
            rollout = collect_fn(batch)  # its own draw, timed, then the shared completions of this step
            self.tokens.append(rollout.new_tokens)
            return self.shared["completions"].swap_into(len(self.tokens) - 1, rollout)

        def recorded_step(batch):
            for i, out in enumerate(step_fn(batch)):
                if i == 0:
                    self.losses.append(float(out.loss.detach()))
                    self.rewards.append(out.metrics["reward/score"])
                    self.parts.append({"generation": out.metrics["perf/gen_s"], "scoring": out.metrics["perf/score_s"]})
                yield out

        algorithm.collect, algorithm.step = collect, recorded_step
        fit_in_turns(self, trainer)

    def recipe(self) -> dict[str, Any]:
        args = self.args
        algorithm: dict[str, Any] = {"name": self.algorithm, "num_samples": args.num_samples,
                                     "rewards": [{"name": "callable", "params": {"fn": "online_contestants:trl_reward"}}],
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
                          "batch_size": args.prompts, "learning_rate": LR, "lr_scheduler": "constant",
                          "warmup_steps": 0, "max_grad_norm": 1.0, "seed": 0, "mixed_precision": "no",
                          "progress": False, "save_model": False, "log_every": 100,
                          "overwrite": True}}  # a rerun (the memory process) replaces the last


class TRL(Contestant):
    side = "TRL"

    def train(self) -> None:
        from datasets import Dataset

        args = self.args
        common = dict(output_dir=str(args.work / "runs" / self.name),
                      per_device_train_batch_size=args.prompts * args.num_samples, num_generations=args.num_samples,
                      max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
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
        self.parts, self.rewards = [], []
        single_turn, generate_and_score = trainer._generate_single_turn, trainer._generate_and_score_completions
        timing: dict[str, float] = {}

        def shared_single_turn(prompt_ids, *a, **k):
            start = time.perf_counter()
            out = single_turn(prompt_ids, *a, **k)  # its own draw, timed
            timing["generation"] = time.perf_counter() - start
            own = out[0] if isinstance(out, tuple) else out
            self.tokens.append(sum(len(ids) for ids in own))
            completions = self.shared["completions"].token_lists(len(self.tokens) - 1, prompt_ids)
            return (completions, None) if isinstance(out, tuple) else completions

        def timed_generate_and_score(*a, **k):
            start = time.perf_counter()
            out = generate_and_score(*a, **k)
            self.parts.append({"generation": timing["generation"],
                               "scoring": time.perf_counter() - start - timing["generation"]})
            self.rewards.append(trainer._metrics["train"]["reward"][-1])
            return out

        trainer._generate_single_turn, trainer._generate_and_score_completions = (shared_single_turn,
                                                                                  timed_generate_and_score)
        compute_loss = trainer.compute_loss

        def recorded_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            self.losses.append(float(out.detach()))
            return out

        trainer.compute_loss = recorded_loss
        train_in_turns(self, trainer)
