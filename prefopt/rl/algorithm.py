"""``OnlineAlgorithm``: the skeleton of the online methods (critic-free ones, and PPO with its critic), one batch of
prompts per Trainer step:

    collect     G responses per prompt with the shared engine (prefopt.rl.engine), each row tagged with its prompt;
    score       the sequence reward R (prefopt.rl.rewards components), the policy's log-probs at sampling time (and
                its critic's values, ``uses_critic``) and the reference's, the per-token KL (``token_kl``) and the
                per-token rewards r_t (KL shaping with beta = ``kl_coef`` when ``kl_in="reward"``);
    advantages  the estimator named by ``config.advantage`` (prefopt.rl.advantages), fed the critic's values when
                there are any, whitened over the rollout's response tokens when ``whiten_advantages``; its returns
                (the value targets) are kept in ``Scored.returns``;
    update      ``epochs`` passes over ``num_minibatches`` shuffled minibatches, each ONE optimizer update, split into
                ``train.gradient_accumulation_steps`` micro-batches; ``loss`` gives each micro-batch's share of the
                update's loss: by default its forward and ``policy_loss``, the loss named by ``config.loss_type``
                (prefopt.rl.losses) - entropy_coef * mean entropy.

Each stage is a method a subclass may override; a new critic-free method is usually only a ``Config`` with other
defaults (see README, "Add an online algorithm"). PPO (prefopt.algorithms.ppo) overrides ``build`` (its critic),
``score`` (adaptive beta, KL estimator, reward whitening), ``loss`` (adds the clipped
value loss and PPO-ptx to ``policy_loss``) and ``rollout_metrics``; Sparrow's A2C (prefopt.algorithms.a2c) overrides
``collect`` (generation keeps its shared trunk's features), ``score`` (every top and head on them), ``loss`` and
``rollout_metrics``. With one epoch of one minibatch the sampling policy IS the policy being updated, so the update's own
log-probs (detached) are the old ones and no extra forward is run for them (as TRL does); otherwise they are
computed once, before the first update.

Metrics (the same names for every online algorithm; ``eval/`` ones are per-response means on held-out prompts):
    reward/score       mean R(x, y) (the weighted sum of the reward components; each is also reward/<component>)
    reward/kl_penalty  mean beta * KL(x, y) per response (0 when the KL is a loss term or beta = 0)
    reward/total       reward/score - reward/kl_penalty (what the policy is optimised for when the KL is a reward)
    kl                 mean sum_t (log pi - log pi_ref)(y_t) per response, at sampling time (only with a reference
                       in training, i.e. beta > 0; from the update's own log-probs when ``kl_from_update``)
    entropy            mean per-token entropy of the policy on its samples
    response_length    mean response tokens (EOS included)
    clip_fraction      share of tokens (rows for sequence losses) where the ratio clip binds
    loss/policy, loss/kl (the k3 loss term, when ``kl_in="loss"``), perf/gen_s, perf/gen_tokens_per_s, perf/score_s
    (the scoring stage: rewards, old and reference log-probs), perf/update_s and perf/train_tokens_per_s (the update
    phase of the PREVIOUS step, backward and optimizer steps included; logged with the next step)
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
from prefopt.config import MAX_COEF, TOO_STRONG, LoraConfig, check
from prefopt.functional import masked_mean, masked_whiten
from prefopt.models import load_causal_lm, needs_separate_reference
from prefopt.prefix import supports
from prefopt.registry import ADVANTAGES, POLICY_LOSSES
from prefopt.rl.advantages import AdvantageInputs
from prefopt.rl.engine import GenerationConfig, generate, rollout_inputs
from prefopt.rl.kl import kl_penalty, kl_shaped_rewards
from prefopt.rl.losses import PolicyLossInputs
from prefopt.rl.rewards import CompositeReward, RewardSpec
from prefopt.scoring import TokenScorer, grouped_token_logps
from prefopt.types import LossOutput, PromptBatch, Rollout


GROUP_ADVANTAGES = ("grpo", "rloo")  # estimators whose baseline is the other samples of the prompt


@dataclass
class OnlineConfig:
    rewards: list[RewardSpec] = field(default_factory=list)
    """Reward components and weights (prefopt.rl.rewards), e.g. [{name: target_token}] or a reward_model."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling: max_new_tokens, temperature, top_p, top_k, do_sample (prefopt.rl.engine)."""
    num_samples: int = 4
    """G: responses sampled per prompt (a group); train.batch_size counts prompts."""
    advantage: str = "grpo"
    """Advantage estimator by name (prefopt.rl.advantages): grpo, rloo, reinforce_pp, mc; gae, nstep (critic)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo: divide group-centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO); rloo: none or
    batch (normalise over the batch, TRL's RLOOTrainer normalize_advantages; rloo has no group std)."""
    gamma: float = 1.0
    """Discount per token (reinforce_pp, mc, gae)."""
    lam: float = 0.95
    """GAE lambda."""
    n_step: int = 0
    """n of the n-step returns (advantage=nstep); 0: Monte-Carlo returns to the end of the response."""
    whiten_advantages: bool = False
    """Normalise the estimator's advantages to mean 0, std 1 over the response tokens of the rollout (PPO, A2C)."""
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
        check(self.kl_coef <= MAX_COEF, "algorithm.kl_coef", self.kl_coef, TOO_STRONG)
        check(self.epochs >= 1, "algorithm.epochs", self.epochs, "must be >= 1")
        check(self.num_minibatches >= 1, "algorithm.num_minibatches", self.num_minibatches, "must be >= 1")
        check(self.n_step >= 0, "algorithm.n_step", self.n_step, "must be >= 0")
        check(self.advantage not in GROUP_ADVANTAGES or self.num_samples >= 2, "algorithm.num_samples",
              self.num_samples, f"advantage={self.advantage} compares the samples of a prompt; needs >= 2")
        check(self.advantage != "rloo" or self.scale_rewards != "group", "algorithm.scale_rewards",
              self.scale_rewards, "advantage=rloo takes none or batch (TRL's RLOOTrainer normalize_advantages)")
        check(self.loss_type != "sequence" or self.kl_in != "loss" or self.kl_coef == 0, "algorithm.kl_in",
              self.kl_in, "loss_type=sequence has no k3 KL loss term; use kl_in=reward or a token-level loss_type")


