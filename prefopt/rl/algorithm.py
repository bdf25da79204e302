"""``OnlineAlgorithm``: the skeleton of every critic-free online method, one batch of prompts per Trainer step:

    collect     G responses per prompt with the shared engine (prefopt.rl.engine), each row tagged with its prompt;
    score       the sequence reward R (prefopt.rl.rewards components), the policy's log-probs at sampling time and the
                reference's, the per-token KL and the per-token rewards r_t (KL shaping when ``kl_in="reward"``);
    advantages  the estimator named by ``config.advantage`` (prefopt.rl.advantages);
    update      ``epochs`` passes over ``num_minibatches`` shuffled minibatches, each ONE optimizer update of the
                policy loss named by ``config.loss_type`` (prefopt.rl.losses) - entropy_coef * mean entropy.

Each stage is a method a subclass may override; a new method is usually only a ``Config`` with other defaults
(see README, "Add an online algorithm"). With one epoch of one minibatch the sampling policy IS the policy being
updated, so its log-probs are the ones the update computes (detached) and no extra forward is run (as TRL does);
otherwise they are computed once, before the first update.

Metrics (the same names for every online algorithm; ``eval/`` ones are per-response means on held-out prompts):
    reward/score       mean R(x, y) (the weighted sum of the reward components; each is also reward/<component>)
    reward/kl_penalty  mean beta * KL(x, y) per response (0 when the KL is a loss term or beta = 0)
    reward/total       reward/score - reward/kl_penalty (what the policy is optimised for when the KL is a reward)
    kl                 mean sum_t (log pi - log pi_ref)(y_t) per response, at sampling time
    entropy            mean per-token entropy of the policy on its samples
    response_length    mean response tokens (EOS included)
    clip_fraction      share of tokens (rows for sequence losses) where the ratio clip binds
    loss/policy, loss/kl (the k3 loss term, when ``kl_in="loss"``), perf/gen_s, perf/gen_tokens_per_s, perf/score_s
    (the scoring stage: rewards, old and reference log-probs; the update is the rest of perf/step_s)
PPO and A2C log the same names, plus their critic's: loss/value, value_clip_fraction (PPO), explained_variance,
kl_coef (PPO's adaptive beta), approx_kl, logprob_gap (behaviour vs recomputed log-probs), loss/ptx (PPO-ptx).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from prefopt.algorithm import Algorithm
from prefopt.config import LoraConfig, check
from prefopt.functional import masked_mean
from prefopt.models import load_causal_lm, needs_separate_reference
from prefopt.prefix import supports
from prefopt.registry import ADVANTAGES, POLICY_LOSSES
from prefopt.rl.rewards import CompositeReward, RewardSpec
from prefopt.rl.advantages import AdvantageInputs
from prefopt.rl.engine import GenerationConfig, generate, rollout_inputs
from prefopt.rl.kl import kl_shaped_rewards
from prefopt.rl.losses import PolicyLossInputs
from prefopt.scoring import TokenScorer, grouped_token_logps
from prefopt.types import LossOutput, PromptBatch, Rollout


@dataclass
class OnlineConfig:
    rewards: list[RewardSpec] = field(default_factory=list)
    """Reward components and weights (prefopt.rl.rewards), e.g. [{name: target_token}] or a reward_model."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling: max_new_tokens, temperature, top_p, top_k, do_sample (prefopt.rl.engine)."""
    num_samples: int = 4
    """G: responses sampled per prompt (a group); train.batch_size counts prompts."""
    advantage: str = "grpo"
    """Advantage estimator by name (prefopt.rl.advantages): grpo, rloo, reinforce_pp, mc, gae."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide group-centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO)."""
    gamma: float = 1.0
    """Discount per token (reinforce_pp, mc, gae)."""
    lam: float = 0.95
    """GAE lambda."""
    n_step: int = 0
    """n of the n-step returns (advantage=nstep); 0: Monte-Carlo returns to the end of the response."""
    loss_type: str = "grpo"
    """Policy loss by name (prefopt.rl.losses): grpo, bnpo, dapo, dr_grpo, sequence."""
    epsilon: float = 0.2
    """Lower clip range eps_low of the ratio (and the upper one unless epsilon_high is set)."""
    epsilon_high: float | None = None
    """Upper clip range eps_high (DAPO clip-higher recommends 0.28); default: epsilon."""
    kl_coef: float = 0.0
    """beta: weight of KL(pi || pi_ref) (0: no reference forward in training; evaluation still reports the KL)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """loss: beta * k3 per token in the loss (GRPO); reward: -beta * k1 per token in the reward (RLOO, REINFORCE++)."""
    kl_ratio_correction: bool = True
    """kl_in=loss: weight k3 by the ratio rho_t (unbiased off-policy; DeepSeek-V3.2; TRL's use_bias_correction_kl)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    epochs: int = 1
    """Passes over each rollout batch (TRL's num_iterations)."""
    num_minibatches: int = 1
    """Minibatches per pass, each one optimizer update; at most the rows of a rollout (prompts x G)."""
    reference: str | None = None
    """Reference policy path; default: the starting model (model.name_or_path)."""
    prefix_sharing: bool = True
    """Score the G samples of a prompt with the prompt computed once (prefopt.prefix; the same log-probs). Needs
    SDPA or eager attention and no sliding window; otherwise the padded rows are scored."""

    def __post_init__(self):
        check(self.num_samples >= 1, "algorithm.num_samples", self.num_samples, "must be >= 1")
        check(self.advantage in ADVANTAGES, "algorithm.advantage", self.advantage,
              f"known: {', '.join(ADVANTAGES.available())}")
        check(self.loss_type in POLICY_LOSSES, "algorithm.loss_type", self.loss_type,
              f"known: {', '.join(POLICY_LOSSES.available())}")
        check(self.epsilon > 0, "algorithm.epsilon", self.epsilon, "must be > 0")
        check(self.epsilon_high is None or self.epsilon_high > 0, "algorithm.epsilon_high", self.epsilon_high,
              "must be > 0")
        check(0 <= self.gamma <= 1, "algorithm.gamma", self.gamma, "must be in [0, 1]")
        check(0 <= self.lam <= 1, "algorithm.lam", self.lam, "must be in [0, 1]")
        for key in ("kl_coef", "entropy_coef"):
            check(getattr(self, key) >= 0, f"algorithm.{key}", getattr(self, key), "must be >= 0")
        check(self.epochs >= 1, "algorithm.epochs", self.epochs, "must be >= 1")
        check(self.num_minibatches >= 1, "algorithm.num_minibatches", self.num_minibatches, "must be >= 1")


@dataclass
class Scored:
    """A rollout with everything the advantages and the update need; per-token tensors are [B, Tr]."""

    rollout: Rollout
    mask: Tensor  # 1 on response tokens
    old_logps: Tensor | None  # log pi_old; None: the single update's own log-probs are used (detached)
    ref_logps: Tensor | None  # log pi_ref; None without a KL term
    scores: Tensor  # [B] R(x, y)
    components: dict[str, Tensor]  # each reward component's raw score [B]
    kl: Tensor  # k1 per token (0 without a reference)
    rewards: Tensor  # per-token rewards r_t


def require_dropout_off(run: Any, algorithm: str) -> None:
    """Refuse ``model.disable_dropout: false``: an online update compares the policy with its old self and its
    reference token by token (the ratio is 1 and the KL 0 at the start only without dropout noise)."""
    check(run.model.disable_dropout, "model.disable_dropout", run.model.disable_dropout,
          f"{algorithm} compares the policy with its old self and its reference token by token; dropout must be off")


def minibatches(rows: int, epochs: int, num_minibatches: int, device: Any, shuffle: bool = True) -> Iterator[Tensor]:
    """Row indices of each optimizer update of one rollout of ``rows`` rows: ``epochs`` passes over
    ``num_minibatches`` minibatches, the rows shuffled at the start of each pass unless ``shuffle`` is False."""
    for _ in range(epochs):
        order = torch.randperm(rows, device=device) if shuffle else torch.arange(rows, device=device)
        yield from order.tensor_split(num_minibatches)


class OnlineAlgorithm(Algorithm):
    """collect -> score -> advantages -> update; subclasses choose names in their Config or override a stage."""

    kind = "prompts"
    Config = OnlineConfig
    accumulates_in_step = True  # one rollout per step; each update's minibatch is split into G micro-batches
    kl_knob = "kl_coef"  # the Config field the benchmark sweeps for its reward-vs-KL frontier

    @classmethod
    def check_run(cls, run: Any) -> None:
        require_dropout_off(run, cls.registry_name)
        cfg, rows = run.algorithm, run.train.batch_size * run.algorithm.num_samples
        check(cfg.num_minibatches <= rows, "algorithm.num_minibatches", cfg.num_minibatches,
              f"must be <= train.batch_size x num_samples ({rows})")
        minibatch, accumulation = rows // cfg.num_minibatches, run.train.gradient_accumulation_steps
        check(accumulation <= minibatch, "train.gradient_accumulation_steps", accumulation,
              f"must be <= the rows of a minibatch (train.batch_size x num_samples // num_minibatches = {minibatch})"
              ": each minibatch is split into that many micro-batches")

    def build(self) -> None:
        cfg = self.config
        self.check_run(self.run)
        lm = load_causal_lm(self.run.model)  # dropout off: check_run
        self.model = TokenScorer(lm)
        self.reference = None
        if needs_separate_reference(lm) or cfg.reference:  # also for the eval KL when beta = 0
            ref_cfg = replace(self.run.model, lora=LoraConfig(), load_in_4bit=False, gradient_checkpointing=False)
            self.reference = TokenScorer(load_causal_lm(ref_cfg, path=cfg.reference, trainable=False))

    def setup(self, accelerator: Any, loaders: dict[str, Any]) -> None:
        super().setup(accelerator, loaders)
        self.reward = CompositeReward(self.config.rewards, self.tokenizer, accelerator.device)

    @property
    def policy(self) -> torch.nn.Module:
        """The plain transformers / peft policy (generation and the reference run on it, outside DDP)."""
        return self.unwrapped.lm

    @property
    def single_update(self) -> bool:
        return self.config.epochs == 1 and self.config.num_minibatches == 1

    # ------------------------------------------------------------------------------------------ stages
    def collect(self, batch: PromptBatch) -> Rollout:
        return generate(self.policy, self.tokenizer, batch, self.config.generation, self.config.num_samples)

    def response_logps(self, scorer: torch.nn.Module, rollout: Rollout, rows: Tensor | None = None,
                       with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Log-probs (and entropies) [b, Tr] of the response tokens of ``rows`` (all: None) under ``scorer``; the
        samples of one prompt share its forward when ``prefix_sharing`` is on and the model supports it."""
        sequences, attention_mask, score_mask = rollout_inputs(rollout)
        group = rollout.group
        if rows is not None:
            sequences, attention_mask, score_mask = sequences[rows], attention_mask[rows], score_mask[rows]
            group = None if group is None else group[rows]
        group = group if self.config.prefix_sharing and supports(self.policy) else None
        logps, entropy = grouped_token_logps(scorer, sequences, attention_mask, score_mask, group,
                                             self.config.generation.logprob_temperature, with_entropy)
        width = rollout.prompt_ids.shape[1]
        return logps[:, width:], None if entropy is None else entropy[:, width:]

    def reference_logps(self, rollout: Rollout) -> Tensor:
        """log pi_ref of the response tokens [B, Tr] (``reference_forward``: the policy's precision, no gradient)."""
        return self.response_logps(self.reference_forward, rollout)[0]

    @torch.no_grad()
    def score(self, rollout: Rollout) -> Scored:
        cfg = self.config
        mask = rollout.response_mask.float()
        old_logps = ref_logps = None
        kl = torch.zeros_like(mask)
        if not self.single_update or cfg.kl_coef > 0:
            old_logps = self.response_logps(self.model, rollout)[0]
        if cfg.kl_coef > 0:
            ref_logps = self.reference_logps(rollout)
            kl = (old_logps - ref_logps) * mask
        scores, components = self.reward(rollout)
        rewards = kl_shaped_rewards(scores, kl, mask, cfg.kl_coef if cfg.kl_in == "reward" else 0.0)
        return Scored(rollout, mask, None if self.single_update else old_logps, ref_logps, scores, components, kl,
                      rewards)

    def advantages(self, scored: Scored) -> Tensor:
        inputs = AdvantageInputs(scored.rewards, scored.mask, scored.rollout.group)
        advantages, _ = ADVANTAGES.get(self.config.advantage)(inputs, self.config)
        return advantages

    def update(self, scored: Scored, advantages: Tensor, metrics: dict[str, float]) -> Iterator[LossOutput]:
        """``epochs`` x ``num_minibatches`` updates; each minibatch is split into G micro-batches whose losses
        (each a share of the minibatch's loss, times G since accelerate divides by G) add up to its loss."""
        cfg, rollout, accumulation = self.config, scored.rollout, self.accumulation
        rows, device = rollout.response_ids.shape[0], rollout.response_ids.device
        loss_fn = POLICY_LOSSES.get(cfg.loss_type)
        tokens_per_update = float(scored.mask.sum()) / cfg.num_minibatches
        for minibatch in minibatches(rows, cfg.epochs, cfg.num_minibatches, device, shuffle=cfg.num_minibatches > 1):
            update_tokens = float(scored.mask[minibatch].sum())
            for idx in minibatch.tensor_split(accumulation):  # its micro-batches
                logps, entropy = self.response_logps(self.model, rollout, idx, with_entropy=True)
                mask = scored.mask[idx]
                old = logps.detach() if scored.old_logps is None else scored.old_logps[idx]
                ref = None if scored.ref_logps is None else scored.ref_logps[idx]
                inputs = PolicyLossInputs(logps, old, advantages[idx], mask, ref, tokens_per_update,
                                          cfg.generation.max_new_tokens, len(minibatch), update_tokens)
                policy_loss, loss_metrics = loss_fn(inputs, cfg)
                loss = policy_loss - cfg.entropy_coef * (entropy * mask).sum() / max(update_tokens, 1.0)
                step_metrics = {"loss/policy": accumulation * float(policy_loss.detach()),
                                "entropy": float(masked_mean(entropy.detach(), mask)),
                                **{k: float(v) for k, v in loss_metrics.items()}}
                tokens = int(rollout.prompt_mask[idx].sum() + rollout.response_mask[idx].sum())
                yield LossOutput(accumulation * loss, {**metrics, **step_metrics}, tokens)
                metrics = {}

    def rollout_metrics(self, scored: Scored) -> dict[str, float]:
        kl = scored.kl.sum(-1)
        penalty = (self.config.kl_coef if self.config.kl_in == "reward" else 0.0) * kl
        rollout = scored.rollout
        return {**{f"reward/{name}": float(v.mean()) for name, v in scored.components.items()},
                "reward/score": float(scored.scores.mean()), "reward/kl_penalty": float(penalty.mean()),
                "reward/total": float((scored.scores - penalty).mean()), "kl": float(kl.mean()),
                "response_length": float(scored.mask.sum(-1).mean()),
                "perf/gen_s": rollout.seconds, "perf/gen_tokens_per_s": rollout.tokens_per_s}

    # ------------------------------------------------------------------------------------------ training
    def step(self, batch: PromptBatch) -> Iterator[LossOutput]:
        rollout = self.collect(batch)
        start = time.perf_counter()
        scored = self.score(rollout)
        advantages = self.advantages(scored)
        metrics = {**self.rollout_metrics(scored), "perf/score_s": time.perf_counter() - start}
        yield from self.update(scored, advantages, metrics)

    @torch.no_grad()
    def evaluate(self, batch: PromptBatch) -> dict[str, float]:
        """Sums over one seeded response per prompt: each reward component, reward/score, kl, response_length."""
        rollout = generate(self.policy, self.tokenizer, batch, self.config.generation, seed=self.run.train.seed)
        scores, components = self.reward(rollout)
        mask = rollout.response_mask.float()
        out = {**{f"reward/{name}": float(v.sum()) for name, v in components.items()},
               "reward/score": float(scores.sum()), "response_length": float(mask.sum()),
               "count": float(len(rollout.responses))}
        out["kl"] = float(((rollout.logprobs - self.reference_logps(rollout)) * mask).sum())
        return out
