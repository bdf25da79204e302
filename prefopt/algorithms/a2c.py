"""A2C as in Sparrow (Glaese et al. 2022, arXiv 2209.14375; its RL set-up follows GopherCite, Menick et al. 2022).

Advantage actor-critic on a policy whose bottom blocks are a frozen trunk SHARED by the policy, the frozen
reference, the value head and the reward heads (prefopt.sparrow): per batch of prompts, one rollout is sampled and
ONE update is made (no importance ratio, no clipping). The trunk runs once per token, inside generation: its
output at every position is kept (``prefopt.rl.engine.generate(capture=...)``) and every top and head reads it, so
scoring and the update run no trunk pass at all. The stages are those of ``prefopt.rl.algorithm.OnlineAlgorithm``.

Per response y = (y_1 .. y_n) of prompt x, with state s_t = (x, y_<t):

    R(x, y)  = w_pm r_pm(x, y) + sum_k w_k P(rule k not violated | x, y) + sum_j w_j c_j(x, y)
    r_t      = -beta (log pi(y_t|s_t) - log pi_0(y_t|s_t)) + [t = n] R(x, y)    (kl_in="reward", PPO-style)
    G_t      = GAE(gamma, lambda) targets  or  n-step returns sum_{l<n} gamma^l r_{t+l} + gamma^n V(s_{t+n})
    A_t      = G_t - V(s_t)          (whitened over the batch when whiten_advantages)
    L        = -mean_t A_t log pi(y_t|s_t)  +  c_v 0.5 mean_t (V(s_t) - G_t)^2  -  c_H mean_t H[pi(.|s_t)]
               (+ beta mean_t k3(pi, pi_0) when kl_in="loss", where the KL is a loss term instead of a reward)

r_pm is the preference-model head (trained on the shared trunk with the reward stage's K-wise loss and its
centering regulariser), rule terms come from the rule head (learned rules) or from programmatic rules, and c_j
are the pluggable components of prefopt.rl.rewards (length penalty, format validity, task rewards, ...). Each term
is logged as ``reward/<name>``. The reward heads are trained in ``setup`` (or loaded from ``reward_heads``) and
frozen before the first update. Without a ratio the gradient is unbiased only on-policy, which one update per
rollout keeps (``logprob_gap`` logs the recomputed-vs-behaviour log-prob difference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from prefopt.algorithms.sparrow_heads import (HEADS_FILE, heads_state, load_heads, sort_rules,
                                              train_preference_head, train_rule_head)
from prefopt.config import check
from prefopt.functional import masked_mean
from prefopt.models import load_causal_lm
from prefopt.registry import register_algorithm
from prefopt.rl.advantages import explained_variance
from prefopt.rl.algorithm import MicroBatch, OnlineAlgorithm, OnlineConfig, Scored
from prefopt.rl.engine import generate, rollout_inputs
from prefopt.rl.kl import kl_penalty, kl_shaped_rewards
from prefopt.rules import RuleHead, programmatic_ok
from prefopt.samples import note_rewards
from prefopt.sparrow import PreferenceHead, SparrowActorCritic, TrunkOutput, ValueMLP, ValueTop, split_model
from prefopt.types import PromptBatch, Rollout

@dataclass
class A2CConfig(OnlineConfig):
    """The skeleton's knobs with A2C's defaults, A2C's own below; the fields ``init=False`` are fixed by A2C."""

    renamed_keys: ClassVar[dict[str, str]] = {"ent_coef": "entropy_coef", "kl_mode": "kl_in"}  # as the online core

    num_samples: int = field(default=1, init=False)
    """One response per prompt (A2C's baseline is its critic, not a group)."""
    advantage: Literal["gae", "nstep"] = "gae"
    """Return/advantage estimator: GAE(gamma, lam), or n-step returns bootstrapped from V (n_step)."""
    scale_rewards: Literal["group", "batch", "none"] = field(default="none", init=False)
    """Unused by gae and nstep."""
    loss_type: str = field(default="token_mean", init=False)
    """Unused: A2C's loss is its own (``a2c_objective``: no ratio, no clipping)."""
    epsilon: float = field(default=0.2, init=False)
    """Unused: no ratio to clip."""
    epsilon_high: float | None = field(default=None, init=False)
    """Unused: no ratio to clip."""
    importance_sampling: Literal["token", "sequence"] = field(default="token", init=False)
    """Unused: no ratio."""
    top_entropy_quantile: float = field(default=1.0, init=False)
    """Unused: A2C's loss is its own (every token)."""
    eval_num_samples: int = field(default=1, init=False)
    """A2C evaluates one response per prompt (its own ``evaluate``)."""
    eval_pass_threshold: float = field(default=1.0, init=False)
    """Unused: one response per prompt."""
    kl_coef: float = 0.05
    """beta: KL(pi || pi_0) penalty to the initial policy."""
    kl_in: Literal["reward", "loss"] = "reward"
    """reward: -beta * (log pi - log pi_0) per token in the reward (as PPO); loss: beta * k3 KL as a loss term."""
    kl_ratio_correction: bool = field(default=False, init=False)
    """Unused: on-policy, the ratio is 1."""
    epochs: int = field(default=1, init=False)
    """ONE update per rollout: without a ratio the gradient is unbiased only on-policy."""
    num_minibatches: int = field(default=1, init=False)
    """The one update takes the whole rollout."""
    reference: str | None = field(default=None, init=False)
    """pi_0 is the starting model's top on the shared trunk (prefopt.sparrow)."""
    prefix_sharing: bool = field(default=False, init=False)
    """Scoring reads the trunk features captured in generation (no shared-prefix layout)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the response tokens of the batch."""
    trainable_layers: int = 2
    """N: the top N transformer blocks (+ final norm, LM head) train; embeddings + the other blocks are the trunk."""
    train_lm_head: bool = True
    """Train the LM head (a tied head is untied: the policy gets its own copy); False keeps it frozen."""
    value_head: Literal["mlp", "blocks"] = "mlp"
    """Value function: an MLP on the trunk features, or a copy of the top blocks + a scalar head."""
    value_width: int = 0
    """Hidden width of the value MLP (0: the model width)."""
    vf_coef: float = 0.5
    """Weight c_v of the value loss 0.5 (V - G)^2."""
    critic_learning_rate: float | None = None
    """Learning rate of the value function (its own optimizer group, on the same schedule); default:
    train.learning_rate."""
    preference_weight: float = 1.0
    """Weight of the preference-model head's score (0: no preference head)."""
    preference_data: str | None = None
    """Preference data (pairs or rankings) for the preference head; default: data.path."""
    preference_steps: int = 200
    """Batches the preference head trains on before RL (ignored when reward_heads is given)."""
    center_coef: float = 0.01
    """Centering regulariser c * mean((r_w + r_l)^2) of the preference head's loss."""
    rules: dict[str, float] = field(default_factory=lambda: {"no_new_human_turn": 1.0, "no_url": 1.0})
    """Rule name -> weight of P(rule not violated); rules with rows in rule_data use the rule head, others
    must be programmatic (prefopt.rules.RULES)."""
    rule_data: str | None = None
    """.jsonl rows {text, rule, violated} for the rule head (None: every rule is programmatic)."""
    rule_steps: int = 200
    """Batches the rule head trains on before RL (ignored when reward_heads is given)."""
    head_lr: float = 1e-3
    """AdamW learning rate of the preference and rule heads."""
    head_batch_size: int = 8
    """Rows per batch when training the reward heads."""
    reward_heads: str | None = None
    """A sparrow_heads.pt saved by an earlier a2c run (or its directory): load the reward heads, do not train."""

    def reward_terms(self) -> dict[str, float]:
        """The weight of every term of R(x, y) (prefopt.preflight refuses a run whose weights are all zero)."""
        return {"preference": self.preference_weight, **{f"rule/{k}": w for k, w in self.rules.items()},
                **{spec.name: spec.weight for spec in self.rewards}}

    def __post_init__(self):
        super().__post_init__()
        check(self.trainable_layers >= 1, "algorithm.trainable_layers", self.trainable_layers, "must be >= 1")
        check(self.value_width >= 0, "algorithm.value_width", self.value_width, "must be >= 0")
        check(self.n_step >= 0, "algorithm.n_step", self.n_step, "must be >= 0")
        for key in ("vf_coef", "preference_weight", "center_coef", "head_lr"):
            check(getattr(self, key) >= 0, f"algorithm.{key}", getattr(self, key), "must be >= 0")
        check(self.critic_learning_rate is None or self.critic_learning_rate >= 0, "algorithm.critic_learning_rate",
              self.critic_learning_rate, "must be >= 0")
        check(self.head_batch_size > 0, "algorithm.head_batch_size", self.head_batch_size, "must be > 0")
        for key in ("preference_steps", "rule_steps"):
            check(getattr(self, key) >= 0, f"algorithm.{key}", getattr(self, key), "must be >= 0")
        check(self.preference_steps > 0 or self.preference_weight == 0 or self.reward_heads is not None,
              "algorithm.preference_steps", self.preference_steps,
              "must be > 0 while the preference head is used (preference_weight > 0) and not loaded (reward_heads)")


