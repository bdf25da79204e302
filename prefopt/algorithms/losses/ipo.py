"""IPO: identity preference optimisation (Azar et al. 2023, arXiv 2310.12036, eq. 17).

    L = (h - 1 / (2 * tau))^2,   h = mean-per-token log-ratio(y_w) - mean-per-token log-ratio(y_l)

``beta`` plays the role of tau. The log-ratios are averaged over response tokens (as the IPO authors and TRL do),
so the squared loss does not scale with response length.
"""

from torch import Tensor

from prefopt.registry import LOSSES
from prefopt.types import PairLogps


@LOSSES.register("ipo")
def ipo(logps: PairLogps, beta: float) -> Tensor:
    chosen = logps.chosen_logratios / logps.chosen_lengths.clamp(min=1)
    rejected = logps.rejected_logratios / logps.rejected_lengths.clamp(min=1)
    return (chosen - rejected - 1 / (2 * beta)) ** 2
