"""SimPO: simple preference optimisation with a reference-free reward (Meng et al. 2024, arXiv 2405.14734, eq. 6).

The implicit reward is the length-normalised log-likelihood r(x, y) = beta / |y| * log pi(y|x), and the
Bradley-Terry objective asks the chosen reward to beat the rejected one by a target margin gamma:

    L = -log sigmoid( beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma )

No reference model is used. ``gamma`` is the margin in reward units, TRL's ``simpo_gamma`` (the SimPO authors'
code takes ``gamma_beta_ratio`` = gamma / beta instead). ``label_smoothing`` eps gives the conservative form
-(1 - eps) log s(z) - eps log s(-z), as TRL's CPOTrainer does with ``loss_type="simpo"``; eps = 0 is the paper's
loss. Set ``beta`` around 2 (the paper uses 2.0-2.5), not DPO's 0.1.
"""

import torch.nn.functional as F
from torch import Tensor

from prefopt.registry import LOSSES
from prefopt.types import PairLogps


@LOSSES.register("simpo")
def simpo(logps: PairLogps, beta: float, gamma: float = 0.5, label_smoothing: float = 0.0) -> Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"algorithm.loss_params.label_smoothing={label_smoothing}: must be in [0, 0.5)")
    chosen = logps.chosen / logps.chosen_lengths.clamp(min=1)  # mean per-token log-prob
    rejected = logps.rejected / logps.rejected_lengths.clamp(min=1)
    margin = beta * (chosen - rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


simpo.reference_free = True