def a2c_objective(logps: Tensor, values: Tensor, entropy: Tensor, ref_logps: Tensor, advantages: Tensor,
                  returns: Tensor, mask: Tensor, cfg: A2CConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """L of the module docstring (token means over ``mask``) given the targets; -> (loss, its terms)."""
    policy_loss = -masked_mean(advantages * logps, mask)
    value_loss = 0.5 * masked_mean((values - returns) ** 2, mask)
    mean_entropy = masked_mean(entropy, mask)
    loss = policy_loss + cfg.vf_coef * value_loss - cfg.entropy_coef * mean_entropy
    if cfg.kl_in == "loss":
        loss = loss + cfg.kl_coef * masked_mean(kl_penalty(logps, ref_logps, "k3"), mask)
    return loss, {"loss/policy": policy_loss.detach(), "loss/value": value_loss.detach(),
                  "entropy": mean_entropy.detach()}


@dataclass
class TrunkScored(Scored):
    """A2C's scored rollout: the shared trunk features and the trained module's forward on them ([B, Tr] each)."""

    features: TrunkOutput | None = None  # of the sampled sequences (captured while generating)
    forward: tuple[Tensor, Tensor, Tensor] | None = None  # (log-probs, entropies, values); with its graph when the
    # update is one micro-batch (its loss reuses it), else without (the targets; each micro-batch runs again)


@register_algorithm("a2c")
class A2C(OnlineAlgorithm):
    """Sparrow-style A2C: shared frozen trunk, one update per rollout, rule + preference reward heads.

    The stages of ``OnlineAlgorithm``: collect (generation, keeping the trunk features it computes), score (every
    top and head on those features: log-probs, values, reference log-probs, R(x, y), KL-shaped rewards),
    the skeleton's advantages (gae or nstep, whitened) and update (ONE update: one epoch of one minibatch, in
    train.gradient_accumulation_steps micro-batches) with A2C's ``loss``.
    """

    Config = A2CConfig

    @classmethod
    def check_run(cls, run: Any) -> None:
        check(run.model.lora.r == 0, "model.lora.r", run.model.lora.r,
              "a2c trains the top blocks in full on a frozen shared trunk (no LoRA or 4-bit); set model.lora.r=0")
        super().check_run(run)  # dropout off; accumulation <= the rows of the one update (its micro-batches)

    # ------------------------------------------------------------------ build, setup
    def build(self) -> None:
        cfg, model_cfg = self.config, self.run.model
        self.check_run(self.run)
        split = split_model(load_causal_lm(model_cfg), cfg.trainable_layers, cfg.train_lm_head)
        self.lm, self.trunk, self.reference = split.lm, split.trunk, split.reference
        width = split.hidden_size
        value = (ValueMLP(width, cfg.value_width or width) if cfg.value_head == "mlp"
                 else ValueTop(split.copy_top(trainable=True), width))
        self.model = SparrowActorCritic(split.policy, value)
        self.preference_head = PreferenceHead(split.copy_top(), width) if cfg.preference_weight > 0 else None
        self.saved_heads = load_heads(cfg.reward_heads, cfg.trainable_layers)
        self.learned_rules, self.programmatic_rules = sort_rules(cfg.rules, self.saved_heads, cfg.rule_data)
        saved_rules = self.saved_heads is not None and self.learned_rules
        head_rules = self.saved_heads["rule_names"] if saved_rules else self.learned_rules
        self.rule_head = RuleHead(split.copy_top(), width, head_rules) if self.learned_rules else None
        for head in (self.preference_head, self.rule_head):
            if head is not None:
                head.requires_grad_(False).eval()
        self.head_report: dict[str, Any] = {}
        self.reward = None  # the further reward components (setup: the skeleton's CompositeReward, if any)

    def setup(self, accelerator: Any, loaders: dict[str, Any]) -> None:
        """Move the frozen parts; load the reward heads, or train them on the trunk (``sparrow_heads``)."""
        super().setup(accelerator, loaders)  # self.reward: the further components, None without any
        if self.saved_heads is not None:
            for name, head in (("preference", self.preference_head), ("rules", self.rule_head)):
                if head is not None:
                    head.load_state_dict(self.saved_heads[name])
            return
        if self.preference_head is not None:
            self.head_report["preference"] = train_preference_head(self.trunk, self.preference_head, self.run,
                                                                   self.tokenizer, self.device)
        if self.rule_head is not None:
            self.head_report["rules"] = train_rule_head(self.trunk, self.rule_head, self.run, self.tokenizer,
                                                        self.learned_rules, self.device)
        out_dir = Path(self.run.train.output_dir)
        if self.head_report and (accelerator is None or accelerator.is_main_process):
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "reward_heads.json").write_text(json.dumps(self.head_report, indent=2))

    @property
    def policy(self) -> torch.nn.Module:
        return self.lm

    @property
    def critic(self) -> torch.nn.Module:
        return self.unwrapped.value

    # ------------------------------------------------------------------ stages
    def collect(self, batch: PromptBatch, seed: int | None = None) -> Rollout:
        """One response per prompt from the full policy model (KV cache on; ``seed`` fixes the draw); the trunk's
        output at every position, computed on the way, is kept (``rollout.hidden``) for the tops and heads."""
        capture = self.trunk.blocks[-1] if len(self.trunk.blocks) else None
        return generate(self.lm, self.tokenizer, batch, self.config.generation, seed=seed, capture=capture)

    def features(self, rollout: Rollout) -> TrunkOutput:
        """The trunk features of the sampled sequences: those captured in generation (no trunk forward), else (a
        trunk of no blocks, or a rollout generated elsewhere) one trunk pass. The features take the captured states
        over: a rollout kept for samples.jsonl does not hold them."""
        sequences, attention_mask, _ = rollout_inputs(rollout)
        hidden = getattr(rollout, "hidden", None)
        if hidden is None:
            return self.trunk(sequences, attention_mask)
        rollout.hidden = None
        return self.trunk.as_features(hidden, attention_mask)

    def policy_forward(self, features: TrunkOutput, rollout: Rollout,
                       rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(log-probs, entropies, values) [B, Tr] of the trained module on the features of ``rows`` (default all)."""
        sequences, _, score_mask = rollout_inputs(rollout)
        if rows is not None:
            features, sequences, score_mask = features.select(rows), sequences[rows], score_mask[rows]
        out = self.model(features, sequences, score_mask, self.config.generation.logprob_temperature)
        return tuple(value[:, rollout.prompt_ids.shape[1]:] for value in out)

    @torch.no_grad()
    def score_terms(self, features: TrunkOutput, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """R(x, y) [B] and each weighted term's raw value {name: [B]}, from heads on the shared features."""
        total = torch.zeros(rollout.response_ids.shape[0], device=features.hidden.device)
        parts: dict[str, Tensor] = {}
        if self.preference_head is not None:
            parts["preference"] = self.preference_head(features)
            total = total + self.config.preference_weight * parts["preference"]
        if self.rule_head is not None:
            p_ok = dict(zip(self.rule_head.names, self.rule_head.p_not_violated(features).unbind(-1)))
            parts.update({f"rule/{name}": p_ok[name] for name in self.learned_rules})
        ok = programmatic_ok(self.programmatic_rules, rollout.prompts, rollout.responses, total.device)
        parts.update({f"rule/{name}": value for name, value in ok.items()})
        for name, weight in self.config.rules.items():
            total = total + weight * parts[f"rule/{name}"]
        if self.reward is not None:
            extra, components = self.reward(rollout)
            total = total + extra
            parts.update(components)
        note_rewards(rollout, total, parts)  # samples.jsonl: the heads' parts too
        return total, parts

    def score(self, rollout: Rollout) -> TrunkScored:
        """Every top and head on the shared features: the trained module's log-probs, entropies and values (with
        their graph when the update is one micro-batch), the reference's log-probs, R(x, y), KL-shaped rewards."""
        cfg = self.config
        features = self.features(rollout)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.accumulation == 1):
            forward = self.policy_forward(features, rollout)
        sequences, _, score_mask = rollout_inputs(rollout)
        ref_logps, _ = self.reference_forward(features, sequences, score_mask, cfg.generation.logprob_temperature,
                                              with_entropy=False)
        ref_logps = ref_logps[:, rollout.prompt_ids.shape[1]:]
        scores, parts = self.score_terms(features, rollout)
        mask = rollout.response_mask.float()
        kl = self.token_kl(forward[0].detach(), ref_logps) * mask
        shaping = self.kl_coef if cfg.kl_in == "reward" else 0.0
        rewards = kl_shaped_rewards(scores, kl, mask, shaping)
        return TrunkScored(rollout=rollout, mask=mask, old_logps=None, ref_logps=ref_logps, scores=scores,
                           components=parts, kl=kl, rewards=rewards, kl_coef=shaping, values=forward[2].detach(),
                           loss_mask=self.loss_mask(rollout, mask), features=features, forward=forward)

    def loss(self, scored: TrunkScored, advantages: Tensor, micro: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        """The micro-batch's share of the ONE update's loss L (its share of the response tokens) and of its terms.
        One micro-batch: L on the score stage's forward (its graph kept). G > 1: the trained module runs again on
        the micro-batch's features (the advantages were whitened over the whole rollout)."""
        rows, mask = micro.rows, scored.loss_mask[micro.rows]
        if len(rows) == scored.mask.shape[0]:
            logps, entropy, values = scored.forward
        else:
            logps, entropy, values = self.policy_forward(scored.features, scored.rollout, rows)
        loss, terms = a2c_objective(logps, values, entropy, scored.ref_logps[rows], advantages[rows],
                                    scored.returns[rows], mask, self.config)
        share = mask.sum() / max(micro.update_tokens, 1.0)
        # the Trainer averages over the G micro-batches: G x each share of a term adds up to the update's term
        return share * loss, {k: self.accumulation * float(share * v) for k, v in terms.items()}

    def rollout_metrics(self, scored: TrunkScored) -> dict[str, float]:
        """The skeleton's, with the critic's fit and the behaviour-vs-recomputed log-prob gap (once per rollout)."""
        mask = scored.mask
        gap = (scored.forward[0].detach() - scored.rollout.logprobs).abs()
        return {**super().rollout_metrics(scored), "values/mean": float(masked_mean(scored.values, mask)),
                "returns/mean": float(masked_mean(scored.returns, mask)),
                "explained_variance": explained_variance(scored.values, scored.returns, mask),
                "logprob_gap": float(masked_mean(gap, mask))}

    @torch.no_grad()
    def evaluate(self, batch: PromptBatch) -> dict[str, float]:
        """Sums over one response per prompt, drawn with train.seed as the skeleton's evaluation draws it."""
        scored = self.score(self.collect(batch, seed=self.run.train.seed))
        sums = {"reward/score": scored.scores.sum(), "kl": scored.kl.sum(), "response_length": scored.mask.sum(),
                **{f"reward/{k}": v.nansum() for k, v in scored.components.items()}}
        return {**{k: float(v) for k, v in sums.items()}, "count": float(len(scored.rollout.responses))}

    # ------------------------------------------------------------------ save
    @property
    def exported_model(self) -> torch.nn.Module:
        return self.lm  # the policy as a plain transformers model; the heads' file is beside it

    def save(self, out_dir: str | Path) -> None:
        """The policy as a plain transformers model (trunk + trained top), plus the value and reward heads."""
        out_dir = Path(out_dir)
        self.lm.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        torch.save(heads_state(self.config.trainable_layers, self.unwrapped.value, self.preference_head,
                               self.rule_head), out_dir / HEADS_FILE)
