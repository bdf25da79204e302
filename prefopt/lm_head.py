"""Log-probs and entropies of an LM head without its [tokens, vocab] logits: the head runs block by block.

``head_logps(hidden, head, targets)`` returns, for each of M positions, log softmax(z / T)[target] and (when asked)
the entropy -sum_v p_v log p_v of p = softmax(z / T), where z = head(hidden) are the logits. It never holds all the
[M, V] logits: the positions are taken ``chunk`` at a time and, on CPU, the vocabulary ``vocab_block`` entries
at a time (a 4 MB block of 256 x 4096 float32 logits stays in cache), merged by a streaming log-sum-exp (Milakov & Gimelshein 2018, "Online
normalizer calculation for softmax") that also carries the entropy (the chain rule of entropy over blocks:
H = sum_b w_b (H_b - log w_b), w_b the block's share of the mass). The backward writes the gradient of each block's
logits in closed form,

    d log p_y / dz_v = 1[v = y] - p_v,        d H / dz_v = -p_v (log p_v + H),

(times 1 / T) and takes the head's vector-Jacobian product on the block (autograd's, so autocast rounds as it
would). A call whose [M, V] float32 logits fit in ``keep_mb`` keeps them all for the backward (no head forward
there); a larger one keeps none and recomputes each block there (one more head matmul each). All or nothing: kept
in part, the logits would cost the whole budget at the step's peak memory to save only budget / size of the
recompute (10% for 1,024 positions x 151,936 entries at 64 MB); a small vocabulary's logits fit whole. So
the head's memory is bounded by ``keep_mb`` (which counts, under autocast, the head's parameters cast once per
kept chunk) plus a few [positions, block] float32 tensors, not tokens x vocabulary.
The values and gradients are those of the unchunked ``log_softmax`` within float rounding (``tests/test_lm_head.py``).

On CPU, a plain ``nn.Linear`` head computing in float32 (every transformers causal LM, tied or not) is cut along the
vocabulary too; under bf16 or on GPU the head runs on whole rows (a bf16 product rounded per block and summed
over blocks would drift from the unchunked gradient), and a head that is not a Linear (LoRA-adapted) runs whole
through ``torch.func.functional_call``.
``chunking(LogitsConfig(...))`` sets the three for the calls made inside it (the Trainer applies
``model.logits``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefopt.config import LogitsConfig

_CHUNKING = contextvars.ContextVar("chunking", default=LogitsConfig())


@contextlib.contextmanager
def chunking(config: LogitsConfig) -> Iterator[None]:
    """Cut the work of the ``head_logps`` calls made inside (this thread or context) as ``config`` says."""
    token = _CHUNKING.set(config)
    try:
        yield
    finally:
        _CHUNKING.reset(token)


def head_logps(hidden: Tensor, head: nn.Module, targets: Tensor, temperature: float = 1.0,
               with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log softmax(head(hidden) / T)[targets] [M] (float32) and the entropies [M] (None unless ``with_entropy``).

    ``hidden`` [M, H] (any dtype; autocast applies as it would to ``head(hidden)``), ``targets`` [M] long. Both
    outputs keep a graph to ``hidden`` and the head's parameters.
    """
    names, params = zip(*head.named_parameters())
    config = _CHUNKING.get()
    cut = config.vocab_block if _exact_in_blocks(hidden, head) else None
    graph = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    keep = graph and _kept_bytes(hidden, params, config.chunk) <= config.keep_mb * 2**20
    logps, entropy = _HeadLogps.apply(hidden, targets, head, names, float(temperature), bool(with_entropy),
                                      (config.chunk, cut, keep), *params)
    return logps, entropy if with_entropy else None


