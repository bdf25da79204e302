"""Shared pieces of the online (RLHF) algorithms: the policy+critic module, rollout scoring, KL shaping.

* ``PolicyAndValue``: ONE trainable ``nn.Module`` holding the policy LM and its critic, whose ``forward`` returns
  the per-token log-probs, entropies and values a loss needs, so that DDP sees every trained forward
  (see prefopt.modules). The critic is a value head on the policy's last hidden states ("shared"), or a
  separate transformer initialised from the reward model (InstructGPT, Ouyang et al. 2022, sec. 3.5).
* ``kl_shaped_rewards``: Ziegler et al. 2019 / Stiennon et al. 2020, eq. 1: per-token reward
  ``r_t = -beta * KL_t``, plus the sequence score at the last response token.
* ``KLController``: a fixed beta, or Ziegler's adaptive controller (sec. 2.2):
  ``e = clip(KL / KL_target - 1, -0.2, 0.2)``,  ``beta <- beta * (1 + e * n / horizon)``.

Per-token conventions (as in prefopt.functional.token_logps): entry t of a [B, T] result belongs to token t,
predicted from tokens < t; column 0 is never scored. Rollout sequences are a left-padded prompt followed by a
right-padded response, so positions are counted from each row's first real token (``position_ids``), the way
generate numbered them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefopt.config import check
from prefopt.distributed import sum_over_processes
from prefopt.functional import decoder_hidden, masked_var
from prefopt.rollout import position_ids
from prefopt.types import Rollout


def logps_from_hidden(lm: nn.Module, hidden: Tensor, input_ids: Tensor, score_mask: Tensor,
                      temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies [B, T] of ``input_ids`` from the LM's hidden states [B, T, H].

    The LM head runs only where ``score_mask`` is 1 (no [B, T, V] logits); both outputs keep their gradient.
    """
    rows, cols = score_mask[:, 1:].bool().nonzero(as_tuple=True)  # token t is predicted at position t - 1
    logits = lm.get_output_embeddings()(hidden[:, :-1][rows, cols]).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, input_ids[:, 1:][rows, cols][:, None]).squeeze(-1)
    logps = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    entropy = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    logps = logps.index_put((rows, cols + 1), picked)
    entropy = entropy.index_put((rows, cols + 1), -(logp_all.exp() * logp_all).sum(-1))
    return logps, entropy


def token_logps(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor,
                temperature: float = 1.0) -> Tensor:
    """Per-token log-probs [B, T] of a left- or right-padded batch (positions from the attention mask)."""
    hidden = decoder_hidden(lm, input_ids, attention_mask, position_ids(attention_mask))
    return logps_from_hidden(lm, hidden, input_ids, score_mask, temperature)[0]


class PolicyAndValue(nn.Module):
    """The policy LM and its critic in one module.

    ``forward(input_ids, attention_mask, score_mask)`` -> (log-probs, entropies, values), each [B, T] and
    aligned with ``input_ids``: ``values[:, t]`` is V(tokens < t), the value of the state in which token t
    is chosen. Critic: ``value_head`` (a Linear on the policy's hidden states) or ``critic`` (a
    sequence-classification reward model whose score head is read at every position); neither for a frozen
    reference policy (scored with ``with_values=False``).
    """

    def __init__(self, lm: nn.Module, value_head: nn.Module | None = None, critic: nn.Module | None = None):
        super().__init__()
        if value_head is not None and critic is not None:
            raise ValueError("give at most one of value_head (shared critic) and critic (separate)")
        self.lm = lm
        self.value_head = value_head
        self.critic = critic

    def forward(self, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor, temperature: float = 1.0,
                with_values: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        positions = position_ids(attention_mask)
        hidden = decoder_hidden(self.lm, input_ids, attention_mask, positions)
        logps, entropy = logps_from_hidden(self.lm, hidden, input_ids, score_mask, temperature)
        if not with_values:
            return logps, entropy, None
        if self.critic is not None:
            critic = self.critic.get_base_model() if hasattr(self.critic, "get_base_model") else self.critic  # peft
            hidden = critic.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                       use_cache=False).last_hidden_state  # the backbone (with its adapter, if any)
            values = critic.score(hidden).squeeze(-1).float()
        else:
            values = self.value_head(hidden.float()).squeeze(-1)
        return logps, entropy, F.pad(values[:, :-1], (1, 0))  # shift: V(tokens < t) sits at column t

    def save_pretrained(self, out_dir, **kwargs) -> None:
        """Save the policy (what the next stage loads); the critic lives in the training checkpoints."""
        self.lm.save_pretrained(out_dir, **kwargs)


def value_head(hidden_size: int, std: float = 0.0) -> nn.Linear:
    """A scalar value head; weights N(0, std^2) (std 0: zeros, so the first values are 0), bias 0."""
    head = nn.Linear(hidden_size, 1)
    nn.init.normal_(head.weight, std=std) if std > 0 else nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def require_dropout_off(run: Any, algorithm: str) -> None:
    """Refuse ``model.disable_dropout: false``: an online update compares the policy with its old self and its
    reference token by token (the ratio is 1 and the KL 0 at the start only without dropout noise)."""
    check(run.model.disable_dropout, "model.disable_dropout", run.model.disable_dropout,
          f"{algorithm} compares the policy with its old self and its reference token by token; dropout must be off")


def rollout_inputs(rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
    """(sequences, attention_mask, score_mask) [B, Tp + Tr]; score_mask is 1 on the response tokens."""
    score_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
    return rollout.sequences, rollout.attention_mask, score_mask


def kl_shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards [B, Tr]: ``-kl_coef * kl_t`` on every response token, plus ``scores`` [B] at the last."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, last), scores.float(), accumulate=True)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over masked tokens (1: perfect critic, <= 0: useless)."""
    var_returns = masked_var(returns, mask, unbiased=False)
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp(min=1e-8))


class KLController:
    """The KL coefficient beta: fixed, or adapted towards ``target`` (Ziegler et al. 2019, sec. 2.2).

    ``update(kl, n)`` after each rollout batch of ``n`` sequences whose mean KL(pi || pi_ref) is ``kl``, counted
    over all processes (``kl_over_processes``).
    Registered for checkpointing by the algorithm, so a resumed run continues with the adapted beta.
    """

    def __init__(self, init: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = init, adaptive, target, horizon

    def update(self, kl: float, n: int) -> None:
        if not self.adaptive:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def kl_over_processes(accelerator: Any, kl: Tensor, mask: Tensor) -> tuple[float, int]:
    """(mean KL per sequence, number of sequences) of the rollouts of ALL processes, for ``KLController.update``."""
    local = {"kl": float((kl * mask).sum()), "sequences": float(kl.shape[0])}
    totals = sum_over_processes(accelerator, local) if accelerator is not None else local
    return totals["kl"] / totals["sequences"], int(totals["sequences"])


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows of the per-row sums of ``values`` under ``mask`` (e.g. KL per sequence)."""
    return (values * mask).sum(-1).mean()

