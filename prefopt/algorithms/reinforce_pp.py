"""REINFORCE++ (Hu 2025, arXiv 2501.03262, eq. 7-9): REINFORCE with PPO's stabilisers and no critic.

The reward of token t of a response carries a token-level KL penalty to the reference,
r_t = -beta * (log pi - log pi_ref)(y_t) + [t = last] r(x, y), and its advantage is the return still to come,
normalised over ALL response tokens of the global batch (no per-prompt group, no value function):

    A_t = sum_{s >= t} gamma^{s-t} r_s,     A_t <- (A_t - mean_batch A) / std_batch A,
    L   = E_t[ -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) ]      (token mean over the minibatch: token_mean),

updated for ``epochs`` passes over ``num_minibatches`` minibatches as PPO. One sample per prompt by default (the
paper's point: the global normalisation replaces the group baseline); ``num_samples`` > 1 is allowed, and
``advantage: reinforce_pp_baseline`` then subtracts each prompt's mean score first (REINFORCE++-baseline, sec. 3.3).
The batch mean and std are those of every process's tokens together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.registry import register_algorithm
from prefopt.rl.algorithm import OnlineAlgorithm, OnlineConfig


@dataclass
class ReinforcePPConfig(OnlineConfig):
    num_samples: int = 1
    """Responses per prompt (the batch, not a group, is the baseline)."""
    advantage: str = "reinforce_pp"
    """Return-to-go of the KL-shaped token rewards, normalised over the batch (reinforce_pp_baseline: group mean
    of the scores subtracted first; needs num_samples >= 2)."""
    loss_type: str = "token_mean"
    """Token mean of the clipped surrogate over the minibatch."""
    kl_coef: float = 0.01
    """beta of the per-token KL penalty in the reward."""
    kl_in: Literal["loss", "reward"] = "reward"
    """The KL is a per-token reward term (k1)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 2
    """Minibatches per pass (each one optimizer update)."""


@register_algorithm("reinforce_pp")
class ReinforcePP(OnlineAlgorithm):
    """REINFORCE++ (Hu 2025): token-level KL in the reward, globally normalised returns, PPO clip."""

    Config = ReinforcePPConfig
