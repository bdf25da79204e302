"""Preference accuracy on held-out pairs: does the policy rank the chosen reply above the rejected one?

A DPO-family policy pi trained from pi_ref carries an implicit reward r(x, y) = beta log pi(y | x) / pi_ref(y | x)
(Rafailov et al. 2023, eq. 5). Its preference accuracy on pairs (x, y_w, y_l) counts the pairs where

    margin = [log pi(y_w | x) - log pi_ref(y_w | x)] - [log pi(y_l | x) - log pi_ref(y_l | x)] > 0

(beta > 0 does not change the sign), ties counting 1/2, so the reference itself scores exactly 0.5
(``implicit_acc``). ``logprob_acc`` ranks by the plain summed log-probs log pi(y_w | x) > log pi(y_l | x) (ties 1/2).
Log-probs are summed over the response tokens of the pair rows (prefopt.scoring.sequence_logps), as DPO trains them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.judge.sampling import evaluating
from prefopt.judge.stats import paired_wins
from prefopt.scoring import sequence_logps
from prefopt.types import PairBatch


@torch.no_grad()
def pair_logps(model: nn.Module, batches: Iterable[PairBatch]) -> tuple[Tensor, Tensor]:
    """Summed response log-probs of every pair: (chosen [N], rejected [N]) on the CPU, in batch order."""
    device = next(model.parameters()).device
    chosen, rejected = [], []
    with evaluating(model):
        for batch in batches:
            batch = batch.to(device)
            logps, _ = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
            c, r = logps.float().cpu().chunk(2)
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def preference_rows(policy: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]) -> list[dict[str, Any]]:
    """One row per pair: the implicit-reward margin and whether the implicit reward and the plain log-probs rank the
    chosen reply first (1, 0.5 on a tie, 0); ``policy`` and ``reference`` as ``pair_logps`` returns them."""
    (chosen, rejected), (ref_chosen, ref_rejected) = policy, reference
    margins = ((chosen - ref_chosen) - (rejected - ref_rejected)).tolist()
    implicit = paired_wins(margins, [0.0] * len(margins))
    logprob = paired_wins(chosen.tolist(), rejected.tolist())
    return [{"pair_index": i, "implicit_margin": m, "implicit_acc": a, "logprob_acc": b}
            for i, (m, a, b) in enumerate(zip(margins, implicit, logprob))]
