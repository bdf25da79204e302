"""Advantage estimators, registered by name; every one takes the same ``AdvantageInputs``.

The per-token rewards r_t already hold the KL shaping (``kl_shaped_rewards``: -beta * KL_t on each response token
when the KL is in the reward) and the sequence reward R(x, y) at the last response token, so the sequence return of
a row is sum_t r_t = R - beta * sum_t KL_t. Estimators (A_t for each response token t of row i, prompt group g(i)):

* ``gae``    Schulman et al. 2016, eq. 16: A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t.
* ``nstep``  A_t = G_t - V_t with the n-step return G_t = sum_{l<n} gamma^l r_{t+l} + gamma^n V_{t+n} (``n_step``;
             0: Monte-Carlo), as Sparrow's A2C (Glaese et al. 2022).
* ``mc``     Monte-Carlo: A_t = G_t - V_t with G_t = sum_l gamma^l r_{t+l} (G_t alone without a critic).
* ``grpo``   DeepSeekMath (Shao et al. 2024, sec. 4.1.2): A_i = (R_i - mean_g R) / (std_g R + 1e-4) on every token;
             ``scale_rewards``: "group" (as the paper), "batch" (std over the whole batch) or "none" (Dr. GRPO,
             Liu et al. 2025: no std division).
* ``rloo``   Ahmadian et al. 2024, eq. 6: A_i = R_i - 1/(G-1) sum_{j != i in g} R_j (the leave-one-out baseline);
             ``scale_rewards="batch"`` normalises them over the batch (TRL 1.16 RLOOTrainer's ``normalize_advantages``),
             "none" leaves them; "group" is refused at config time (TRL's RLOO has no per-group std).
* ``reinforce_pp``  REINFORCE++ (Hu 2025, eq. 7-8): A_t = sum_{s >= t} gamma^{s-t} r_s (the reward minus the KL
             still to come), normalised to mean 0, std 1 over all response tokens of the batch.
* ``reinforce_pp_baseline``  REINFORCE++ with a group baseline (Hu 2025, sec. 3.3; OpenRLHF's
             ``reinforce_baseline``): the group mean of the scores is subtracted from each score first,
             R_i <- R_i - mean_g R, then A_t as ``reinforce_pp`` (return to go, normalised over the batch).

``scale_rewards`` "group" and "batch" divide by the unbiased std + 1e-4, as TRL 1.16 does.

An estimator registered with ``estimator(name, ...)`` declares what a config must give it (the online config checks
it, naming no estimator): several samples per prompt (``needs_groups``: its baseline comes from them), a critic's
values (``needs_critic``), and the ``scale_rewards`` values it takes. ``ADVANTAGES.register(name)`` registers one that
needs none of these.

Batch statistics are over the GLOBAL batch: every sum, count, mean and std over rows or tokens goes through
``AdvantageInputs.total`` (the sum over all processes, ``prefopt.distributed.total_over_processes``), so two
processes with half a batch each give the advantages one process gives the whole batch. Group statistics stay
local: the G samples of a prompt are sampled on one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from prefopt.functional import masked_var
from prefopt.registry import ADVANTAGES
from prefopt.rl.kl import kl_shaped_rewards

STD_EPS = 1e-4
SCALES = ("group", "batch", "none")


def estimator(name: str, needs_groups: bool = False, needs_critic: bool = False,
              scale_rewards: tuple[str, ...] = SCALES) -> Callable[[Callable], Callable]:
    """Register the decorated estimator as ``name`` with what it needs (module docstring)."""
    def register(fn: Callable) -> Callable:
        fn.needs_groups, fn.needs_critic, fn.scale_rewards = needs_groups, needs_critic, scale_rewards
        return ADVANTAGES.register(name)(fn)
    return register


def requirements(name: str) -> tuple[bool, bool, tuple[str, ...]]:
    """(needs_groups, needs_critic, scale_rewards) of the estimator registered as ``name``."""
    fn = ADVANTAGES.get(name)
    return (getattr(fn, "needs_groups", False), getattr(fn, "needs_critic", False),
            getattr(fn, "scale_rewards", SCALES))


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Monte-Carlo returns G_t = sum_l gamma^l r_{t+l} (the n-step target with n = the episode)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] * mask[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def local_total(x: Tensor) -> Tensor:
    """The sum over processes of a run with one process: ``x`` itself."""
    return x


def batch_moments(values: Tensor, mask: Tensor, total: Callable[[Tensor], Tensor] = local_total,
                  unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """(mean, variance) of ``values`` where ``mask`` is 1, over the global batch (``total`` sums over processes),
    in float64, in two passes (the mean first, then the squared deviations from it)."""
    values, mask = values.double(), mask.double()
    first = total(torch.stack([(values * mask).sum(), mask.sum()]))
    count = first[1]
    mean = first[0] / count.clamp(min=1)
    squares = total(((values - mean) ** 2 * mask).sum()[None])[0]
    divisor = count - 1 if unbiased and count > 1 else count.clamp(min=1)
    return mean, squares / divisor


def batch_whiten(values: Tensor, mask: Tensor, total: Callable[[Tensor], Tensor] = local_total,
                 shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries of the global batch (unbiased var); ``shift_mean=False``
    keeps the mean (PPO's reward whitening). Masked result, in the dtype of ``values``."""
    mean, var = batch_moments(values, mask, total)
    whitened = (values.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return (whitened * mask).to(values.dtype)


@dataclass
class AdvantageInputs:
    """What every estimator receives. Per-token tensors are [B, T], aligned with the response tokens."""

    rewards: Tensor  # [B, T] per-token rewards (KL shaping + the sequence reward at the last token)
    mask: Tensor  # [B, T] 1 on response tokens
    group: Tensor  # [B] long: the prompt each row answers
    values: Tensor | None = None  # [B, T] critic values V(s_t) (gae, mc with a baseline)
    scores: Tensor | None = None  # [B] R(x, y) alone, without the KL shaping (reinforce_pp_baseline)
    total: Callable[[Tensor], Tensor] = field(default=local_total)  # a tensor summed over every process

    @property
    def sequence_rewards(self) -> Tensor:
        """R_i - beta * KL_i: the return of each row [B]."""
        return (self.rewards * self.mask).sum(-1)


def group_mean(x: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (mean over its group [B], group size [B]) of the row values ``x`` [B]."""
    ids, inverse = torch.unique(group, return_inverse=True)
    sums = x.new_zeros(len(ids)).index_add(0, inverse, x)
    counts = x.new_zeros(len(ids)).index_add(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse], counts[inverse]


def batch_std(x: Tensor, total: Callable[[Tensor], Tensor]) -> Tensor:
    """The unbiased std of the row values ``x`` [B] over the global batch (0 for a single row)."""
    return batch_moments(x, torch.ones_like(x), total)[1].sqrt().to(x.dtype)


def per_token(sequence_advantages: Tensor, mask: Tensor) -> Tensor:
    """Broadcast one advantage per row [B] over its response tokens -> [B, T]."""
    return sequence_advantages[:, None] * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over right-padded token sequences.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = sum_l (gamma * lam)^l delta_{t+l},   returns R_t = A_t + V_t.
    V after the last valid token is 0. rewards, values, mask: [B, T]. Returns (advantages, returns), masked.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@estimator("gae", needs_critic=True)
def gae_advantages(inputs: AdvantageInputs, cfg: Any) -> tuple[Tensor, Tensor]:
    if inputs.values is None:
        raise ValueError("advantage 'gae' needs a critic (values)")
    return gae(inputs.rewards, inputs.values, inputs.mask, cfg.gamma, cfg.lam)


def nstep_returns(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, n: int) -> Tensor:
    """G_t = sum_{l<n} gamma^l r_{t+l} + gamma^n V_{t+n} (V and r are 0 past the end); n = 0: Monte-Carlo."""
    T = rewards.shape[1]
    if n == 0 or n >= T:
        return discounted_returns(rewards, mask, gamma)
    rewards, values = rewards * mask, values * mask
    returns = torch.zeros_like(rewards)
    for lag in range(n):
        returns[:, :T - lag] += gamma**lag * rewards[:, lag:]
    returns[:, :T - n] += gamma**n * values[:, n:]
    return returns * mask


@estimator("nstep", needs_critic=True)
def nstep_advantages(inputs: AdvantageInputs, cfg: Any) -> tuple[Tensor, Tensor]:
    if inputs.values is None:
        raise ValueError("advantage 'nstep' needs a critic (values)")
    returns = nstep_returns(inputs.rewards, inputs.values, inputs.mask, cfg.gamma, cfg.n_step)
    return (returns - inputs.values) * inputs.mask, returns


@ADVANTAGES.register("mc")
def monte_carlo_advantages(inputs: AdvantageInputs, cfg: Any) -> tuple[Tensor, Tensor]:
    returns = discounted_returns(inputs.rewards, inputs.mask, cfg.gamma)
    baseline = inputs.values * inputs.mask if inputs.values is not None else torch.zeros_like(returns)
    return returns - baseline, returns


@estimator("grpo", needs_groups=True)
def group_normalised_advantages(inputs: AdvantageInputs, cfg: Any) -> tuple[Tensor, None]:
    rewards = inputs.sequence_rewards
    mean, _ = group_mean(rewards, inputs.group)
    advantages = rewards - mean
    if cfg.scale_rewards == "group":
        variance, counts = group_mean((rewards - mean) ** 2, inputs.group)
        std = (variance * counts / (counts - 1).clamp(min=1)).sqrt()
        advantages = advantages / (std + STD_EPS)
    elif cfg.scale_rewards == "batch":
        advantages = advantages / (batch_std(rewards, inputs.total) + STD_EPS)
    return per_token(advantages, inputs.mask), None


@estimator("rloo", needs_groups=True, scale_rewards=("none", "batch"))
def leave_one_out_advantages(inputs: AdvantageInputs, cfg: Any) -> tuple[Tensor, None]:
    rewards = inputs.sequence_rewards
    mean, counts = group_mean(rewards, inputs.group)
    if (counts < 2).any():
        raise ValueError("advantage 'rloo' needs at least 2 samples per prompt (algorithm.num_samples >= 2)")
    baseline = (mean * counts - rewards) / (counts - 1)
    advantages = rewards - baseline
    if cfg.scale_rewards == "batch":
        mean, var = batch_moments(advantages, torch.ones_like(advantages), inputs.total)
        advantages = ((advantages - mean) / (var.sqrt() + STD_EPS)).to(rewards.dtype)
    return per_token(advantages, inputs.mask), None


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp_advantages(inputs: AdvantageInputs, cfg: Any) -> tuple[Tensor, Tensor]:
    returns = discounted_returns(inputs.rewards, inputs.mask, cfg.gamma)
    return batch_whiten(returns, inputs.mask, inputs.total), returns


@estimator("reinforce_pp_baseline", needs_groups=True)
def reinforce_pp_group_baseline(inputs: AdvantageInputs, cfg: Any) -> tuple[Tensor, Tensor]:
    if inputs.scores is None:
        raise ValueError("advantage 'reinforce_pp_baseline' needs the scores R(x, y) of the responses")
    baseline, _ = group_mean(inputs.scores.to(inputs.rewards.dtype), inputs.group)
    rewards = inputs.rewards + kl_shaped_rewards(-baseline, torch.zeros_like(inputs.rewards), inputs.mask, 0.0)
    return reinforce_pp_advantages(AdvantageInputs(rewards, inputs.mask, inputs.group, total=inputs.total), cfg)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over masked tokens (1: perfect critic, <= 0: useless)."""
    var_returns = masked_var(returns, mask, unbiased=False)
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp(min=1e-8))
