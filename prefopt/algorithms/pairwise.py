"""Shared machinery of the pairwise (``pairs`` kind) algorithms: policy/reference log-probs of a PairBatch,
reference log-probs cached once per dataset, and the preference metrics every pairwise method reports."""

from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from prefopt.errors import ConfigError
from prefopt.prefix import choose_layout, pair_groups
from prefopt.registry import LOSSES, closest
from prefopt.scoring import Layout, sum_scored
from prefopt.types import PairBatch, PairLogps


def resolve_loss(name: str, params: dict[str, Any]) -> Callable[..., Tensor]:
    """The registered loss ``name`` with ``params`` bound; unknown parameters are config errors."""
    fn = LOSSES.get(name)
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("logps", "beta")]
    for key in params:
        if key not in accepted:
            hint = closest(key, accepted)
            raise ConfigError(f"algorithm.loss_params.{key}: loss {name!r} has no parameter {key!r}"
                              + (f"; did you mean {hint!r}?" if hint else "")
                              + f" (its parameters: {', '.join(accepted) or 'none'})")

    def bound(logps: PairLogps, beta: float) -> Tensor:
        try:
            return fn(logps, beta, **params)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    bound.reference_free = getattr(fn, "reference_free", False)  # type: ignore[attr-defined]
    return bound


def pair_layout(batch: PairBatch, model: Any) -> Layout | None:
    """The batch with each pair's prompt run once for its chosen and rejected responses, in the layout that costs
    ``model`` least (prefopt.prefix.choose_layout; None: the padded rows cost least)."""
    return choose_layout(batch.input_ids, batch.attention_mask, pair_groups(batch.num_pairs), model)


def policy_logps(scorer: Any, batch: PairBatch,
                 layout: Layout | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward over chosen and rejected rows -> (chosen, rejected, chosen_lengths, rejected_lengths).

    With a ``layout`` (``pair_layout(batch, model)``) the scorer runs each shared prompt once; the values are the same.
    """
    kwargs = {} if layout is None else {"layout": layout}
    per_token, _ = scorer(batch.input_ids, batch.attention_mask, batch.completion_mask, **kwargs)
    logps, lengths = sum_scored(per_token, batch.completion_mask)
    chosen, rejected = logps.chunk(2)
    chosen_len, rejected_len = lengths.chunk(2)
    return chosen, rejected, chosen_len, rejected_len


def preference_metrics(logps: PairLogps, beta: float, prefix: str = "") -> dict[str, Tensor]:
    """Implicit-reward metrics (per pair, [B]): rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy."""
    if logps.ref_chosen is None:  # reference-free: the implicit reward is beta * mean log-prob
        chosen = beta * logps.chosen / logps.chosen_lengths.clamp(min=1)
        rejected = beta * logps.rejected / logps.rejected_lengths.clamp(min=1)
    else:
        chosen, rejected = beta * logps.chosen_logratios, beta * logps.rejected_logratios
    return {
        f"{prefix}rewards/chosen": chosen.detach(),
        f"{prefix}rewards/rejected": rejected.detach(),
        f"{prefix}rewards/margin": (chosen - rejected).detach(),
        f"{prefix}rewards/accuracy": (chosen > rejected).float(),
        f"{prefix}logps/chosen": logps.chosen.detach(),
        f"{prefix}logps/rejected": logps.rejected.detach(),
    }


def means(metrics: dict[str, Tensor]) -> dict[str, float]:
    return {key: float(value.float().mean()) for key, value in metrics.items()}


def sums(metrics: dict[str, Tensor]) -> dict[str, float]:
    return {key: float(value.float().sum()) for key, value in metrics.items()}


class ReferenceCache:
    """Reference log-probs computed once per (split, pair index) and reused every epoch ("precompute")."""

    def __init__(self):
        self.values: dict[str, dict[int, tuple[float, float]]] = {}

    @torch.no_grad()
    def fill(self, split: str, loader: Any, reference_scorer: Any, accelerator: Any,
             layout_of: Callable[[PairBatch], Layout | None] | None = None, max_batches: int | None = None,
             progress: bool = True) -> None:
        """Reference log-probs of the first ``max_batches`` batches of ``loader`` (all: None), with a progress bar;
        ``layout_of(batch)``: the layout each batch runs in (None: the padded rows).

        For the training split the caller seeds the loader's epoch 0 first, so these are the batches a run of
        ``max_steps`` steps takes when it stays inside the first epoch."""
        table = self.values.setdefault(split, {})
        total = len(loader) if max_batches is None else min(len(loader), max_batches)
        bar = tqdm(itertools.islice(loader, total), total=total, desc=f"reference log-probs ({split})",
                   disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
        for batch in bar:
            layout = None if layout_of is None else layout_of(batch)
            chosen, rejected, _, _ = policy_logps(reference_scorer, batch, layout)
            index = accelerator.gather(batch.index)
            chosen, rejected = accelerator.gather(chosen), accelerator.gather(rejected)
            for i, c, r in zip(index.tolist(), chosen.tolist(), rejected.tolist()):
                table[i] = (c, r)

    def lookup(self, split: str, batch: PairBatch) -> tuple[Tensor, Tensor] | None:
        table = self.values.get(split)
        if table is None:
            return None
        pairs = [table[i] for i in batch.index.tolist()]
        values = torch.tensor(pairs, dtype=torch.float32, device=batch.input_ids.device)
        return values[:, 0], values[:, 1]
