"""DPO's Bradley-Terry loss (Rafailov et al. 2023, arXiv 2305.18290, eq. 7).

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])
"""

import torch.nn.functional as F
from torch import Tensor

from prefopt.registry import LOSSES
from prefopt.types import PairLogps


@LOSSES.register("sigmoid")
def sigmoid(logps: PairLogps, beta: float) -> Tensor:
    return -F.logsigmoid(beta * (logps.chosen_logratios - logps.rejected_logratios))
