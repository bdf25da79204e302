"""A2C as in Sparrow (Glaese et al. 2022, arXiv 2209.14375; its RL set-up follows GopherCite, Menick et al. 2022).

Advantage actor-critic on a policy whose bottom blocks are a frozen trunk SHARED by the policy, the frozen
reference, the value head and the reward heads (prefopt.sparrow): per batch of prompts, one rollout is sampled,
the trunk runs ONCE on the sampled sequences, and ONE update is made (no importance ratio, no clipping).

Per response y = (y_1 .. y_n) of prompt x, with state s_t = (x, y_<t):

    R(x, y)  = w_pm r_pm(x, y) + sum_k w_k P(rule k not violated | x, y) + sum_j w_j c_j(x, y)
    r_t      = -beta (log pi(y_t|s_t) - log pi_0(y_t|s_t)) + [t = n] R(x, y)    (kl_mode="reward", PPO-style)
    G_t      = GAE(gamma, lambda) targets  or  n-step returns sum_{l<n} gamma^l r_{t+l} + gamma^n V(s_{t+n})
    A_t      = G_t - V(s_t)          (whitened over the batch when whiten_advantages)
    L        = -mean_t A_t log pi(y_t|s_t)  +  c_v 0.5 mean_t (V(s_t) - G_t)^2  -  c_H mean_t H[pi(.|s_t)]
               (+ beta mean_t k3(pi, pi_0) when kl_mode="loss", where the KL is a loss term instead of a reward)

r_pm is the preference-model head (trained on the shared trunk with the reward stage's K-wise loss and its
centering regulariser), rule terms come from the rule head (learned rules) or from programmatic rules, and c_j
are the pluggable components of prefopt.rl.rewards (length penalty, format validity, task rewards, ...). Each term
is logged as ``reward/<name>``. The reward heads are trained in ``setup`` (or loaded from ``reward_heads``) and
frozen before the first update. Without a ratio the gradient is unbiased only on-policy, which one update per
rollout keeps (``logprob_gap`` logs the recomputed-vs-behaviour log-prob difference).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from prefopt.algorithm import Algorithm
from prefopt.algorithms.reward import ranking_loss
from prefopt.config import check
from prefopt.errors import ConfigError, PrefoptError
from prefopt.functional import kl_penalty, masked_mean, masked_whiten
from prefopt.models import load_causal_lm
from prefopt.registry import ADVANTAGES, register_algorithm
from prefopt.rl.rewards import CompositeReward, RewardSpec
from prefopt.rl.advantages import AdvantageInputs, explained_variance
from prefopt.rl.algorithm import require_dropout_off
from prefopt.rl.engine import GenerationConfig, generate, rollout_inputs
from prefopt.rl.kl import kl_shaped_rewards
from prefopt.rules import RULES, RuleHead, programmatic_ok, read_rule_rows, rule_batches, rule_loss
from prefopt.samples import note_rewards
from prefopt.sparrow import (PreferenceHead, SparrowActorCritic, TrunkOutput, ValueMLP, ValueTop, fit_head,
                             split_model)
from prefopt.types import LossOutput, PromptBatch, Rollout

log = logging.getLogger("prefopt.a2c")
HEADS_FILE = "sparrow_heads.pt"


@dataclass
class A2CConfig:
    trainable_layers: int = 2
    """N: the top N transformer blocks (+ final norm, LM head) train; embeddings + the other blocks are the trunk."""
    train_lm_head: bool = True
    """Train the LM head (a tied head is untied: the policy gets its own copy); False keeps it frozen."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling of the rollouts (max_new_tokens, temperature, top_p, top_k, do_sample)."""
    value_head: Literal["mlp", "blocks"] = "mlp"
    """Value function: an MLP on the trunk features, or a copy of the top blocks + a scalar head."""
    value_width: int = 0
    """Hidden width of the value MLP (0: the model width)."""
    advantage: Literal["gae", "nstep"] = "gae"
    """Return/advantage estimator: GAE(gamma, lam), or n-step returns bootstrapped from V (n_step)."""
    gamma: float = 1.0
    """Discount per token."""
    lam: float = 0.95
    """GAE lambda (advantage=gae)."""
    n_step: int = 0
    """n of the n-step returns (advantage=nstep); 0: Monte-Carlo returns to the end of the response."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the response tokens of the batch."""
    vf_coef: float = 0.5
    """Weight c_v of the value loss 0.5 (V - G)^2."""
    ent_coef: float = 0.0
    """Weight c_H of the entropy bonus."""
    kl_coef: float = 0.05
    """beta: KL(pi || pi_0) penalty to the initial policy."""
    kl_mode: Literal["reward", "loss"] = "reward"
    """reward: -beta * (log pi - log pi_0) per token in the reward (as PPO); loss: beta * k3 KL as a loss term."""
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
    rewards: list[RewardSpec] = field(default_factory=list)
    """Further reward components (prefopt.rl.rewards: length_penalty, format_validity, callable, target_token, ...)."""
    reward_heads: str | None = None
    """A sparrow_heads.pt saved by an earlier a2c run (or its directory): load the reward heads, do not train."""

    def reward_terms(self) -> dict[str, float]:
        """The weight of every term of R(x, y) (prefopt.preflight refuses a run whose weights are all zero)."""
        return {"preference": self.preference_weight, **{f"rule/{k}": w for k, w in self.rules.items()},
                **{spec.name: spec.weight for spec in self.rewards}}

    def __post_init__(self):
        check(self.trainable_layers >= 1, "algorithm.trainable_layers", self.trainable_layers, "must be >= 1")
        check(self.value_width >= 0, "algorithm.value_width", self.value_width, "must be >= 0")
        check(0 <= self.gamma <= 1, "algorithm.gamma", self.gamma, "must be in [0, 1]")
        check(0 <= self.lam <= 1, "algorithm.lam", self.lam, "must be in [0, 1]")
        check(self.n_step >= 0, "algorithm.n_step", self.n_step, "must be >= 0")
        for key in ("vf_coef", "ent_coef", "kl_coef", "preference_weight", "center_coef", "head_lr"):
            check(getattr(self, key) >= 0, f"algorithm.{key}", getattr(self, key), "must be >= 0")
        check(self.head_batch_size > 0, "algorithm.head_batch_size", self.head_batch_size, "must be > 0")


