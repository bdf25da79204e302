"""Pairwise preference losses, one file each, registered with ``@LOSSES.register(name)``.

Every loss has the signature ``fn(logps: PairLogps, beta: float, **params) -> Tensor[B]`` (per-pair loss);
its keyword parameters (with defaults) are its config, set in a recipe as ``algorithm.loss_params``.
"""
