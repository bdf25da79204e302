"""RLHF with PPO: InstructGPT (Ouyang et al. 2022, arXiv 2203.02155, eq. 2), after Ziegler et al. 2019
(arXiv 1909.08593) and Stiennon et al. 2020 (arXiv 2009.01325).

One step of the Trainer = one batch of prompts, through the stages of the online skeleton
(prefopt.rl.algorithm.OnlineAlgorithm), of which PPO overrides the marked ones:

1. collect: sample responses y ~ pi(.|x) with the shared engine (prefopt.rl.engine, KV cache, stops at EOS);
2. score*: s(x, y) = sum_i w_i * reward_i(x, y) (prefopt.rl.rewards), read at the last response token; the old
   log-probs AND the critic's old values V_old(s_t) from one forward;
   per-token reward  r_t = -beta * KL_t + [t = last] * s,  KL_t = log pi(y_t|.) - log pi_ref(y_t|.) (k1, or k3);
   pi_ref is the frozen SFT policy (with LoRA: the same weights with the adapter off); beta fixed or Ziegler's
   adaptive controller; rewards optionally scaled to unit variance (``whiten_rewards``);
3. advantages: GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_l (gamma lam)^l
   delta_{t+l}, returns R_t = A_t + V_t (the value targets); advantages whitened over the batch;
4. update: ``epochs`` passes over ``num_minibatches`` shuffled minibatches, each ONE optimizer update of (loss*)
       L = E_t[max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))]                 (clipped surrogate)
         + vf_coef * 0.5 * E_t[max((V_t - R_t)^2, (clip(V_t, V_old -+ eps_v) - R_t)^2)]  (clipped value loss)
         - entropy_coef * E_t[H_t]  +  ptx_coef * E_{x~D_pretrain}[-log pi(x)]          (PPO-ptx)
   with rho_t = pi(y_t|.) / pi_old(y_t|.); E_t is the mean over all response tokens of the minibatch. The
   surrogate and entropy terms are the skeleton's ``policy_loss`` (``loss_type`` token_mean: that token mean over
   the minibatch of every process; eps is ``epsilon``, and ``epsilon_high`` gives DAPO's clip-higher).

Choices: the critic is a value head on the policy (``shared``) or a separate model initialised from the reward
model (``reward_model``, as InstructGPT); dropout is off; every log-prob (old, new, reference) is taken at the
sampling temperature; one response per prompt by default (``num_samples``); the critic may learn at its own rate
(``critic_learning_rate``). Reward and advantage whitening use the statistics of the whole batch of every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from prefopt.algorithms.lm import lm_nll
from prefopt.config import DataConfig, check
from prefopt.data import build_dataloader, load_rows
from prefopt.distributed import BatchStream
from prefopt.errors import ConfigError
from prefopt.functional import masked_mean
from prefopt.models import load_reward_model
from prefopt.registry import register_algorithm
from prefopt.rl.advantages import batch_whiten, explained_variance
from prefopt.rl.algorithm import MicroBatch, OnlineAlgorithm, OnlineConfig, Scored
from prefopt.rl.kl import KLController, kl_over_processes, kl_penalty
from prefopt.scoring import PolicyAndValue, value_head
from prefopt.types import LMBatch, Rollout


def approx_kl(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(pi_old || pi): the token mean of rho - 1 - log rho (detached)."""
    log_ratio = (logprobs - old_logprobs).detach()
    return masked_mean((torch.exp(log_ratio) - 1) - log_ratio, mask)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss (Ziegler et al. 2019; OpenAI baselines) -> (loss, clip fraction)."""
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask)
    return loss, clipfrac.detach()


@dataclass
class PPOConfig(OnlineConfig):
    """The skeleton's knobs with PPO's defaults, PPO's own below; the fields ``init=False`` are fixed by PPO."""

    renamed_keys: ClassVar[dict[str, str]] = {"ppo_epochs": "epochs", "cliprange": "epsilon"}

    num_samples: int = 1
    """Responses per prompt (PPO's baseline is its critic, not a group)."""
    loss_type: str = "token_mean"
    """Policy loss (prefopt.rl.losses); token_mean is PPO's E_t, the token mean over the minibatch."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty to the reference (initial value when adaptive; 0: no reference in training)."""
    epochs: int = 4
    """Passes over each rollout batch (PPO epochs)."""
    advantage: str = field(default="gae", init=False)
    """GAE on the critic's values."""
    scale_rewards: Literal["group", "batch", "none"] = field(default="none", init=False)
    """Unused by GAE (whiten_rewards / whiten_advantages are PPO's scaling)."""
    n_step: int = field(default=0, init=False)
    """Unused by GAE."""
    kl_in: Literal["loss", "reward"] = field(default="reward", init=False)
    """The KL is a per-token reward term."""
    kl_ratio_correction: bool = field(default=False, init=False)
    """Unused: the KL is not a loss term."""
    prefix_sharing: bool = field(default=False, init=False)
    """The critic reads the padded rows (no shared-prefix layout)."""
    adaptive_kl: bool = False
    """Adapt beta towards kl_target with Ziegler et al.'s proportional controller."""
    kl_target: float = 6.0
    """Target KL per sequence (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in sequences) of the adaptive controller; larger adapts more slowly."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator: k1 = log pi - log pi_ref (InstructGPT), k3 = exp(-k1) - 1 + k1 (>= 0)."""
    cliprange_value: float = 0.2
    """Clip range of the value update around the old values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance over the batch (mean kept) before GAE."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, variance 1 over the batch (the skeleton's ``advantages``)."""
    critic: Literal["shared", "reward_model"] = "shared"
    """shared: a value head on the policy; reward_model: a separate critic initialised from a reward model."""
    critic_path: str | None = None
    """Reward model directory of the separate critic; default: the path of the first reward_model component."""
    critic_learning_rate: float | None = None
    """Learning rate of the critic (value head or separate critic; its own optimizer group, on the same schedule);
    default: train.learning_rate."""
    value_head_std: float = 0.0
    """Init std of the shared value head's weights (0: zeros, so the first values are 0)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight gamma of the LM loss on a pretraining/SFT text stream mixed into every update."""
    ptx_path: str | None = None
    """Text stream for PPO-ptx (any file the data layer reads as text); default: data.text_path."""
    ptx_batch_size: int | None = None
    """Sequences of the text stream per update; default: the PPO minibatch size."""

    def __post_init__(self):
        super().__post_init__()
        check(self.kl_target > 0, "algorithm.kl_target", self.kl_target, "must be > 0")
        check(self.kl_horizon > 0, "algorithm.kl_horizon", self.kl_horizon, "must be > 0")
        check(self.cliprange_value > 0, "algorithm.cliprange_value", self.cliprange_value, "must be > 0")
        for key in ("vf_coef", "ptx_coef", "value_head_std"):
            check(getattr(self, key) >= 0, f"algorithm.{key}", getattr(self, key), "must be >= 0")
        check(self.ptx_batch_size is None or self.ptx_batch_size > 0, "algorithm.ptx_batch_size", self.ptx_batch_size,
              "must be > 0 (or null: the PPO minibatch size)")
        check(self.critic_learning_rate is None or self.critic_learning_rate >= 0, "algorithm.critic_learning_rate",
              self.critic_learning_rate, "must be >= 0")