@dataclass
class Scored:
    """A rollout with everything the advantages and the update need; per-token tensors are [B, Tr]."""

    rollout: Rollout
    mask: Tensor  # 1 on response tokens
    old_logps: Tensor | None  # log pi_old; None: the single update's own log-probs are used (detached)
    ref_logps: Tensor | None  # log pi_ref; None without a KL term
    scores: Tensor  # [B] R(x, y)
    components: dict[str, Tensor]  # each reward component's raw score [B]
    kl: Tensor  # per-token KL estimate (``token_kl``; 0 without a reference or when ``kl_from_update``)
    rewards: Tensor  # per-token rewards r_t
    kl_coef: float = 0.0  # beta of the KL shaping in ``rewards`` (0: the KL is not a reward term)
    values: Tensor | None = None  # V(s_t) of the critic at scoring time (``uses_critic``)
    returns: Tensor | None = None  # the estimator's returns (value targets), set by ``advantages``


@dataclass
class MicroBatch:
    """One micro-batch of an update: its rows of the rollout, its place among the update's micro-batches, and the
    size of the update (the denominators that make the micro-batches' losses add up to the update's loss)."""

    rows: Tensor  # row indices into the rollout
    part: int  # 0 .. train.gradient_accumulation_steps - 1
    update_rows: int  # rows of the update (its minibatch)
    update_tokens: float  # response tokens of the update
    tokens_per_update: float  # response tokens of the rollout / num_minibatches


def require_dropout_off(run: Any, algorithm: str) -> None:
    """Refuse ``model.disable_dropout: false``: an online update compares the policy with its old self and its
    reference token by token (the ratio is 1 and the KL 0 at the start only without dropout noise)."""
    check(run.model.disable_dropout, "model.disable_dropout", run.model.disable_dropout,
          f"{algorithm} compares the policy with its old self and its reference token by token; dropout must be off")


