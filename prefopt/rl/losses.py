"""Policy losses of the online algorithms, registered by name; every one takes the same ``PolicyLossInputs``.

The per-token term is PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with DAPO's decoupled clip range
(Yu et al. 2025, "clip-higher"), plus an optional k3 KL penalty to the reference (DeepSeekMath, Shao et al. 2024,
eq. 3-4), by default weighted by the ratio (``kl_ratio_correction``, DeepSeek-V3.2; TRL's default):

    l_t = -keep_t min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t) + beta * [rho_t] * k3_t,
    rho_t = pi(y_t|.) / pi_old(y_t|.),   k3_t = pi_ref/pi - log(pi_ref/pi) - 1,

with ``importance_sampling: sequence`` (GSPO, Zheng et al. 2025, eq. 7) one ratio per row instead,
rho_i = exp(1/|y_i| sum_t log(pi / pi_old)(y_it)) on each of its tokens, and keep_t = 1 except where
``top_entropy_quantile`` < 1 keeps only the highest-entropy tokens (``PolicyLossInputs.keep``).

The names say how l_t is aggregated (the ``loss_type`` of TRL 1.16's GRPOTrainer, whose numbers these equal, at any
gradient accumulation; ``token_mean`` is PPO's):

* ``grpo``       mean over rows of each row's token mean (DeepSeekMath eq. 3);
* ``bnpo``       each micro-batch's own token mean, averaged over the micro-batches (and processes) of the update, as
                 TRL computes it: token-level within a micro-batch, so accumulation changes the token weights;
* ``token_mean`` token sum / the tokens of the whole update (all its micro-batches and processes): PPO's E_t over the
                 minibatch, the same at any accumulation;
* ``dapo``       token sum / the tokens one update sees on average (rollout tokens / minibatches; DAPO eq. 8);
* ``dr_grpo``    token sum / (rows * max_new_tokens), a constant (Dr. GRPO, Liu et al. 2025, eq. 4);
* ``sequence``   one ratio per row, rho = exp(sum_t log pi - sum_t log pi_old), clipped, mean over rows
                 (TRL 1.16's RLOOTrainer loss; Ahmadian et al. 2024 use the sequence as one action).

Each returns (loss, metrics) with ``clip_fraction``: the share of tokens (rows for ``sequence``) whose ratio lies
outside the clip range on the side where clipping binds, and ``kl`` (the mean k3 when beta > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefopt.functional import masked_mean
from prefopt.registry import POLICY_LOSSES
from prefopt.rl.kl import kl_penalty


@dataclass
class PolicyLossInputs:
    """What every policy loss receives: [b, T] tensors aligned with the response tokens of the b rows of one
    micro-batch, and the size of the update (minibatch) they belong to. A loss is a SUM over the micro-batch's rows
    or tokens divided by a count of the whole update, so the losses of an update's micro-batches add up to the
    update's loss (with one micro-batch, the counts default to the micro-batch's own). The counts are per process:
    the update's count over all processes / the number of processes, since DDP averages the processes' gradients."""

    logps: Tensor  # log pi(y_t|.) under the policy being trained (carries the graph)
    old_logps: Tensor  # log pi_old(y_t|.) of the policy that sampled (or that started this update's epochs)
    advantages: Tensor  # A_t (sequence methods: the row's advantage on each of its tokens)
    mask: Tensor  # 1 on response tokens
    ref_logps: Tensor | None = None  # log pi_ref(y_t|.), needed when the KL is a loss term (beta > 0)
    tokens_per_update: float = 0.0  # response tokens of the rollout / minibatches (``dapo``)
    max_new_tokens: int = 0  # the generation budget (``dr_grpo``)
    update_rows: int = 0  # rows of the update (0: this micro-batch's)
    update_tokens: float = 0.0  # response tokens of the update (0: this micro-batch's)
    micro_batches: int = 1  # micro-batches of the update (``bnpo``)
    keep: Tensor | None = None  # 1 on the tokens the policy term trains on (``top_entropy_quantile``; None: all)

    def __post_init__(self):
        self.update_rows = self.update_rows or self.mask.shape[0]
        self.update_tokens = self.update_tokens or float(self.mask.sum())


@dataclass
class ClipSettings:
    """The clip range and KL weight every loss reads from the algorithm's config."""

    epsilon_low: float
    epsilon_high: float
    kl_loss_coef: float = 0.0
    kl_ratio_correction: bool = False