def a2c_targets(logps: Tensor, values: Tensor, ref_logps: Tensor, scores: Tensor, mask: Tensor,
                cfg: A2CConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(advantages, returns, per-token k1 KL) [B, T] from detached log-probs, values and reference log-probs [B, T]
    and scores [B]; advantages are whitened over all rows given."""
    kl = (logps - ref_logps) * mask
    rewards = kl_shaped_rewards(scores, kl, mask, cfg.kl_coef if cfg.kl_mode == "reward" else 0.0)
    group = torch.arange(rewards.shape[0], device=rewards.device)
    advantages, returns = ADVANTAGES.get(cfg.advantage)(AdvantageInputs(rewards, mask, group, values), cfg)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns, kl


def a2c_objective(logps: Tensor, values: Tensor, entropy: Tensor, ref_logps: Tensor, advantages: Tensor,
                  returns: Tensor, mask: Tensor, cfg: A2CConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """L of the module docstring (token means over ``mask``) given the targets; -> (loss, its terms)."""
    policy_loss = -masked_mean(advantages * logps, mask)
    value_loss = 0.5 * masked_mean((values - returns) ** 2, mask)
    mean_entropy = masked_mean(entropy, mask)
    loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * mean_entropy
    if cfg.kl_mode == "loss":
        loss = loss + cfg.kl_coef * masked_mean(kl_penalty(logps, ref_logps, "k3"), mask)
    return loss, {"loss/policy": policy_loss.detach(), "loss/value": value_loss.detach(),
                  "entropy": mean_entropy.detach()}


def a2c_loss(logps: Tensor, values: Tensor, entropy: Tensor, ref_logps: Tensor, scores: Tensor, mask: Tensor,
             cfg: A2CConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The A2C loss of the module docstring on response-aligned tensors [B, T] (``scores`` [B]).

    ``logps``, ``values`` and ``entropy`` carry the graph; ``ref_logps`` and ``scores`` do not.
    """
    mask = mask.float()
    old_values = values.detach()
    advantages, returns, kl = a2c_targets(logps.detach(), old_values, ref_logps, scores, mask, cfg)
    loss, metrics = a2c_objective(logps, values, entropy, ref_logps, advantages, returns, mask, cfg)
    kl_per_sequence = kl.sum(-1)
    penalty = (cfg.kl_coef if cfg.kl_mode == "reward" else 0.0) * kl_per_sequence
    metrics.update({"kl": kl_per_sequence.mean(), "reward/score": scores.mean(), "reward/kl_penalty": penalty.mean(),
                    "reward/total": (scores - penalty).mean(),
                    "values/mean": masked_mean(old_values, mask), "returns/mean": masked_mean(returns, mask),
                    "explained_variance": torch.tensor(explained_variance(old_values, returns, mask)),
                    "response_length": mask.sum(-1).mean()})
    return loss, metrics


@register_algorithm("a2c")
class A2C(Algorithm):
    """Sparrow-style A2C: shared frozen trunk, one update per rollout, rule + preference reward heads."""

    kind = "prompts"
    kl_knob = "kl_coef"  # the Config field the benchmark sweeps for its reward-vs-KL frontier
    Config = A2CConfig
    accumulates_in_step = True

    @classmethod
    def check_run(cls, run: Any) -> None:
        check(run.model.lora.r == 0, "model.lora.r", run.model.lora.r,
              "a2c trains the top blocks in full on a frozen shared trunk (no LoRA or 4-bit); set model.lora.r=0")
        require_dropout_off(run, "a2c")

    # ------------------------------------------------------------------ build
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
        self.learned_rules, self.programmatic_rules = self._sort_rules()
        saved = self._saved_heads()
        head_rules = saved["rule_names"] if saved is not None and self.learned_rules else self.learned_rules
        self.rule_head = RuleHead(split.copy_top(), width, head_rules) if self.learned_rules else None
        for head in (self.preference_head, self.rule_head):
            if head is not None:
                head.requires_grad_(False).eval()
        self.composite: CompositeReward | None = None
        self.head_report: dict[str, Any] = {}

    def _sort_rules(self) -> tuple[list[str], list[str]]:
        """(learned rules: those with rows in rule_data or in the saved heads, programmatic rules)."""
        labelled: set[str] = set()
        saved = self._saved_heads()
        if saved is not None:
            labelled = set(saved.get("rule_names", []))
        elif self.config.rule_data:
            labelled = {row["rule"] for row in read_rule_rows(self.config.rule_data)}
        learned = [name for name in self.config.rules if name in labelled]
        programmatic = [name for name in self.config.rules if name not in labelled]
        unknown = [name for name in programmatic if name not in RULES]
        if unknown:
            raise ConfigError(f"algorithm.rules: {unknown} have no rows in algorithm.rule_data and no programmatic "
                              f"rule; programmatic rules: {', '.join(RULES.available())}")
        return learned, programmatic

    def _saved_heads(self) -> dict[str, Any] | None:
        if not self.config.reward_heads:
            return None
        if not hasattr(self, "_saved"):
            path = Path(self.config.reward_heads)
            path = path / HEADS_FILE if path.is_dir() else path
            if not path.is_file():
                raise ConfigError(f"algorithm.reward_heads={str(path)!r}: file not found")
            self._saved = torch.load(path, map_location="cpu", weights_only=True)
            if self._saved.get("trainable_layers") != self.config.trainable_layers:
                raise ConfigError(f"algorithm.reward_heads were trained with trainable_layers="
                                  f"{self._saved.get('trainable_layers')}, not {self.config.trainable_layers}")
        return self._saved

    # ------------------------------------------------------------------ setup: reward heads on the trunk
    def setup(self, accelerator: Any, loaders: dict[str, Any]) -> None:
        super().setup(accelerator, loaders)
        check(self.accumulation <= self.run.train.batch_size, "train.gradient_accumulation_steps", self.accumulation,
              f"must be <= train.batch_size ({self.run.train.batch_size}): each rollout is split into that many "
              "micro-batches")
        if self.config.rewards:
            self.composite = CompositeReward(self.config.rewards, self.tokenizer, self.device)
        saved = self._saved_heads()
        if saved is not None:
            for name, head in (("preference", self.preference_head), ("rules", self.rule_head)):
                if head is not None:
                    head.load_state_dict(saved[name])
            return
        if self.preference_head is not None:
            self.head_report["preference"] = self.train_preference_head()
        if self.rule_head is not None:
            self.head_report["rules"] = self.train_rule_head()
        out_dir = Path(self.run.train.output_dir)
        if self.head_report and (accelerator is None or accelerator.is_main_process):
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "reward_heads.json").write_text(json.dumps(self.head_report, indent=2))

    def train_preference_head(self) -> dict[str, float]:
        """Fit the preference head with the reward stage's K-wise loss + centering; report held-out accuracy."""
        from prefopt.data import build_dataloader, load_rows

        data_cfg = self.run.data
        if self.config.preference_data:
            data_cfg = dataclasses.replace(data_cfg, path=self.config.preference_data, format="auto")
        try:
            loaded = load_rows(data_cfg, "ranks")
        except PrefoptError as exc:
            raise ConfigError(f"the preference head needs pairs or rankings ({exc}); set algorithm.preference_data, "
                              "or algorithm.preference_weight=0 for no preference head") from exc
        seed, size = self.run.train.seed, self.config.head_batch_size
        train, _ = build_dataloader(loaded.train, "ranks", self.tokenizer, data_cfg, size, shuffle=True, seed=seed)
        history = fit_head(self.trunk, self.preference_head, train,
                           lambda scores, batch: ranking_loss(scores, batch, self.config.center_coef),
                           self.config.preference_steps, self.config.head_lr, self.device)
        report = _tail_mean(history)
        if loaded.eval:
            held_out, _ = build_dataloader(loaded.eval, "ranks", self.tokenizer, data_cfg, size, shuffle=False,
                                           seed=seed)
            report["eval_accuracy"] = self._preference_accuracy(held_out)
        log.info("preference head: %s", report)
        return report

    @torch.no_grad()
    def _preference_accuracy(self, loader) -> float:
        correct = total = 0
        for batch in loader:
            batch = batch.to(self.device)
            scores = self.preference_head(self.trunk(batch.input_ids, batch.attention_mask))
            correct += int((scores[batch.pairs[:, 0]] > scores[batch.pairs[:, 1]]).sum())
            total += batch.pairs.shape[0]
        return correct / max(total, 1)

    def train_rule_head(self) -> dict[str, float]:
        """Fit the rule head (multi-label BCE) on the rows of rule_data."""
        batches = rule_batches(read_rule_rows(self.config.rule_data), self.learned_rules, self.tokenizer,
                               self.config.head_batch_size, self.run.data.max_length, self.run.train.seed)
        history = fit_head(self.trunk, self.rule_head, batches, rule_loss, self.config.rule_steps,
                           self.config.head_lr, self.device)
        report = _tail_mean(history)
        log.info("rule head: %s", report)
        return report

    # ------------------------------------------------------------------ rollout, reward, update
    def rollout(self, batch: PromptBatch) -> Rollout:
        """Sample one response per prompt with the full policy model (trunk + policy top), KV cache on."""
        return generate(self.lm, self.tokenizer, batch, self.config.generation)

    @torch.no_grad()
    def score(self, features: TrunkOutput, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
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
        if self.composite is not None:
            extra, components = self.composite(rollout)
            total = total + extra
            parts.update(components)
        note_rewards(rollout, total, parts)  # samples.jsonl: the heads' parts too
        return total, parts

    def forward_rollout(self, rollout: Rollout) -> dict[str, Any]:
        """The trunk ONCE, then every top on its features; tensors sliced to the response [B, Tr]."""
        sequences, attention_mask, score_mask = rollout_inputs(rollout)
        temperature = self.config.generation.logprob_temperature
        features = self.trunk(sequences, attention_mask)
        logps, entropy, values = self.policy_forward(features, rollout)
        ref_logps, _ = self.reference_forward(features, sequences, score_mask, temperature, with_entropy=False)
        scores, parts = self.score(features, rollout)
        out = {"logps": logps, "entropy": entropy, "values": values,
               "ref_logps": ref_logps[:, rollout.prompt_ids.shape[1]:]}
        return {**out, "scores": scores, "parts": parts, "mask": rollout.response_mask.float(), "features": features}

    def policy_forward(self, features: TrunkOutput, rollout: Rollout,
                       rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(log-probs, entropies, values) [B, Tr] of the trained module on the features of ``rows`` (default all)."""
        sequences, _, score_mask = rollout_inputs(rollout)
        if rows is not None:
            features, sequences, score_mask = features.select(rows), sequences[rows], score_mask[rows]
        out = self.model(features, sequences, score_mask, self.config.generation.logprob_temperature)
        return tuple(value[:, rollout.prompt_ids.shape[1]:] for value in out)

    def learn(self, rollout: Rollout) -> Iterator[LossOutput]:
        """The ONE update of a rollout, as G = train.gradient_accumulation_steps micro-batches of its rows.

        G = 1: every top runs once on the shared features and the loss keeps its graph. G > 1: the targets
        (advantages whitened over the whole rollout) come from a forward without gradient over all rows; then each
        micro-batch of rows runs the trained module again, its loss weighted by its share of the response tokens,
        so that the mean of the G losses is the loss of G = 1.
        """
        accumulation, cfg = self.accumulation, self.config
        with torch.no_grad() if accumulation > 1 else contextlib.nullcontext():
            out = self.forward_rollout(rollout)
            loss, metrics = a2c_loss(out["logps"], out["values"], out["entropy"], out["ref_logps"], out["scores"],
                                     out["mask"], cfg)
        gap = masked_mean((out["logps"].detach() - rollout.logprobs).abs(), out["mask"])
        metrics.update({"logprob_gap": gap, **{f"reward/{k}": v.mean() for k, v in out["parts"].items()}})
        seconds = getattr(rollout, "seconds", 0.0)
        if seconds:
            metrics["perf/generate_s"] = torch.tensor(seconds)
        logged = {k: float(v) for k, v in metrics.items()}
        if accumulation == 1:
            yield LossOutput(loss, logged, int(rollout.attention_mask.sum()))
            return
        advantages, returns, _ = a2c_targets(out["logps"], out["values"], out["ref_logps"], out["scores"],
                                             out["mask"], cfg)
        tokens = out["mask"].sum()
        for rows in torch.arange(len(rollout.responses), device=tokens.device).tensor_split(accumulation):
            logps, entropy, values = self.policy_forward(out["features"], rollout, rows)
            mask = out["mask"][rows]
            loss, _ = a2c_objective(logps, values, entropy, out["ref_logps"][rows], advantages[rows], returns[rows],
                                    mask, cfg)
            yield LossOutput(accumulation * mask.sum() / tokens * loss, logged, int(rollout.attention_mask[rows].sum()))

    def step(self, batch: PromptBatch) -> Iterator[LossOutput]:
        yield from self.learn(self.rollout(batch))

    @torch.no_grad()
    def evaluate(self, batch: PromptBatch) -> dict[str, float]:
        rollout = self.rollout(batch)
        out = self.forward_rollout(rollout)
        kl = ((out["logps"] - out["ref_logps"]) * out["mask"]).sum(-1)
        sums = {"reward/score": out["scores"].sum(), "kl": kl.sum(), "response_length": out["mask"].sum(),
                **{f"reward/{k}": v.sum() for k, v in out["parts"].items()}}
        return {**{k: float(v) for k, v in sums.items()}, "count": float(len(rollout.responses))}

    # ------------------------------------------------------------------ save
    def save(self, out_dir: str | Path) -> None:
        """The policy as a plain transformers model (trunk + trained top), plus the value and reward heads."""
        out_dir = Path(out_dir)
        self.lm.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        heads: dict[str, Any] = {"trainable_layers": self.config.trainable_layers,
                                 "value": self.unwrapped.value.state_dict()}
        if self.preference_head is not None:
            heads["preference"] = self.preference_head.state_dict()
        if self.rule_head is not None:
            heads.update(rules=self.rule_head.state_dict(), rule_names=self.rule_head.names)
        torch.save(heads, out_dir / HEADS_FILE)


def _tail_mean(history: list[dict[str, float]], last: int = 20) -> dict[str, float]:
    """Mean of each metric over the last ``last`` steps (and the first step's loss, to see the drop)."""
    if not history:
        return {}
    tail = history[-last:]
    report = {f"train_{k}": sum(h[k] for h in tail) / len(tail) for k in tail[0]}
    report["first_loss"] = history[0]["loss"]
    report["steps"] = len(history)
    return report
