"""The optimizer a run trains with (``train.optimizer``), built by the libraries that own each one.

* ``adamw``: ``torch.optim.AdamW`` (Loshchilov & Hutter 2019), the default;
* ``adamw_fused``: the same update in one fused kernel per step (``AdamW(fused=True)``; CPU and CUDA);
* ``adamw_8bit``: ``bitsandbytes.optim.AdamW8bit`` (Dettmers et al. 2022): the two moments in 8 bits, block-wise
  quantized, a quarter of AdamW's optimizer memory (tensors under 4,096 values keep 32-bit moments);
* ``adafactor``: ``transformers.optimization.Adafactor`` (Shazeer & Stern 2018) with the run's fixed learning rate and
  scheduler (``relative_step=False``, ``scale_parameter=False``, as the HF Trainer's "adafactor"): factored second
  moments, no first moment.

All take ``train.learning_rate``, ``train.weight_decay`` and ``train.adam_betas`` where they have them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from prefopt.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit", "adafactor")


def make_optimizer(params: Iterable[Any], train: Any) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names over ``params`` (parameters or param groups; module docstring)."""
    params = list(params)
    lr, decay, betas = train.learning_rate, train.weight_decay, tuple(train.adam_betas)
    name = train.optimizer
    if name in ("adamw", "adamw_fused"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, betas=betas, fused=name == "adamw_fused")
    if name == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError as exc:
            raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes (pip install bitsandbytes)") from exc
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=decay, betas=betas)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    raise ConfigError(f"train.optimizer={name!r}: one of {', '.join(OPTIMIZERS)}")
