"""``OnlineConfig``: the knobs of the online skeleton (prefopt.rl.algorithm), shared by every online algorithm.

An algorithm's Config subclasses it with its own defaults (GRPO, RLOO, REINFORCE++), pins the fields it fixes with
``field(init=False)`` (PPO, A2C) and adds its own. Every field carries a one-line docstring (``prefopt list``
shows them); combinations that would train silently wrong are refused here, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.config import MAX_COEF, TOO_STRONG, check
from prefopt.registry import ADVANTAGES, POLICY_LOSSES
from prefopt.rl.advantages import requirements
from prefopt.rl.engine import GenerationConfig
from prefopt.rl.rewards import RewardSpec


@dataclass
class OnlineConfig:
    """The online skeleton's knobs: sampling, the estimator and loss by name, the update's shape, evaluation."""

    rewards: list[RewardSpec] = field(default_factory=list)
    """Reward components and weights (prefopt.rl.rewards), e.g. [{name: target_token}] or a reward_model."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling: max_new_tokens, temperature, top_p, top_k, do_sample (prefopt.rl.engine)."""
    num_samples: int = 4
    """G: responses sampled per prompt (a group); train.batch_size counts prompts."""
    advantage: str = "grpo"
    """Advantage estimator by name (prefopt.rl.advantages): grpo, rloo, reinforce_pp, reinforce_pp_baseline, mc;
    gae, nstep (critic)."""
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
    """Policy loss by name (prefopt.rl.losses): grpo, bnpo, token_mean, dapo, dr_grpo, sequence."""
    importance_sampling: Literal["token", "sequence"] = "token"
    """token: one ratio per token; sequence: GSPO's one ratio per response, exp(mean_t log pi/pi_old) on its tokens
    (GSPO's objective with loss_type grpo; a token-sum loss, bnpo / dapo / dr_grpo / token_mean, weights each response
    by its length, as TRL warns)."""
    top_entropy_quantile: float = 1.0
    """Train the policy term on the tokens whose entropy is in the top q of the micro-batch's (all processes; Wang
    et al. 2025, "Beyond the 80/20 rule"; TRL's top_entropy_quantile); 1.0: every token."""
    mask_truncated_completions: bool = False
    """Leave responses cut at max_new_tokens (no EOS) out of the loss (DAPO's overlong filtering); they still count
    in the advantages' baselines."""
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
    """Reference policy path; default: the starting model. A full-weights copy is loaded only when read: beta > 0,
    or this set (then evaluation reports eval/kl also at beta 0); with LoRA it is the base, adapter off."""
    eval_num_samples: int = 1
    """k: responses sampled per held-out prompt at evaluation; k > 1 also logs mean@k and pass@k."""
    eval_pass_threshold: float = 1.0
    """pass@k: a prompt passes when one of its k responses scores at least this (a verifiable reward's full marks)."""
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
        needs_groups, _, scales = requirements(self.advantage)
        check(not needs_groups or self.num_samples >= 2, "algorithm.num_samples", self.num_samples,
              f"advantage={self.advantage} compares the samples of a prompt; needs >= 2")
        check(self.scale_rewards in scales, "algorithm.scale_rewards", self.scale_rewards,
              f"advantage={self.advantage} takes {' or '.join(scales)}")
        check(self.loss_type != "sequence" or self.kl_in != "loss" or self.kl_coef == 0, "algorithm.kl_in",
              self.kl_in, "loss_type=sequence has no k3 KL loss term; use kl_in=reward or a token-level loss_type")
        check(self.loss_type != "sequence" or self.importance_sampling == "token", "algorithm.importance_sampling",
              self.importance_sampling, "loss_type=sequence has one (summed) ratio per row already")
        check(0 < self.top_entropy_quantile <= 1, "algorithm.top_entropy_quantile", self.top_entropy_quantile,
              "must be in (0, 1]")
        check(self.loss_type != "sequence" or self.top_entropy_quantile == 1, "algorithm.top_entropy_quantile",
              self.top_entropy_quantile, "loss_type=sequence has one term per response, no token to mask; use a "
              "token-level loss_type")
        check(self.eval_num_samples >= 1, "algorithm.eval_num_samples", self.eval_num_samples, "must be >= 1")
        check(self.generation.do_sample or self.num_samples == 1, "algorithm.generation.do_sample", False,
              f"greedy decoding gives the {self.num_samples} samples of a prompt one response (every group "
              "advantage 0); sample, or set algorithm.num_samples: 1")
        check(self.generation.do_sample or self.eval_num_samples == 1, "algorithm.generation.do_sample", False,
              f"greedy decoding gives the eval_num_samples={self.eval_num_samples} samples of a prompt one response")