def ptx_micro_batches(batch: LMBatch, parts: int) -> list[tuple[LMBatch, Tensor] | None]:
    """``batch`` cut into ``parts`` row slices, each with the labelled-token count of the WHOLE batch (the
    denominator of its token mean); None for an empty slice."""
    labelled = batch.labels[:, 1:] != -100
    tokens = labelled.sum()
    slices = torch.arange(batch.input_ids.shape[0]).tensor_split(parts)
    return [(batch_rows(batch, rows), tokens) if len(rows) else None for rows in slices]


def batch_rows(batch: LMBatch, rows: Tensor) -> LMBatch:
    return replace(batch, **{name: value[rows] for name, value in vars(batch).items() if isinstance(value, Tensor)})


@register_algorithm("ppo")
class PPO(OnlineAlgorithm):
    """RLHF-PPO (InstructGPT): KL-shaped reward, GAE, clipped surrogate and value loss, optional PPO-ptx."""

    Config = PPOConfig
    uses_critic = True

    def build(self) -> None:
        cfg = self.config
        if not cfg.rewards:
            raise ConfigError("algorithm.rewards is empty: give at least one reward component, e.g. "
                              "[{name: reward_model, params: {path: runs/rm/model}}]")
        super().build()
        lm = self.model.lm
        if cfg.critic == "shared":
            self.model = PolicyAndValue(lm, value_head=value_head(lm.config.hidden_size, cfg.value_head_std))
        else:
            critic = load_reward_model(self.critic_path(), self.run.model, trainable=True)
            self.model = PolicyAndValue(lm, critic=critic)
        if self.reference is not None:  # scored as the policy is, without a critic
            self.reference = PolicyAndValue(self.reference.lm)
        self.kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)

    def critic_path(self) -> str:
        if self.config.critic_path:
            return self.config.critic_path
        for spec in self.config.rewards:
            if spec.name == "reward_model" and "path" in spec.params:
                return spec.params["path"]
        raise ConfigError("algorithm.critic=reward_model needs algorithm.critic_path or a reward_model reward")

    def setup(self, accelerator: Any, loaders: dict[str, Any]) -> None:
        super().setup(accelerator, loaders)
        accelerator.register_for_checkpointing(self.kl_ctl)
        self.ptx_batches = self.ptx_stream() if self.config.ptx_coef > 0 else None
        if self.ptx_batches is not None:  # its position is checkpoint state: a resumed run continues the stream
            accelerator.register_for_checkpointing(self.ptx_batches)

    def ptx_stream(self) -> BatchStream:
        """Endless shuffled batches of the PPO-ptx text (documents packed to data.max_length tokens)."""
        path = self.config.ptx_path or self.run.data.text_path
        if not path:
            raise ConfigError("algorithm.ptx_coef > 0 needs algorithm.ptx_path or data.text_path (a text stream)")
        data = DataConfig(path=path, format="auto", eval_fraction=0.0, max_length=self.run.data.max_length,
                          max_prompt_length=min(self.run.data.max_prompt_length, self.run.data.max_length))
        minibatch = self.run.train.batch_size * self.config.num_samples // self.config.num_minibatches
        size = self.config.ptx_batch_size or max(1, minibatch)
        loader, _ = build_dataloader(load_rows(data, "text").train, "text", self.tokenizer, data, size,
                                     shuffle=True, seed=self.run.train.seed)
        return BatchStream(loader, self.run.train.seed)

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value

    @property
    def critic(self) -> torch.nn.Module:
        model = self.unwrapped
        return model.value_head if model.value_head is not None else model.critic

    # ------------------------------------------------------------------------------------------ stages
    def reference_logps(self, rollout: Rollout) -> Tensor:
        return self.response_logps(self.reference_forward, rollout, with_values=False)[0]

    def token_kl(self, logps: Tensor, ref_logps: Tensor) -> Tensor:
        return kl_penalty(logps, ref_logps, self.config.kl_estimator)

    @torch.no_grad()
    def score(self, rollout: Rollout) -> Scored:
        """The skeleton's scoring (old log-probs and values, the KL-shaped rewards at the current beta), then the
        reward whitening and the controller's update on this batch's KL (of every process)."""
        scored = super().score(rollout)
        if self.config.whiten_rewards:
            scored.rewards = batch_whiten(scored.rewards, scored.mask, self.total, shift_mean=False)
        self.kl_ctl.update(*kl_over_processes(self.accelerator, scored.kl, scored.mask))
        return scored

    def loss(self, scored: Scored, advantages: Tensor, micro: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        """The skeleton's policy loss + vf_coef * the clipped value loss (+ PPO-ptx), each this micro-batch's share
        of the minibatch's token mean."""
        cfg, rows = self.config, micro.rows
        logps, entropy, values = self.response_logps(self.model, scored.rollout, rows, with_entropy=self.entropy_mode)
        loss, metrics = self.policy_loss(logps, entropy, scored, advantages, micro)
        mask = scored.loss_mask[rows]
        vf_loss, vf_clipfrac = value_loss(values, scored.values[rows], scored.returns[rows], mask,
                                          cfg.cliprange_value)
        loss = loss + cfg.vf_coef * vf_loss * mask.sum() / max(micro.update_tokens, 1.0)
        metrics.update({"loss/value": float(vf_loss.detach()), "value_clip_fraction": float(vf_clipfrac),
                        "approx_kl": float(approx_kl(logps, self.old_logps(scored, logps, micro), mask))})
        if self.ptx_batches is not None:
            if micro.part == 0:  # one text batch per update, split as its minibatch is
                self.ptx_parts = ptx_micro_batches(next(self.ptx_batches), self.accumulation)
            if self.ptx_parts[micro.part] is not None:
                ptx_loss = self.ptx_loss(*self.ptx_parts[micro.part])
                loss = loss + cfg.ptx_coef * ptx_loss
                metrics["loss/ptx"] = float(ptx_loss.detach()) * self.accumulation
        return loss, metrics

    def ptx_loss(self, batch: LMBatch, tokens: Tensor) -> Tensor:
        """InstructGPT's PPO-ptx term on (part of) a batch of pretraining/SFT text: its summed NLL / ``tokens``,
        scored as the ``pt`` stage scores it (``lm_nll``)."""
        nll, _ = lm_nll(lambda *inputs: self.model(*inputs, with_entropy=False, with_values=False)[0],
                        batch.to(self.device))
        return nll / tokens.to(self.device)

    def rollout_metrics(self, scored: Scored) -> dict[str, float]:
        """The skeleton's, with the critic's fit, the beta of this rollout and the engine-vs-training gap of the
        old log-probs (when they are computed: more than one update per rollout)."""
        metrics = {**super().rollout_metrics(scored), "kl_coef": scored.kl_coef,
                   "explained_variance": explained_variance(scored.values, scored.returns, scored.mask)}
        if scored.old_logps is not None:
            gap = (scored.rollout.logprobs - scored.old_logps).abs()
            metrics["logprob_gap"] = float(masked_mean(gap, scored.mask))
        return metrics