def minibatches(rows: int, epochs: int, num_minibatches: int, device: Any, shuffle: bool = True,
                group: Tensor | None = None) -> Iterator[Tensor]:
    """Row indices of each optimizer update of one rollout of ``rows`` rows: ``epochs`` passes over
    ``num_minibatches`` minibatches, the rows shuffled at the start of each pass unless ``shuffle`` is False.
    With ``group`` (the prompt of each row) whole groups are shuffled and a group's rows stay next to each other, so
    the G samples of a prompt share a minibatch (and their prompt's forward) where the group count allows."""
    positions = torch.arange(rows, device=device)
    for _ in range(epochs):
        if not shuffle:
            order = positions
        elif group is None:
            order = torch.randperm(rows, device=device)
        else:
            ids, inverse = torch.unique(group, return_inverse=True)
            place = torch.randperm(len(ids), device=device)[inverse]  # each row's group's place in the pass
            order = torch.argsort(place * rows + positions)
        # a short last batch of an epoch can hold fewer rows than minibatches: no empty update
        yield from (minibatch for minibatch in order.tensor_split(num_minibatches) if len(minibatch))


class OnlineAlgorithm(Algorithm):
    """collect -> score -> advantages -> update; subclasses choose names in their Config or override a stage."""

    kind = "prompts"
    Config = OnlineConfig
    accumulates_in_step = True  # one rollout per step; each update's minibatch is split into micro-batches
    kl_knob = "kl_coef"  # the Config field the benchmark sweeps for its reward-vs-KL frontier
    uses_critic = False  # True: self.model also returns values V(s_t) (a scoring.PolicyAndValue with a critic)

    @classmethod
    def check_run(cls, run: Any) -> None:
        require_dropout_off(run, cls.registry_name)
        cfg, rows = run.algorithm, run.train.batch_size * run.algorithm.num_samples
        critic = cls.uses_critic or cls.score is not OnlineAlgorithm.score  # an own ``score`` brings its values
        check(critic or cfg.advantage not in ("gae", "nstep"), "algorithm.advantage", cfg.advantage,
              f"needs a critic's values; {cls.registry_name} has none (use grpo, rloo, reinforce_pp or mc)")
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
        rewards = self.config.rewards  # none: a subclass scores with its own terms (A2C's reward heads)
        self.reward = CompositeReward(rewards, self.tokenizer, accelerator.device) if rewards else None
        self.pending: dict[str, float] = {}  # the previous update's timing, logged with the next step

    @property
    def policy(self) -> torch.nn.Module:
        """The plain transformers / peft policy (generation and the reference run on it, outside DDP)."""
        return self.unwrapped.lm

    @property
    def single_update(self) -> bool:
        return self.config.epochs == 1 and self.config.num_minibatches == 1

    @property
    def kl_from_update(self) -> bool:
        """The ``kl`` metric comes from the single update's own log-probs (the sampling policy's): with the KL a
        loss term and no critic, ``score`` needs no policy forward of its own (TRL logs its KL the same way)."""
        return self.single_update and not self.uses_critic and self.config.kl_in == "loss"

    @property
    def kl_coef(self) -> float:
        """beta of the rollout being scored: ``config.kl_coef`` (PPO: its adaptive controller's value)."""
        return self.config.kl_coef

    @property
    def entropy_mode(self) -> bool | str:
        """``with_entropy`` of the update's forward: with its graph only when the entropy bonus is on (otherwise
        the entropies are a metric, computed detached: no extra [tokens, vocab] tensor kept until the backward)."""
        return True if self.config.entropy_coef > 0 else "detached"

    # ------------------------------------------------------------------------------------------ stages
    def collect(self, batch: PromptBatch) -> Rollout:
        return generate(self.policy, self.tokenizer, batch, self.config.generation, self.config.num_samples)

    def response_logps(self, scorer: Any, rollout: Rollout, rows: Tensor | None = None,
                       with_entropy: bool | str = False, **kwargs: Any) -> tuple[Tensor | None, ...]:
        """Log-probs (and entropies) [b, Tr] of the response tokens of ``rows`` (all: None) under ``scorer``, and its
        values when it has a critic (a ``PolicyAndValue``; ``kwargs`` go to the scorer); the samples of one prompt
        share its forward when ``prefix_sharing`` is on and the model supports it."""
        sequences, attention_mask, score_mask = rollout_inputs(rollout)
        group = rollout.group
        if rows is not None:
            sequences, attention_mask, score_mask = sequences[rows], attention_mask[rows], score_mask[rows]
            group = None if group is None else group[rows]
        group = group if self.config.prefix_sharing and supports(self.policy) else None
        outputs = grouped_token_logps(scorer, sequences, attention_mask, score_mask, group,
                                      self.config.generation.logprob_temperature, with_entropy, **kwargs)
        width = rollout.prompt_ids.shape[1]
        return tuple(None if out is None else out[:, width:] for out in outputs)

    def reference_logps(self, rollout: Rollout) -> Tensor:
        """log pi_ref of the response tokens [B, Tr] (``reference_forward``: the policy's precision, no gradient)."""
        return self.response_logps(self.reference_forward, rollout)[0]

    def token_kl(self, logps: Tensor, ref_logps: Tensor) -> Tensor:
        """Per-token estimate of KL(pi || pi_ref) at the sampled tokens: k1 = log pi - log pi_ref."""
        return kl_penalty(logps, ref_logps, "k1")

    @torch.no_grad()
    def score(self, rollout: Rollout) -> Scored:
        cfg = self.config
        mask = rollout.response_mask.float()
        old_logps = ref_logps = values = None
        kl = torch.zeros_like(mask)
        kl_coef = self.kl_coef
        if not self.single_update or self.uses_critic or (kl_coef > 0 and not self.kl_from_update):
            old_logps, _, *critic = self.response_logps(self.model, rollout)
            values = critic[0] if critic else None
        if kl_coef > 0:
            ref_logps = self.reference_logps(rollout)
            if old_logps is not None:  # else the update logs the KL (``kl_from_update``)
                kl = self.token_kl(old_logps, ref_logps) * mask
        scores, components = self.reward(rollout)
        shaping = kl_coef if cfg.kl_in == "reward" else 0.0
        rewards = kl_shaped_rewards(scores, kl, mask, shaping)
        return Scored(rollout, mask, None if self.single_update else old_logps, ref_logps, scores, components, kl,
                      rewards, shaping, values)

    def advantages(self, scored: Scored) -> Tensor:
        inputs = AdvantageInputs(scored.rewards, scored.mask, scored.rollout.group, scored.values)
        advantages, scored.returns = ADVANTAGES.get(self.config.advantage)(inputs, self.config)
        return masked_whiten(advantages, scored.mask) if self.config.whiten_advantages else advantages

    def update(self, scored: Scored, advantages: Tensor, metrics: dict[str, float]) -> Iterator[LossOutput]:
        """``epochs`` x ``num_minibatches`` updates; each minibatch is split into train.gradient_accumulation_steps
        micro-batches whose losses (``loss``: each a share of the minibatch's loss, times gradient_accumulation_steps
        since accelerate divides by it) add up to its loss."""
        cfg, rollout, accumulation = self.config, scored.rollout, self.accumulation
        rows, device = rollout.response_ids.shape[0], rollout.response_ids.device
        tokens_per_update = float(scored.mask.sum()) / cfg.num_minibatches
        group = rollout.group if cfg.num_samples > 1 else None  # several samples per prompt: keep them together
        for minibatch in minibatches(rows, cfg.epochs, cfg.num_minibatches, device, cfg.num_minibatches > 1, group):
            update_tokens = float(scored.mask[minibatch].sum())
            for part, idx in enumerate(minibatch.tensor_split(accumulation)):  # its micro-batches
                micro = MicroBatch(idx, part, len(minibatch), update_tokens, tokens_per_update)
                loss, step_metrics = self.loss(scored, advantages, micro)
                tokens = int(rollout.prompt_mask[idx].sum() + rollout.response_mask[idx].sum())
                yield LossOutput(accumulation * loss, {**metrics, **step_metrics}, tokens)
                metrics = {}

    def loss(self, scored: Scored, advantages: Tensor, micro: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's share of its update's loss, and its metrics: the policy's forward, ``policy_loss``."""
        logps, entropy = self.response_logps(self.model, scored.rollout, micro.rows,
                                             with_entropy=self.entropy_mode)[:2]
        return self.policy_loss(logps, entropy, scored, advantages, micro)

    def old_logps(self, scored: Scored, logps: Tensor, micro: MicroBatch) -> Tensor:
        """log pi_old of the micro-batch: the update's own log-probs (detached) when it is the only update."""
        return logps.detach() if scored.old_logps is None else scored.old_logps[micro.rows]

    def policy_loss(self, logps: Tensor, entropy: Tensor, scored: Scored, advantages: Tensor,
                    micro: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        """The loss named by ``config.loss_type`` - entropy_coef * the update's mean entropy, on the micro-batch's
        log-probs and entropies [b, Tr] (each a share of the update's value)."""
        cfg, rows = self.config, micro.rows
        mask = scored.mask[rows]
        ref = None if scored.ref_logps is None else scored.ref_logps[rows]
        inputs = PolicyLossInputs(logps, self.old_logps(scored, logps, micro), advantages[rows], mask, ref,
                                  micro.tokens_per_update, cfg.generation.max_new_tokens, micro.update_rows,
                                  micro.update_tokens)
        policy_loss, loss_metrics = POLICY_LOSSES.get(cfg.loss_type)(inputs, cfg)
        loss = policy_loss - cfg.entropy_coef * (entropy * mask).sum() / max(micro.update_tokens, 1.0)
        metrics = {"loss/policy": self.accumulation * float(policy_loss.detach()),
                   "entropy": float(masked_mean(entropy.detach(), mask)),
                   **{k: float(v) for k, v in loss_metrics.items()}}
        if ref is not None and self.kl_from_update:  # the sampling policy's KL, as ``rollout_metrics`` would log it
            metrics["kl"] = float((self.token_kl(logps.detach(), ref) * mask).sum(-1).mean())
        return loss, metrics

    def rollout_metrics(self, scored: Scored) -> dict[str, float]:
        kl = scored.kl.sum(-1)
        penalty = scored.kl_coef * kl
        rollout = scored.rollout
        metrics = {**{f"reward/{name}": float(v.mean()) for name, v in scored.components.items()},
                   "reward/score": float(scored.scores.mean()), "reward/kl_penalty": float(penalty.mean()),
                   "reward/total": float((scored.scores - penalty).mean()),
                   "response_length": float(scored.mask.sum(-1).mean()),
                   "perf/gen_s": rollout.seconds, "perf/gen_tokens_per_s": rollout.tokens_per_s}
        if scored.ref_logps is not None and not self.kl_from_update:  # no reference, no KL (not a logged 0)
            metrics["kl"] = float(kl.mean())
        return metrics

    # ------------------------------------------------------------------------------------------ training
    def step(self, batch: PromptBatch) -> Iterator[LossOutput]:
        rollout = self.collect(batch)
        start = time.perf_counter()
        scored = self.score(rollout)
        advantages = self.advantages(scored)
        metrics = {**self.rollout_metrics(scored), "perf/score_s": time.perf_counter() - start, **self.pending}
        start, tokens = time.perf_counter(), 0
        for out in self.update(scored, advantages, metrics):
            tokens += out.num_tokens
            yield out
        update_s = time.perf_counter() - start  # includes the Trainer's backward and optimizer steps
        self.pending = {"perf/update_s": update_s, "perf/train_tokens_per_s": tokens / max(update_s, 1e-9)}

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