def clip_settings(cfg: Any) -> ClipSettings:
    high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    return ClipSettings(cfg.epsilon, high, cfg.kl_coef if cfg.kl_in == "loss" else 0.0, cfg.kl_ratio_correction)


def clipped_surrogate(ratio: Tensor, advantages: Tensor, clip: ClipSettings) -> tuple[Tensor, Tensor]:
    """-min(rho A, clip(rho) A) and where clipping binds (bool), elementwise."""
    clipped_ratio = torch.clamp(ratio, 1 - clip.epsilon_low, 1 + clip.epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    binds = ((ratio < 1 - clip.epsilon_low) & (advantages < 0)) | ((ratio > 1 + clip.epsilon_high) & (advantages > 0))
    return loss, binds


def token_terms(inputs: PolicyLossInputs, cfg: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """l_t of the module docstring [B, T] and its metrics."""
    clip = clip_settings(cfg)
    log_ratio = inputs.logps - inputs.old_logps
    if cfg.importance_sampling == "sequence":  # GSPO: the length-normalised log-ratio of the row on every token
        mask = inputs.mask
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))
        log_ratio = log_ratio.expand_as(inputs.logps)
    ratio = torch.exp(log_ratio)
    per_token, binds = clipped_surrogate(ratio, inputs.advantages, clip)
    if inputs.keep is not None:
        per_token = per_token * inputs.keep
    metrics = {"clip_fraction": masked_mean(binds.float(), inputs.mask)}
    if clip.kl_loss_coef:
        if inputs.ref_logps is None:
            raise ValueError("a KL loss term (kl_in=loss, kl_coef > 0) needs the reference log-probs")
        k3 = kl_penalty(inputs.logps, inputs.ref_logps, "k3")
        weight = ratio if clip.kl_ratio_correction else 1.0
        per_token = per_token + clip.kl_loss_coef * weight * k3
        metrics["loss/kl"] = masked_mean(k3.detach(), inputs.mask)
    return per_token, metrics


def _token_loss(aggregate: Callable[[Tensor, PolicyLossInputs], Tensor]):
    """A registered loss = ``aggregate`` of the masked per-token terms."""
    def loss(inputs: PolicyLossInputs, cfg: Any) -> tuple[Tensor, dict[str, Tensor]]:
        per_token, metrics = token_terms(inputs, cfg)
        return aggregate(per_token * inputs.mask, inputs), metrics
    return loss


POLICY_LOSSES.register("grpo")(_token_loss(lambda x, i: (x.sum(-1) / i.mask.sum(-1).clamp(min=1)).sum()
                                           / i.update_rows))
POLICY_LOSSES.register("bnpo")(_token_loss(lambda x, i: x.sum() / i.mask.sum().clamp(min=1) / i.micro_batches))
POLICY_LOSSES.register("token_mean")(_token_loss(lambda x, i: x.sum() / max(i.update_tokens, 1.0)))
POLICY_LOSSES.register("dapo")(_token_loss(lambda x, i: x.sum() / max(i.tokens_per_update, 1.0)))
POLICY_LOSSES.register("dr_grpo")(_token_loss(lambda x, i: x.sum() / (i.update_rows * i.max_new_tokens)))


@POLICY_LOSSES.register("sequence")
def sequence_loss(inputs: PolicyLossInputs, cfg: Any) -> tuple[Tensor, dict[str, Tensor]]:
    mask = inputs.mask
    log_ratio = ((inputs.logps - inputs.old_logps) * mask).sum(-1)
    advantages = (inputs.advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # constant over a row's tokens
    per_row, binds = clipped_surrogate(torch.exp(log_ratio), advantages, clip_settings(cfg))
    return per_row.sum() / inputs.update_rows, {"clip_fraction": binds.float().mean()}
