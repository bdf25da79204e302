"""KL shaping and control, shared by the online algorithms.

* ``kl_shaped_rewards``: Ziegler et al. 2019 / Stiennon et al. 2020, eq. 1: per-token reward ``r_t = -beta * KL_t``,
  plus the sequence score at the last response token (summed over a row: R - beta * KL(x, y), RLOO's reward);
* ``KLController``: a fixed beta, or Ziegler's adaptive controller (sec. 2.2):
  ``e = clip(KL / KL_target - 1, -0.2, 0.2)``,  ``beta <- beta * (1 + e * n / horizon)``, fed the KL of every
  process (``kl_over_processes``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from prefopt.distributed import sum_over_processes


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs (Schulman's k1/k2/k3).

    k1 = log pi - log pi_ref (unbiased, can be negative), k2 = 0.5 * k1^2, k3 = exp(-k1) - 1 + k1 (>= 0).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")



def kl_shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards [B, Tr]: ``-kl_coef * kl_t`` on every response token, plus ``scores`` [B] at the last."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, last), scores.float(), accumulate=True)


class KLController:
    """The KL coefficient beta: fixed, or adapted towards ``target`` (Ziegler et al. 2019, sec. 2.2).

    ``update(kl, n)`` after each rollout batch of ``n`` sequences whose mean KL(pi || pi_ref) is ``kl``, counted
    over all processes (``kl_over_processes``).
    Registered for checkpointing by the algorithm, so a resumed run continues with the adapted beta.
    """

    def __init__(self, init: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = init, adaptive, target, horizon

    def update(self, kl: float, n: int) -> None:
        if not self.adaptive:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def kl_over_processes(accelerator: Any, kl: Tensor, mask: Tensor) -> tuple[float, int]:
    """(mean KL per sequence, number of sequences) of the rollouts of ALL processes, for ``KLController.update``."""
    local = {"kl": float((kl * mask).sum()), "sequences": float(kl.shape[0])}
    totals = sum_over_processes(accelerator, local) if accelerator is not None else local
    return totals["kl"] / totals["sequences"], int(totals["sequences"])
