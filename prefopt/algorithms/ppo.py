"""RLHF with PPO: InstructGPT (Ouyang et al. 2022, arXiv 2203.02155, eq. 2), after Ziegler et al. 2019
(arXiv 1909.08593) and Stiennon et al. 2020 (arXiv 2009.01325).

One step of the Trainer = one batch of prompts:

1. sample responses y ~ pi(.|x) with the shared engine (prefopt.rl.engine, KV cache, stops at EOS);
2. score them: s(x, y) = sum_i w_i * reward_i(x, y) (prefopt.rl.rewards), read at the last response token;
3. per-token reward  r_t = -beta * KL_t + [t = last] * s,  KL_t = log pi(y_t|.) - log pi_ref(y_t|.) (k1, or k3);
   pi_ref is the frozen SFT policy (with LoRA: the same weights with the adapter off);
4. GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_l (gamma lam)^l delta_{t+l},
   returns R_t = A_t + V_t; advantages whitened over the batch;
5. ``ppo_epochs`` passes over ``num_minibatches`` shuffled minibatches, each ONE optimizer update of
       L = E_t[max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))]                 (clipped surrogate)
         + vf_coef * 0.5 * E_t[max((V_t - R_t)^2, (clip(V_t, V_old -+ eps_v) - R_t)^2)]  (clipped value loss)
         - entropy_coef * E_t[H_t]  +  ptx_coef * E_{x~D_pretrain}[-log pi(x)]          (PPO-ptx)
   with rho_t = pi(y_t|.) / pi_old(y_t|.); E_t is the mean over all response tokens of the minibatch.

Choices: beta fixed or Ziegler's adaptive controller; the critic is a value head on the policy (``shared``) or a
separate model initialised from the reward model (``reward_model``, as InstructGPT); dropout is off; every
log-prob (old, new, reference) is taken at the sampling temperature.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from prefopt.algorithm import Algorithm
from prefopt.algorithms.lm import lm_nll
from prefopt.config import DataConfig, LoraConfig, check
from prefopt.data import build_dataloader, load_rows
from prefopt.distributed import BatchStream
from prefopt.errors import ConfigError
from prefopt.functional import kl_penalty, masked_mean, masked_whiten
from prefopt.models import load_causal_lm, load_reward_model, needs_separate_reference
from prefopt.registry import ADVANTAGES, register_algorithm
from prefopt.rl.rewards import CompositeReward, RewardSpec
from prefopt.rl.advantages import AdvantageInputs, explained_variance
from prefopt.rl.algorithm import minibatches, require_dropout_off
from prefopt.rl.engine import GenerationConfig, generate, rollout_inputs
from prefopt.rl.kl import KLController, kl_over_processes, kl_shaped_rewards, sequence_mean
from prefopt.rl.losses import ClipSettings, clipped_surrogate
from prefopt.scoring import PolicyAndValue, value_head
from prefopt.types import LMBatch, LossOutput, PromptBatch


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7; prefopt.rl.losses) as a token-mean loss
    -> (loss, clip fraction, approx KL)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    per_token, clipped = clipped_surrogate(ratio, advantages, ClipSettings(cliprange, cliprange))
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3 estimate of KL(pi_old || pi)
    return masked_mean(per_token, mask), masked_mean(clipped.float(), mask).detach(), approx_kl.detach()


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
class PPOConfig:
    rewards: list[RewardSpec] = field(default_factory=list)
    """Reward components and weights, e.g. [{name: reward_model, params: {path: runs/rm/model}}] (prefopt.rl.rewards)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling: max_new_tokens, temperature, top_p, top_k, do_sample (prefopt.rl.engine)."""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty to the reference policy (the initial value when adaptive)."""
    adaptive_kl: bool = False
    """Adapt beta towards kl_target with Ziegler et al.'s proportional controller."""
    kl_target: float = 6.0
    """Target KL per sequence (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in sequences) of the adaptive controller; larger adapts more slowly."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator: k1 = log pi - log pi_ref (InstructGPT), k3 = exp(-k1) - 1 + k1 (>= 0)."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Clip range eps of the probability ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value update around the old values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Minibatches per pass (each is one optimizer update); at most train.batch_size."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance over the batch (mean kept) before GAE."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, variance 1 over the batch."""
    critic: Literal["shared", "reward_model"] = "shared"
    """shared: a value head on the policy; reward_model: a separate critic initialised from a reward model."""
    critic_path: str | None = None
    """Reward model directory of the separate critic; default: the path of the first reward_model component."""
    value_head_std: float = 0.0
    """Init std of the shared value head's weights (0: zeros, so the first values are 0)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight gamma of the LM loss on a pretraining/SFT text stream mixed into every update."""
    ptx_path: str | None = None
    """Text stream for PPO-ptx (any file the data layer reads as text); default: data.text_path."""
    ptx_batch_size: int | None = None
    """Sequences of the text stream per update; default: the PPO minibatch size."""
    reference: str | None = None
    """Reference policy path; default: the starting model (model.name_or_path)."""

    def __post_init__(self):
        check(self.kl_coef >= 0, "algorithm.kl_coef", self.kl_coef, "must be >= 0")
        check(self.kl_target > 0, "algorithm.kl_target", self.kl_target, "must be > 0")
        check(self.kl_horizon > 0, "algorithm.kl_horizon", self.kl_horizon, "must be > 0")
        check(0 <= self.gamma <= 1, "algorithm.gamma", self.gamma, "must be in [0, 1]")
        check(0 <= self.lam <= 1, "algorithm.lam", self.lam, "must be in [0, 1]")
        check(self.cliprange > 0, "algorithm.cliprange", self.cliprange, "must be > 0")
        check(self.cliprange_value > 0, "algorithm.cliprange_value", self.cliprange_value, "must be > 0")
        check(self.vf_coef >= 0, "algorithm.vf_coef", self.vf_coef, "must be >= 0")
        check(self.ppo_epochs > 0, "algorithm.ppo_epochs", self.ppo_epochs, "must be > 0")
        check(self.num_minibatches > 0, "algorithm.num_minibatches", self.num_minibatches, "must be > 0")
        check(self.ptx_coef >= 0, "algorithm.ptx_coef", self.ptx_coef, "must be >= 0")
        check(self.value_head_std >= 0, "algorithm.value_head_std", self.value_head_std, "must be >= 0")


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
class PPO(Algorithm):
    """RLHF-PPO (InstructGPT): KL-shaped reward, GAE, clipped surrogate and value loss, optional PPO-ptx."""

    kind = "prompts"
    kl_knob = "kl_coef"  # the Config field the benchmark sweeps for its reward-vs-KL frontier
    Config = PPOConfig
    accumulates_in_step = True

    @classmethod
    def check_run(cls, run: Any) -> None:
        require_dropout_off(run, "ppo")

    def build(self) -> None:
        cfg = self.config
        if not cfg.rewards:
            raise ConfigError("algorithm.rewards is empty: give at least one reward component, e.g. "
                              "[{name: reward_model, params: {path: runs/rm/model}}]")
        self.check_run(self.run)
        lm = load_causal_lm(self.run.model)  # dropout off: check_run
        if cfg.critic == "shared":
            self.model = PolicyAndValue(lm, value_head=value_head(lm.config.hidden_size, cfg.value_head_std))
        else:
            critic = load_reward_model(self.critic_path(), self.run.model, trainable=True)
            self.model = PolicyAndValue(lm, critic=critic)
        self.reference = None
        if needs_separate_reference(lm) or cfg.reference:
            ref_cfg = replace(self.run.model, lora=LoraConfig(), load_in_4bit=False, gradient_checkpointing=False)
            self.reference = PolicyAndValue(load_causal_lm(ref_cfg, path=cfg.reference, trainable=False))
        self.kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.pending: dict[str, float] = {}  # the previous update's timing, logged with the next step

    def critic_path(self) -> str:
        if self.config.critic_path:
            return self.config.critic_path
        for spec in self.config.rewards:
            if spec.name == "reward_model" and "path" in spec.params:
                return spec.params["path"]
        raise ConfigError("algorithm.critic=reward_model needs algorithm.critic_path or a reward_model reward")

    def setup(self, accelerator: Any, loaders: dict[str, Any]) -> None:
        super().setup(accelerator, loaders)
        batch_size = self.run.train.batch_size
        check(self.config.num_minibatches <= batch_size, "algorithm.num_minibatches", self.config.num_minibatches,
              f"must be <= train.batch_size ({batch_size})")
        minibatch = batch_size // self.config.num_minibatches
        check(self.accumulation <= minibatch, "train.gradient_accumulation_steps", self.accumulation,
              f"must be <= the PPO minibatch size (train.batch_size // algorithm.num_minibatches = {minibatch}): "
              "each minibatch is split into that many micro-batches")
        self.reward = CompositeReward(self.config.rewards, self.tokenizer, accelerator.device)
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
        size = self.config.ptx_batch_size or max(1, self.run.train.batch_size // self.config.num_minibatches)
        loader, _ = build_dataloader(load_rows(data, "text").train, "text", self.tokenizer, data, size,
                                     shuffle=True, seed=self.run.train.seed)
        return BatchStream(loader, self.run.train.seed)

    @property
    def policy(self) -> torch.nn.Module:
        """The plain transformers / peft policy (generation and the reference run on it, outside DDP)."""
        return self.unwrapped.lm

    def reference_logps(self, sequences: Tensor, attention_mask: Tensor, score_mask: Tensor) -> Tensor:
        temperature = self.config.generation.logprob_temperature
        return self.reference_forward(sequences, attention_mask, score_mask, temperature, with_values=False)[0]

    # ------------------------------------------------------------------------------------------ training
    def step(self, batch: PromptBatch) -> Iterator[LossOutput]:
        cfg = self.config
        temperature = cfg.generation.logprob_temperature
        rollout = generate(self.policy, self.tokenizer, batch, cfg.generation)
        sequences, attention_mask, score_mask = rollout_inputs(rollout)
        mask = rollout.response_mask.float()
        prompt_width = rollout.prompt_ids.shape[1]

        with torch.no_grad():
            old_logprobs, _, old_values = (out[:, prompt_width:] for out in self.model(
                sequences, attention_mask, score_mask, temperature))
            ref_logprobs = self.reference_logps(sequences, attention_mask, score_mask)[:, prompt_width:]
            scores, components = self.reward(rollout)
            kl = kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
            kl_coef = self.kl_ctl.value
            rewards = kl_shaped_rewards(scores, kl, mask, kl_coef)
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = ADVANTAGES.get("gae")(AdvantageInputs(rewards, mask, rollout.group, old_values), cfg)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask)

        mean_kl = sequence_mean(kl, mask)
        self.kl_ctl.update(*kl_over_processes(self.accelerator, kl, mask))
        rollout_metrics = {
            **{f"reward/{name}": float(values.mean()) for name, values in components.items()},
            "reward/score": float(scores.mean()),
            "reward/kl_penalty": float(kl_coef * mean_kl),
            "reward/total": float(scores.mean() - kl_coef * mean_kl),
            "kl": float(mean_kl),
            "kl_coef": kl_coef,
            "explained_variance": explained_variance(old_values, returns, mask),
            "logprob_gap": float(masked_mean((rollout.logprobs - old_logprobs).abs(), mask)),
            "response_length": float(mask.sum(-1).mean()),
            "perf/gen_s": rollout.seconds,
            "perf/gen_tokens_per_s": rollout.tokens_per_s,
            **self.pending,
        }

        update_start, train_tokens = time.perf_counter(), 0
        accumulation = self.accumulation
        for minibatch in minibatches(len(rollout.responses), cfg.ppo_epochs, cfg.num_minibatches, sequences.device):
            ptx = next(self.ptx_batches) if self.ptx_batches is not None else None
            ptx_parts = ptx_micro_batches(ptx, accumulation) if ptx is not None else [None] * accumulation
            minibatch_tokens = mask[minibatch].sum()
            for idx, ptx_part in zip(minibatch.tensor_split(accumulation), ptx_parts):  # its micro-batches
                logprobs, entropy, values = (out[:, prompt_width:] for out in self.model(
                    sequences[idx], attention_mask[idx], score_mask[idx], temperature))
                mb_mask = mask[idx]
                pg_loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mb_mask,
                                                           cfg.cliprange)
                vf_loss, vf_clipfrac = value_loss(values, old_values[idx], returns[idx], mb_mask,
                                                  cfg.cliprange_value)
                mean_entropy = masked_mean(entropy, mb_mask)
                # this micro-batch's share of the minibatch's token mean; accelerate divides each loss by G
                share = accumulation * mb_mask.sum() / minibatch_tokens
                loss = share * (pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * mean_entropy)
                metrics = {"loss/policy": float(pg_loss.detach()), "loss/value": float(vf_loss.detach()),
                           "clip_fraction": float(clipfrac), "value_clip_fraction": float(vf_clipfrac),
                           "approx_kl": float(approx_kl), "entropy": float(mean_entropy.detach())}
                if ptx_part is not None:
                    ptx_loss = self.ptx_loss(*ptx_part)
                    loss = loss + cfg.ptx_coef * accumulation * ptx_loss
                    metrics["loss/ptx"] = float(ptx_loss.detach()) * accumulation
                tokens = int(attention_mask[idx].sum())
                train_tokens += tokens
                yield LossOutput(loss, {**rollout_metrics, **metrics}, tokens)
                rollout_metrics = {}
        update_s = time.perf_counter() - update_start  # includes the Trainer's backward and optimizer steps
        self.pending = {"perf/update_s": update_s, "perf/train_tokens_per_s": train_tokens / max(update_s, 1e-9)}

    def ptx_loss(self, batch: LMBatch, tokens: Tensor) -> Tensor:
        """InstructGPT's PPO-ptx term on (part of) a batch of pretraining/SFT text: its summed NLL / ``tokens``,
        scored as the ``pt`` stage scores it (``lm_nll``)."""
        nll, _ = lm_nll(lambda *inputs: self.model(*inputs, with_values=False)[0], batch.to(self.device))
        return nll / tokens.to(self.device)

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batch: PromptBatch) -> dict[str, float]:
        """Sums over sampled responses (seeded draw) of each reward component, the total, KL to the reference
        (sequence sum of log pi - log pi_ref on the sampled tokens) and the response length."""
        rollout = generate(self.policy, self.tokenizer, batch, self.config.generation, seed=self.run.train.seed)
        sequences, attention_mask, score_mask = rollout_inputs(rollout)
        ref_logprobs = self.reference_logps(sequences, attention_mask, score_mask)[:, rollout.prompt_ids.shape[1]:]
        mask = rollout.response_mask.float()
        scores, components = self.reward(rollout)
        kl = ((rollout.logprobs - ref_logprobs) * mask).sum(-1)
        return {**{f"reward/{name}": float(values.sum()) for name, values in components.items()},
                "reward/score": float(scores.sum()), "kl": float(kl.sum()),
                "response_length": float(mask.sum()), "count": float(len(rollout.responses))}
