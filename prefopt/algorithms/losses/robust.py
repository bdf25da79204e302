"""Robust DPO: an unbiased loss under preference-label noise (Chowdhury et al. 2024, arXiv 2403.00409, eq. 9).

If each label is flipped with known probability eps < 1/2, the loss of the observed pair de-biased by the loss of
the flipped pair is, in expectation over the noise, the clean DPO loss:

    L = [ (1 - eps) * l(y_w, y_l) - eps * l(y_l, y_w) ] / (1 - 2 * eps),   l(a, b) = -log sigmoid(beta * m(a, b))

with m(a, b) the DPO log-ratio margin of a over b. Unlike ``cdpo`` (which smooths the label and so shrinks the
gradient), the de-biased loss keeps its gradient unbiased; it can be negative. eps = 0 is plain DPO. Matches TRL's
DPOTrainer ``loss_type="robust"`` with ``label_smoothing`` = eps.
"""

import torch.nn.functional as F
from torch import Tensor

from prefopt.registry import LOSSES
from prefopt.types import PairLogps


@LOSSES.register("robust")
def robust(logps: PairLogps, beta: float, label_smoothing: float = 0.1) -> Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"algorithm.loss_params.label_smoothing={label_smoothing}: must be in [0, 0.5)")
    margin = beta * (logps.chosen_logratios - logps.rejected_logratios)
    observed = -F.logsigmoid(margin)  # l(y_w, y_l)
    flipped = -F.logsigmoid(-margin)  # l(y_l, y_w)
    return ((1 - label_smoothing) * observed - label_smoothing * flipped) / (1 - 2 * label_smoothing)
