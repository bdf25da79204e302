"""``OnlineAlgorithm``: the skeleton of the online methods (critic-free ones, and PPO with its critic), one FULL batch
of train.batch_size prompts per Trainer step (``full_batches``: an epoch's short last batch is left out, so no
minibatch or micro-batch is ever empty):

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

Every batch-level statistic is the global batch's, over all processes (``total``: a sum over processes): the
estimators' batch means and stds, advantage (and PPO's reward) whitening, the token counts of an update (each
process divides by its share, since DDP averages the processes' gradients) and the top-entropy quantile.

Each stage is a method a subclass may override; a new critic-free method is usually only a ``Config`` with other
defaults (see README, "Add an online algorithm"). PPO (prefopt.algorithms.ppo) overrides ``build`` (its critic),
``score`` (adaptive beta, KL estimator, reward whitening), ``loss`` (adds the clipped
value loss and PPO-ptx to ``policy_loss``) and ``rollout_metrics``; Sparrow's A2C (prefopt.algorithms.a2c) overrides
``collect`` (generation keeps its shared trunk's features), ``score`` (every top and head on them), ``loss`` and
``rollout_metrics``. With one epoch of one minibatch the sampling policy IS the policy being updated, so the update's own
log-probs (detached) are the old ones and no extra forward is run for them (as TRL does); otherwise they are
computed once, before the first update.

Metrics (the same names for every online algorithm; ``eval/`` ones are per-prompt means over its
``eval_num_samples`` responses on held-out prompts, plus reward/mean@k and reward/pass@k when k > 1):
    reward/score       mean R(x, y) (the weighted sum of the reward components; each is also reward/<component>)
    reward/kl_penalty  mean beta * KL(x, y) per response (0 when the KL is a loss term or beta = 0)
    reward/total       reward/score - reward/kl_penalty (what the policy is optimised for when the KL is a reward)
    kl                 mean sum_t (log pi - log pi_ref)(y_t) per response, at sampling time (only with a reference
                       in training, i.e. beta > 0; from the update's own log-probs when ``kl_from_update``)
    entropy            mean per-token entropy of the policy on its samples
    response_length    mean response tokens (EOS included)
    truncated_fraction share of responses cut at max_new_tokens (no EOS)
    frac_reward_zero_std  share of prompts whose G samples all scored the same (no group signal; G > 1)
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
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.algorithm import Algorithm
from prefopt.config import LoraConfig, check
from prefopt.distributed import gather_over_processes, total_over_processes
from prefopt.functional import masked_mean
from prefopt.models import load_causal_lm, needs_separate_reference
from prefopt.prefix import supports
from prefopt.registry import ADVANTAGES, POLICY_LOSSES
from prefopt.rl.advantages import AdvantageInputs, batch_whiten, group_mean, requirements
from prefopt.rl.batches import MicroBatch, Scored, minibatches
from prefopt.rl.config import OnlineConfig
from prefopt.rl.engine import generate, rollout_inputs
from prefopt.rl.kl import kl_penalty, kl_shaped_rewards
from prefopt.rl.losses import PolicyLossInputs
from prefopt.rl.rewards import CompositeReward
from prefopt.scoring import TokenScorer, grouped_token_logps
from prefopt.types import LossOutput, PromptBatch, Rollout

__all__ = ["MicroBatch", "OnlineAlgorithm", "OnlineConfig", "Scored", "minibatches"]


def require_dropout_off(run: Any, algorithm: str) -> None:
    """Refuse ``model.disable_dropout: false`` and a LoRA adapter with dropout: an online update compares the policy
    with its old self and its reference token by token (the ratio is 1 and the KL 0 at the start only without
    dropout noise; the adapter's own dropout, ``model.lora.dropout``, would stay on after the model's is off)."""
    why = f"{algorithm} compares the policy with its old self and its reference token by token; dropout must be off"
    check(run.model.disable_dropout, "model.disable_dropout", run.model.disable_dropout, why)
    check(run.model.lora.r == 0 or run.model.lora.dropout == 0, "model.lora.dropout", run.model.lora.dropout, why)


class OnlineAlgorithm(Algorithm):
    """collect -> score -> advantages -> update; subclasses choose names in their Config or override a stage."""

    kind = "prompts"
    Config = OnlineConfig
    accumulates_in_step = True  # one rollout per step; each update's minibatch is split into micro-batches
    kl_knob = "kl_coef"  # the Config field the benchmark sweeps for its reward-vs-KL frontier
    uses_critic = False  # True: self.model also returns values V(s_t) (a scoring.PolicyAndValue with a critic)
    full_batches = True  # every rollout answers train.batch_size prompts: no minibatch or micro-batch is ever empty

    @classmethod
    def check_run(cls, run: Any) -> None:
        require_dropout_off(run, cls.registry_name)
        cfg, rows = run.algorithm, run.train.batch_size * run.algorithm.num_samples
        critic = cls.uses_critic or cls.score is not OnlineAlgorithm.score  # an own ``score`` brings its values
        check(critic or not requirements(cfg.advantage)[1], "algorithm.advantage", cfg.advantage,
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
        if (needs_separate_reference(lm) and cfg.kl_coef > 0) or cfg.reference:  # a copy only when it is read
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
    def has_reference(self) -> bool:
        """A reference policy can be scored: a loaded copy, or the LoRA policy's base (its adapter off)."""
        return self.reference is not None or not needs_separate_reference(self.policy)

    @property
    def critic(self) -> nn.Module | None:
        """The critic's own parameters (PPO, A2C: trained at ``config.critic_learning_rate``); None without one."""
        return None

    @property
    def updates_per_step(self) -> int:
        return self.config.epochs * self.config.num_minibatches

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The critic's parameters in a group of their own at ``config.critic_learning_rate`` when it is set."""
        if self.critic is None or self.config.critic_learning_rate is None:  # every Config with a critic has it
            return super().parameter_groups()
        lr = self.config.critic_learning_rate
        critic = {id(p) for p in self.critic.parameters()}
        trained = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": [p for p in trained if id(p) not in critic]},
                {"params": [p for p in trained if id(p) in critic], "lr": lr}]

    def total(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over every process (itself with one): the global batch's sums and counts."""
        return total_over_processes(self.accelerator, tensor)

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

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
                                      self.config.generation.logprob_temperature, with_entropy,
                                      lm=self.policy, **kwargs)
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
                      rewards, shaping, values, loss_mask=self.loss_mask(rollout, mask))

    def loss_mask(self, rollout: Rollout, mask: Tensor) -> Tensor:
        """The response tokens the update trains on: all, or those of responses that ended with EOS
        (``mask_truncated_completions``)."""
        return mask * rollout.ended[:, None].to(mask.dtype) if self.config.mask_truncated_completions else mask

    def advantages(self, scored: Scored) -> Tensor:
        inputs = AdvantageInputs(scored.rewards, scored.mask, scored.rollout.group, scored.values, scored.scores,
                                 self.total)
        advantages, scored.returns = ADVANTAGES.get(self.config.advantage)(inputs, self.config)
        return batch_whiten(advantages, scored.mask, self.total) if self.config.whiten_advantages else advantages

    def update_sizes(self, scored: Scored, updates: list[Tensor]) -> tuple[float, list[float]]:
        """(tokens of the rollout / num_minibatches, the tokens of each update) trained on, over ALL processes,
        divided by the number of processes (the per-process share DDP's gradient average expects); one collective."""
        mask = scored.loss_mask
        local = torch.stack([mask.sum(), *(mask[rows].sum() for rows in updates)]).double()
        counts = (self.total(local) / self.num_processes).tolist()
        return counts[0] / self.config.num_minibatches, counts[1:]

    def update(self, scored: Scored, advantages: Tensor, metrics: dict[str, float]) -> Iterator[LossOutput]:
        """``epochs`` x ``num_minibatches`` updates; each minibatch is split into train.gradient_accumulation_steps
        micro-batches whose losses (``loss``: each a share of the minibatch's loss, times gradient_accumulation_steps
        since accelerate divides by it) add up to its loss."""
        cfg, rollout, accumulation = self.config, scored.rollout, self.accumulation
        rows, device = rollout.response_ids.shape[0], rollout.response_ids.device
        group = rollout.group if cfg.num_samples > 1 else None  # several samples per prompt: keep them together
        updates = list(minibatches(rows, cfg.epochs, cfg.num_minibatches, device, cfg.num_minibatches > 1, group))
        tokens_per_update, update_tokens = self.update_sizes(scored, updates)
        for minibatch, tokens_of_update in zip(updates, update_tokens):
            for part, idx in enumerate(minibatch.tensor_split(accumulation)):  # its micro-batches, none empty
                micro = MicroBatch(idx, part, len(minibatch), tokens_of_update, tokens_per_update, accumulation)
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
        mask = scored.loss_mask[rows]
        ref = None if scored.ref_logps is None else scored.ref_logps[rows]
        inputs = PolicyLossInputs(logps, self.old_logps(scored, logps, micro), advantages[rows], mask, ref,
                                  micro.tokens_per_update, cfg.generation.max_new_tokens, micro.update_rows,
                                  micro.update_tokens, micro.micro_batches, self.high_entropy(entropy, mask))
        policy_loss, loss_metrics = POLICY_LOSSES.get(cfg.loss_type)(inputs, cfg)
        loss = policy_loss - cfg.entropy_coef * (entropy * mask).sum() / max(micro.update_tokens, 1.0)
        metrics = {"loss/policy": self.accumulation * float(policy_loss.detach()),
                   "entropy": float(masked_mean(entropy.detach(), mask)),
                   **{k: float(v) for k, v in loss_metrics.items()}}
        if ref is not None and self.kl_from_update:  # the sampling policy's KL, as ``rollout_metrics`` would log it
            metrics["kl"] = float((self.token_kl(logps.detach(), ref) * scored.mask[rows]).sum(-1).mean())
        return loss, metrics

    def high_entropy(self, entropy: Tensor, mask: Tensor) -> Tensor | None:
        """1 on the micro-batch's tokens whose entropy reaches the (1 - ``top_entropy_quantile``) quantile of the
        entropies of every process's micro-batch (TRL's get_high_entropy_mask); None when the quantile is 1."""
        quantile = self.config.top_entropy_quantile
        if quantile >= 1.0:
            return None
        entropy = entropy.detach().float()
        values = gather_over_processes(self.accelerator, entropy[mask.bool()])
        if values.numel() == 0:
            return torch.zeros_like(mask)
        threshold = torch.quantile(values, 1 - quantile)
        return ((entropy * mask >= threshold) & mask.bool()).to(mask.dtype)

    def rollout_metrics(self, scored: Scored) -> dict[str, float]:
        kl = scored.kl.sum(-1)
        penalty = scored.kl_coef * kl
        rollout = scored.rollout
        metrics = {**{f"reward/{name}": float(v.nanmean()) for name, v in scored.components.items()},  # None: NaN
                   "reward/score": float(scored.scores.mean()), "reward/kl_penalty": float(penalty.mean()),
                   "reward/total": float((scored.scores - penalty).mean()),
                   "response_length": float(scored.mask.sum(-1).mean()),
                   "truncated_fraction": float(1 - rollout.ended.float().mean()),
                   "perf/gen_s": rollout.seconds, "perf/gen_tokens_per_s": rollout.tokens_per_s}
        if self.config.num_samples > 1 and rollout.group is not None:  # groups whose samples all score the same
            scores = scored.scores.double()
            spread, _ = group_mean((scores - group_mean(scores, rollout.group)[0]) ** 2, rollout.group)
            metrics["frac_reward_zero_std"] = float(torch.isclose(spread.sqrt(), torch.zeros_like(spread)).double()
                                                    .mean())
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
        """Sums over the prompts of the means over k = ``eval_num_samples`` seeded responses per prompt: each reward
        component, reward/score, response_length and, with a reference (``has_reference``), kl: the policy's and the
        reference's log-probs from the same forward at the run's precision (not the sampler's, which runs outside
        the autocast). k > 1 adds reward/mean@k (= reward/score) and reward/pass@k: the share of prompts with a
        response scoring at least ``eval_pass_threshold``."""
        cfg, k = self.config, self.config.eval_num_samples
        rollout = generate(self.policy, self.tokenizer, batch, cfg.generation, k, seed=self.run.train.seed)
        scores, components = self.reward(rollout)
        mask = rollout.response_mask.float()

        def per_prompt(values: Tensor) -> float:  # rows i*k .. i*k + k - 1 answer prompt i; None-scored rows: NaN
            return float(values.float().view(-1, k).nanmean(-1).nansum())

        out = {**{f"reward/{name}": per_prompt(v) for name, v in components.items()},
               "reward/score": per_prompt(scores), "response_length": per_prompt(mask.sum(-1)),
               "count": float(batch.input_ids.shape[0])}
        if k > 1:
            out[f"reward/mean@{k}"] = out["reward/score"]
            out[f"reward/pass@{k}"] = float((scores.view(-1, k) >= cfg.eval_pass_threshold).any(-1).sum())
        if self.has_reference:
            logps = self.response_logps(self.model, rollout)[0]
            out["kl"] = per_prompt(((logps - self.reference_logps(rollout)) * mask).sum(-1))
        return out
