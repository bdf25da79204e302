"""The optimizer a run trains with (``train.optimizer``), built by the libraries that own each one.

* ``adamw_fused``: ``torch.optim.AdamW(fused=True)`` (Loshchilov & Hutter 2019), the default: the update in one fused
  kernel per step, in place (CPU, CUDA, MPS), as the HF Trainer's default ``adamw_torch_fused``;
* ``adamw``: the same update by torch's default kernels (one parameter at a time on CPU, ``foreach`` on CUDA), which
  make a temporary the size of a parameter (or of all of them) at each step and pass over the states several times:
  at 9.9M parameters on one CPU thread ~110 ms a step against the fused kernel's ~13 ms, and the largest parameter's
  size more at the step's peak (37 MB for a 151,936 x 64 embedding). The two agree to rounding (the fused kernel
  orders the float operations differently: parameters 1.8e-8 apart after 5 steps at lr 1e-6);
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
