"""Sparrow's reward heads on the shared trunk (Glaese et al. 2022, arXiv 2209.14375, sec. 2.3 and 2.4).

The preference model and the rule model are heads on the frozen trunk of ``prefopt.sparrow`` (a copy of the top
blocks + a linear map read at the last token). Before RL they are trained on the trunk features and frozen:

* preference head: the reward stage's K-wise Bradley-Terry loss over all C(K, 2) pairs of a ranking, plus the
  centering regulariser c * mean((r_w + r_l)^2) (``prefopt.algorithms.reward.ranking_loss``); reported with its
  accuracy on the held-out pairs;
* rule head: one logit per learned rule, multi-label BCE on rows {text, rule, violated} (``prefopt.rules``).

Rules with labelled rows (in ``rule_data`` or in saved heads) are learned; the others must be programmatic. The
trained heads are saved next to the policy (``HEADS_FILE``) and a later run loads them (``reward_heads``) instead of
training them again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.algorithms.reward import ranking_loss
from prefopt.errors import ConfigError, PrefoptError
from prefopt.rules import RULES, read_rule_rows, rule_batches, rule_loss
from prefopt.sparrow import PreferenceHead, Trunk

log = logging.getLogger("prefopt.a2c")
HEADS_FILE = "sparrow_heads.pt"


def load_heads(reward_heads: str | None, trainable_layers: int) -> dict[str, Any] | None:
    """The heads a2c saved at ``reward_heads`` (the file or its directory); None when not given."""
    if not reward_heads:
        return None
    path = Path(reward_heads)
    path = path / HEADS_FILE if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"algorithm.reward_heads={str(path)!r}: file not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of code, a truncated or foreign file: unpickling errors have many types
        raise ConfigError(f"algorithm.reward_heads={str(path)!r}: not a heads file saved by a2c ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"algorithm.reward_heads={str(path)!r}: not a heads file saved by a2c (it holds a "
                          f"{type(saved).__name__})")
    if saved.get("trainable_layers") != trainable_layers:
        raise ConfigError(f"algorithm.reward_heads were trained with trainable_layers="
                          f"{saved.get('trainable_layers')}, not {trainable_layers}")
    return saved


def sort_rules(rules: dict[str, float], saved: dict[str, Any] | None,
               rule_data: str | None) -> tuple[list[str], list[str]]:
    """(learned rules: those with rows in ``rule_data`` or in the saved heads, programmatic rules)."""
    labelled: set[str] = set()
    if saved is not None:
        labelled = set(saved.get("rule_names", []))
    elif rule_data:
        labelled = {row["rule"] for row in read_rule_rows(rule_data)}
    learned = [name for name in rules if name in labelled]
    programmatic = [name for name in rules if name not in labelled]
    unknown = [name for name in programmatic if name not in RULES]
    if unknown:
        raise ConfigError(f"algorithm.rules: {unknown} have no rows in algorithm.rule_data and no programmatic "
                          f"rule; programmatic rules: {', '.join(RULES.available())}")
    return learned, programmatic


def fit_head(trunk: Trunk, head: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Tensor, Any], tuple],
             steps: int, lr: float, device: torch.device | str = "cpu") -> list[dict[str, float]]:
    """Train a reward head on trunk features for ``steps`` batches (AdamW); the trunk stays frozen.

    ``batches`` yields objects with ``input_ids``/``attention_mask`` (and a ``.to``); ``loss_fn(outputs, batch)``
    returns (loss, metrics of tensors). The head is left frozen and in eval mode. Returns per-step metrics.
    """
    head.requires_grad_(True).train()
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr)
    history: list[dict[str, float]] = []
    iterator = iter(batches)
    for _ in range(steps):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(batches)
            batch = next(iterator)
        batch = batch.to(device)
        loss, metrics = loss_fn(head(trunk(batch.input_ids, batch.attention_mask)), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"loss": float(loss.detach()), **{k: float(v.float().mean()) for k, v in metrics.items()}})
    head.zero_grad(set_to_none=True)
    head.requires_grad_(False).eval()
    return history


def train_preference_head(trunk: Trunk, head: PreferenceHead, run: Any, tokenizer,
                          device: torch.device) -> dict[str, float]:
    """Fit the preference head with the reward stage's K-wise loss + centering; report held-out accuracy."""
    from prefopt.data import build_dataloader, load_rows

    cfg, data_cfg = run.algorithm, run.data
    if cfg.preference_data:
        data_cfg = dataclasses.replace(data_cfg, path=cfg.preference_data, format="auto", sources=[])
    try:
        loaded = load_rows(data_cfg, "ranks")
    except PrefoptError as exc:
        raise ConfigError(f"the preference head needs pairs or rankings ({exc}); set algorithm.preference_data, "
                          "or algorithm.preference_weight=0 for no preference head") from exc
    seed, size = run.train.seed, cfg.head_batch_size
    train, _ = build_dataloader(loaded.train, "ranks", tokenizer, data_cfg, size, shuffle=True, seed=seed)
    history = fit_head(trunk, head, train, lambda scores, batch: ranking_loss(scores, batch, cfg.center_coef),
                       cfg.preference_steps, cfg.head_lr, device)
    report = tail_mean(history)
    if loaded.eval:
        held_out, _ = build_dataloader(loaded.eval, "ranks", tokenizer, data_cfg, size, shuffle=False, seed=seed)
        report["eval_accuracy"] = preference_accuracy(trunk, head, held_out, device)
    log.info("preference head: %s", report)
    return report


@torch.no_grad()
def preference_accuracy(trunk: Trunk, head: PreferenceHead, loader, device: torch.device) -> float:
    """Share of held-out pairs whose preferred response the head scores higher."""
    correct = total = 0
    for batch in loader:
        batch = batch.to(device)
        scores = head(trunk(batch.input_ids, batch.attention_mask))
        correct += int((scores[batch.pairs[:, 0]] > scores[batch.pairs[:, 1]]).sum())
        total += batch.pairs.shape[0]
    return correct / max(total, 1)


def train_rule_head(trunk: Trunk, head: nn.Module, run: Any, tokenizer, rules: list[str],
                    device: torch.device) -> dict[str, float]:
    """Fit the rule head (multi-label BCE) on the rows of ``rule_data`` for the learned ``rules``."""
    cfg = run.algorithm
    batches = rule_batches(read_rule_rows(cfg.rule_data), rules, tokenizer, cfg.head_batch_size,
                           run.data.max_length, run.train.seed)
    report = tail_mean(fit_head(trunk, head, batches, rule_loss, cfg.rule_steps, cfg.head_lr, device))
    log.info("rule head: %s", report)
    return report


def heads_state(trainable_layers: int, value: nn.Module, preference: nn.Module | None,
                rules: nn.Module | None) -> dict[str, Any]:
    """What ``HEADS_FILE`` holds: the value head and the reward heads, with the trunk depth they were trained on."""
    heads: dict[str, Any] = {"trainable_layers": trainable_layers, "value": value.state_dict()}
    if preference is not None:
        heads["preference"] = preference.state_dict()
    if rules is not None:
        heads.update(rules=rules.state_dict(), rule_names=rules.names)
    return heads


def tail_mean(history: list[dict[str, float]], last: int = 20) -> dict[str, float]:
    """Mean of each metric over the last ``last`` steps (and the first step's loss, to see the drop)."""
    if not history:
        return {}
    tail = history[-last:]
    report = {f"train_{k}": sum(h[k] for h in tail) / len(tail) for k in tail[0]}
    report["first_loss"] = history[0]["loss"]
    report["steps"] = len(history)
    return report