def _kept_bytes(hidden: Tensor, params: tuple[Tensor, ...], chunk: int) -> int:
    """What keeping a call's logits for the backward holds: the [M, V] float32 logits, and under autocast each
    chunk's graph also holds the head's parameters cast to the autocast dtype (a [V, H] copy per chunk)."""
    device = hidden.device.type
    kept = 4 * hidden.shape[0] * params[0].shape[0]
    if torch.is_autocast_enabled(device):
        cast = torch.get_autocast_dtype(device)
        copies = sum(p.numel() * cast.itemsize for p in params if p.is_floating_point() and p.dtype != cast)
        kept += math.ceil(hidden.shape[0] / chunk) * copies
    return kept


def _exact_in_blocks(hidden: Tensor, head: nn.Module) -> bool:
    """Cut the vocabulary into blocks: on CPU (where it pays: the blocks stay in cache), for a Linear head computing
    in float32 (each position's gradient is then a float32 sum over the blocks, as one matmul sums; a bf16 product
    rounded per block and summed would not be the unchunked gradient)."""
    device = hidden.device.type
    if device != "cpu" or type(head) is not nn.Linear:
        return False
    return not torch.is_autocast_enabled(device) and head.weight.dtype == torch.float32


@dataclass
class _Block:
    """One block of the work: positions ``rows`` x the vocabulary slice ``cols`` (None: the whole head)."""

    rows: slice
    cols: slice | None

    def leaves(self, params: tuple[Tensor, ...], wants: list[bool]) -> list[Tensor]:
        """The parameters as leaves of a new graph, cut to this block's vocabulary slice."""
        cut = [p if self.cols is None else p[self.cols] for p in params]
        return [p.detach().requires_grad_(want) for p, want in zip(cut, wants)]

    def logits(self, head: nn.Module, names: tuple[str, ...], leaves: list[Tensor], hidden: Tensor,
               temperature: float) -> Tensor:
        """float32 logits / T [m, v]: the head (``leaves`` in place of its parameters) on ``hidden`` [m, H]."""
        if self.cols is None:
            z = torch.func.functional_call(head, dict(zip(names, leaves)), (hidden,))
        else:
            z = F.linear(hidden, leaves[0], leaves[1] if len(leaves) > 1 else None)
        z = z.float()
        return z / temperature if temperature != 1.0 else z

    def start(self) -> int:
        return 0 if self.cols is None else self.cols.start


def _blocks(rows: int, positions: int, vocab_size: int, cut: int | None) -> list[list[_Block]]:
    """The blocks of each chunk of positions, in order."""
    cols = [None] if cut is None else [slice(v, min(v + cut, vocab_size)) for v in range(0, vocab_size, cut)]
    return [[_Block(slice(r, min(r + positions, rows)), c) for c in cols] for r in range(0, rows, positions)]


def _merge(lse: Tensor | None, entropy: Tensor | None, block_lse: Tensor, block_entropy: Tensor | None):
    """Log-sum-exp and entropy of two disjoint parts of the vocabulary from each part's own."""
    if lse is None:
        return block_lse, block_entropy
    merged = torch.logaddexp(lse, block_lse)
    if block_entropy is not None:  # H = sum_b w_b (H_b - log w_b),  log w_b = lse_b - lse
        log_w, log_wb = lse - merged, block_lse - merged
        entropy = log_w.exp() * (entropy - log_w) + log_wb.exp() * (block_entropy - log_wb)
    return merged, entropy


