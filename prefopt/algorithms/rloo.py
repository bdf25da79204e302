"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740, eq. 6; Kool et al. 2019).

Each response is one action. For the G samples y_1..y_G of a prompt x, the reward includes a sequence-level KL
penalty to the reference,  R_i = r(x, y_i) - beta * sum_t (log pi - log pi_ref)(y_it),  and the baseline of sample
i is the mean reward of the OTHER samples:

    A_i = R_i - 1/(G-1) sum_{j != i} R_j,
    L   = -1/B sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i),   rho_i = pi(y_i|x) / pi_old(y_i|x),

with the whole-sequence ratio rho_i (TRL 1.16's RLOOTrainer; with one update per rollout rho = 1 and this is the
paper's REINFORCE estimator). ``scale_rewards: batch`` normalises the advantages over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.registry import register_algorithm
from prefopt.rl.algorithm import OnlineAlgorithm, OnlineConfig


@dataclass
class RLOOConfig(OnlineConfig):
    advantage: str = "rloo"
    """Leave-one-out baseline over the G samples of each prompt."""
    loss_type: str = "sequence"
    """One clipped ratio per response (the sequence is the action)."""
    scale_rewards: Literal["group", "batch", "none"] = "none"
    """none (the paper), or batch: normalise the advantages over the batch."""
    kl_coef: float = 0.05
    """beta of the sequence-level KL penalty in the reward (TRL's default)."""
    kl_in: Literal["loss", "reward"] = "reward"
    """The KL is subtracted from the reward: R = r - beta * KL(x, y)."""


@register_algorithm("rloo")
class RLOO(OnlineAlgorithm):
    """RLOO (Ahmadian 2024): leave-one-out baseline over G samples, sequence-level KL in the reward."""

    Config = RLOOConfig
