"""GRPO: Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300, eq. 3), with the
variants of DAPO (Yu et al. 2025, arXiv 2503.14476) and Dr. GRPO (Liu et al. 2025, arXiv 2503.20783).

For each prompt q, G responses o_1..o_G are sampled; no critic: the advantage of every token of o_i is its reward
standardised within the group,  A_i = (R_i - mean(R)) / (std(R) + 1e-4)  (``scale_rewards``: group | batch | none,
the last being Dr. GRPO's unbiased choice), and

    J(theta) = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
                                         - beta * D_KL,t(pi || pi_ref) ],
    D_KL,t = pi_ref/pi - log(pi_ref/pi) - 1 (k3, eq. 4),

aggregated as ``loss_type`` says: grpo (per-sequence mean, as above), bnpo / dapo (token-level, DAPO eq. 8),
dr_grpo (a constant normaliser). Defaults follow TRL 1.16's GRPOTrainer: beta = 0 (no reference model is loaded),
one update per rollout (``epochs`` > 1 reuses it with the clipped ratio), eps_high = eps_low unless set (DAPO: 0.28).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefopt.registry import register_algorithm
from prefopt.rl.algorithm import OnlineAlgorithm, OnlineConfig


@dataclass
class GRPOConfig(OnlineConfig):
    advantage: str = "grpo"
    """Group-normalised advantages (prefopt.rl.advantages)."""
    loss_type: str = "grpo"
    """grpo (sequence mean), bnpo / dapo (token level), dr_grpo (constant normaliser)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """The KL is a k3 loss term with weight kl_coef (beta), as DeepSeekMath."""


@register_algorithm("grpo")
class GRPO(OnlineAlgorithm):
    """GRPO (DeepSeekMath): G samples per prompt, group-normalised advantages, clipped ratio, optional k3 KL loss."""

    Config = GRPOConfig
