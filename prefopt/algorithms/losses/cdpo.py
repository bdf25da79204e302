"""Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): label smoothing epsilon.

The preference label is assumed flipped with probability epsilon:
    L = -(1 - eps) * log sigmoid(beta * m) - eps * log sigmoid(-beta * m),   m = DPO log-ratio margin.
eps = 0 is plain DPO.
"""

import torch.nn.functional as F
from torch import Tensor

from prefopt.registry import LOSSES
from prefopt.types import PairLogps


@LOSSES.register("cdpo")
def cdpo(logps: PairLogps, beta: float, label_smoothing: float = 0.1) -> Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"algorithm.loss_params.label_smoothing={label_smoothing}: must be in [0, 0.5)")
    margin = beta * (logps.chosen_logratios - logps.rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