class _HeadLogps(torch.autograd.Function):
    """Forward: a streaming log-sum-exp (and entropy) over blocks; backward: closed-form dL/dz per block."""

    @staticmethod
    def forward(ctx, hidden, targets, head, names, temperature, with_entropy, plan, *params):
        positions, cut, keep = plan
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.set_materialize_grads(False)
        wants = [ctx.needs_input_grad[0], *ctx.needs_input_grad[7:]]  # hidden, then each parameter
        logps = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse_out, entropy_out = torch.empty_like(logps), torch.empty_like(logps)
        ctx.kept = {}
        for chunk in _blocks(hidden.shape[0], positions, params[0].shape[0], cut):
            rows = chunk[0].rows
            h, y = hidden[rows], targets[rows]
            lse = entropy = picked = None
            for block in chunk:
                with torch.enable_grad() if keep else contextlib.nullcontext():  # keep: this block's logits and graph
                    h_in = h.detach().requires_grad_(wants[0]) if keep else h
                    leaves = block.leaves(params, wants[1:] if keep else [False] * len(params))
                    z = block.logits(head, names, leaves, h_in, temperature)  # [m, v]
                if keep:
                    ctx.kept[(rows.start, block.start())] = (z, h_in, leaves)
                z = z.detach()
                start, width = block.start(), z.shape[1]
                at_target = z.gather(1, (y - start).clamp(0, width - 1)[:, None])[:, 0]
                picked = at_target if picked is None else torch.where((y >= start) & (y < start + width),
                                                                      at_target, picked)
                block_lse = torch.logsumexp(z, -1)
                block_entropy = None
                if with_entropy:
                    log_p = z - block_lse[:, None]
                    block_entropy = -(log_p.exp() * log_p).sum(-1)
                lse, entropy = _merge(lse, entropy, block_lse, block_entropy)
            lse_out[rows] = lse
            logps[rows] = picked - lse
            if with_entropy:
                entropy_out[rows] = entropy
        ctx.save_for_backward(hidden, targets, lse_out, entropy_out, *params)
        ctx.head, ctx.names, ctx.temperature, ctx.plan, ctx.with_entropy = head, names, temperature, plan, with_entropy
        return logps, entropy_out

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, targets, lse, entropy, *params = ctx.saved_tensors
        grad_entropy = grad_entropy if ctx.with_entropy else None
        wants = [ctx.needs_input_grad[0], *ctx.needs_input_grad[7:]]  # hidden, then each parameter
        if (grad_logps is None and grad_entropy is None) or not any(wants):
            return (None,) * (7 + len(params))
        grad_hidden = torch.zeros_like(hidden) if wants[0] else None
        grad_params = [torch.zeros_like(p) if want else None for p, want in zip(params, wants[1:])]
        device, enabled, dtype = ctx.autocast
        positions, cut, _ = ctx.plan
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            for chunk in _blocks(hidden.shape[0], positions, params[0].shape[0], cut):
                rows = chunk[0].rows
                y, chunk_lse, chunk_entropy = targets[rows], lse[rows, None], entropy[rows, None]
                g_logp = None if grad_logps is None else grad_logps[rows, None]
                g_entropy = None if grad_entropy is None else grad_entropy[rows, None]
                for block in chunk:
                    kept = ctx.kept.pop((rows.start, block.start()), None)
                    if kept is None:  # recompute this block's logits
                        h, leaves = hidden[rows].detach().requires_grad_(wants[0]), block.leaves(params, wants[1:])
                        z = block.logits(ctx.head, ctx.names, leaves, h, ctx.temperature)
                    else:
                        z, h, leaves = kept
                    log_p = z.detach() - chunk_lse
                    if g_entropy is None:  # dL/dz = g_logp (1[v = y] - p)
                        grad_z = log_p.exp_().mul_(-g_logp)
                    else:  # ... - g_entropy p (log p + H)
                        coef = (log_p + chunk_entropy).mul_(g_entropy)
                        if g_logp is not None:
                            coef.add_(g_logp)
                        grad_z = log_p.exp_().mul_(coef).neg_()
                    if g_logp is not None:
                        start = block.start()
                        inside = ((y >= start) & (y < start + z.shape[1])).nonzero()[:, 0]
                        grad_z[inside, y[inside] - start] += g_logp[inside, 0]
                    inputs = [t for t in (h, *leaves) if t.requires_grad]
                    grads = iter(torch.autograd.grad(z, inputs, grad_z))
                    if wants[0]:
                        grad_hidden[rows] += next(grads)
                    for k, want in enumerate(wants[1:]):
                        if want:
                            (grad_params[k] if block.cols is None else grad_params[k][block.cols]).add_(next(grads))
        ctx.kept = {}
        return (grad_hidden, None, None, None, None, None, None, *grad_params)
