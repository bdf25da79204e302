"""The online batch statistics of one global batch, split over the processes of a launch; run by
``tests/test_distributed.py`` under ``accelerate launch`` (2 CPU processes) and in the test process (1 process).

``statistics(accelerator)``: a fixed global batch of 8 rows (4 prompts x G = 2, whole prompts per process); each process
takes its half and runs the real estimators and the real update (``OnlineAlgorithm.update`` -> ``policy_loss``, the
policy's log-probs a leaf tensor) with the accelerator's sums over processes. Returned per row of the global batch
(each process fills its rows): advantages, and per loss type the update's loss share and d loss / d log-prob as DDP
would average them (the process's gradient / number of processes).

As a script: ``online_two_processes.py RECIPE_JSON OUT``: the statistics of this process to ``OUT/stats-<rank>.json``,
then the Trainer on the recipe.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from prefopt.algorithms.grpo import GRPO
from prefopt.config import build_run_config
from prefopt.registry import ADVANTAGES
from prefopt.rl.advantages import AdvantageInputs, batch_whiten
from prefopt.rl.algorithm import Scored
from prefopt.rl.kl import kl_shaped_rewards

ROWS, G, T = 8, 2, 5
LOSSES = {  # name -> (algorithm settings, accumulation with 1 process, with 2)
    "token_mean": ({"loss_type": "token_mean"}, 2, 2),
    "dapo": ({"loss_type": "dapo"}, 2, 2),
    "grpo": ({"loss_type": "grpo", "scale_rewards": "batch"}, 2, 2),
    "dr_grpo": ({"loss_type": "dr_grpo"}, 2, 2),
    # the entropy quantile is over a micro-batch of every process: one micro-batch holds the same rows in both
    "dapo_top_entropy": ({"loss_type": "dapo", "top_entropy_quantile": 0.5}, 1, 1),
    # TRL's bnpo is each micro-batch's own token mean: 2 processes x 1 micro-batch = 1 process x 2 micro-batches
    "bnpo": ({"loss_type": "bnpo"}, 2, 1),
}


def question_number(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The run's reward (``callable``): (i mod 5) / 4 for "question i" plus the response's length / 100; it differs
    between the rows of a batch although a random model's greedy responses are all alike."""
    return [int(p.split("question ")[1].split("?")[0]) % 5 / 4 + len(r) / 100 for p, r in zip(prompts, completions)]


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5, 2, 4])
    mask = (torch.arange(T) < lengths[:, None]).float()
    return {"mask": mask, "rewards": torch.randn(ROWS, T, generator=g) * mask, "scores": torch.randn(ROWS, generator=g),
            "logps": -torch.rand(ROWS, T, generator=g) * 2 * mask,
            "old_shift": 0.3 * torch.randn(ROWS, T, generator=g) * mask,
            "entropy": torch.rand(ROWS, T, generator=g) * 3, "group": torch.arange(ROWS) // G}


def statistics(accelerator: Any) -> dict[str, Any]:
    processes, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    rows = torch.arange(ROWS).tensor_split(processes)[rank]
    batch = {k: v[rows] for k, v in global_batch().items()}
    mask, out = batch["mask"], {"rows": rows.tolist()}
    run = build_run_config({"algorithm": {"name": "grpo", "num_samples": G}})
    algorithm = GRPO(run.algorithm, run, None)
    algorithm.accelerator = accelerator
    inputs = AdvantageInputs(batch["rewards"], mask, batch["group"], scores=batch["scores"], total=algorithm.total)
    for name, settings in [("grpo_batch", {"scale_rewards": "batch"}), ("rloo_batch", {"scale_rewards": "batch"}),
                           ("reinforce_pp", {}), ("reinforce_pp_baseline", {})]:
        config = build_run_config({"algorithm": {"name": "grpo", "num_samples": G, **settings}}).algorithm
        out[name] = ADVANTAGES.get(name.removesuffix("_batch"))(inputs, config)[0].tolist()
    out["whiten"] = batch_whiten(batch["rewards"], mask, algorithm.total).tolist()
    out["whiten_rewards"] = batch_whiten(batch["rewards"], mask, algorithm.total, shift_mean=False).tolist()
    for name, (settings, *accumulation) in LOSSES.items():
        out[name] = update(batch, settings, accumulation[processes - 1], accelerator)
    return out


def update(batch: dict[str, torch.Tensor], settings: dict, accumulation: int, accelerator: Any) -> dict[str, Any]:
    """The skeleton's one update of this process's rows (advantages from its estimator), the log-probs a leaf."""
    run = build_run_config({"algorithm": {"name": "grpo", "num_samples": G, "generation": {"max_new_tokens": T},
                                          **settings},
                            "train": {"batch_size": 2, "gradient_accumulation_steps": accumulation}})
    algorithm = GRPO(run.algorithm, run, None)
    algorithm.accelerator = accelerator
    mask = batch["mask"]
    rows = len(mask)
    rollout = SimpleNamespace(group=batch["group"], response_ids=torch.zeros(rows, T, dtype=torch.long),
                              prompt_mask=torch.ones(rows, 1), response_mask=mask, ended=torch.ones(rows).bool())
    logps = batch["logps"].clone().requires_grad_()
    scored = Scored(rollout, mask, (batch["logps"] + batch["old_shift"]) * mask, None, batch["scores"], {},
                    torch.zeros_like(mask), kl_shaped_rewards(batch["scores"], torch.zeros_like(mask), mask, 0.0))
    advantages = algorithm.advantages(scored)
    algorithm.loss = lambda scored, advantages, micro: algorithm.policy_loss(
        logps[micro.rows], batch["entropy"][micro.rows], scored, advantages, micro)
    loss = torch.stack([out.loss for out in algorithm.update(scored, advantages, {})]).sum() / accumulation
    loss.backward()
    processes = accelerator.num_processes if accelerator else 1
    return {"loss": float(loss.detach()) / processes, "grad": (logps.grad / processes).tolist()}


def main(recipe_json: str, out: str) -> None:
    from prefopt.trainer import Trainer

    trainer = Trainer(build_run_config(json.loads(Path(recipe_json).read_text())))
    accelerator = trainer.accelerator
    Path(out, f"stats-{accelerator.process_index}.json").write_text(json.dumps(statistics(accelerator)))
    trainer.fit()


if __name__ == "__main__":
    main(*sys.argv[1:])
