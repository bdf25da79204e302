"""Hinge (SLiC-style) loss on the DPO margin (Zhao et al. 2023, arXiv 2305.10425, eq. 3; with 1/beta as margin).

    L = max(0, 1 - beta * [(log pi/pi_ref)(y_w) - (log pi/pi_ref)(y_l)])
"""

import torch
from torch import Tensor

from prefopt.registry import LOSSES
from prefopt.types import PairLogps


@LOSSES.register("hinge")
def hinge(logps: PairLogps, beta: float) -> Tensor:
    return torch.relu(1 - beta * (logps.chosen_logratios - logps.rejected_logratios))
