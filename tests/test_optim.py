"""The default optimizer (prefopt.optim): torch's fused AdamW kernel, which updates the weights and moments in place.

torch's other AdamW kernels (one parameter at a time on CPU, ``foreach`` on CUDA) make a temporary the size of a
parameter at every step (the square root of its second moment); at a 151,936 x 64 tied embedding that is 37 MB at
the step's peak memory, about 9% of what a DPO step adds there (benchmarks/README.md, issue 24).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from prefopt.config import TrainConfig
from prefopt.optim import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


class NewTensors(TorchDispatchMode):
    """The element counts of the tensors ops make while active (not those they write in place)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.sizes.append(t.numel())
        return out


def steps(model, optimizer, ids: torch.Tensor, count: int) -> None:
    for _ in range(count):
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()


def test_the_default_optimizer_steps_in_place(gpt2_real_dir):
    """A second update (the moments exist) of gpt2-real under the default ``train.optimizer`` makes no tensor of a
    parameter's size (a scalar at most); torch's default AdamW kernel makes one the size of each parameter, the tied
    embedding included."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(gpt2_real_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    made = {}
    for name in (TrainConfig().optimizer, "adamw"):
        optimizer = make_optimizer(model.parameters(), TrainConfig(optimizer=name, learning_rate=1e-3))
        steps(model, optimizer, ids, 1)
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        with NewTensors() as seen:
            optimizer.step()
        made[name] = max(seen.sizes, default=0)
    embedding = model.get_input_embeddings().weight.numel()
    assert made[TrainConfig().optimizer] <= 1 and made["adamw"] == embedding, made


def test_the_fused_kernel_agrees_with_the_default_kernel_to_rounding(gpt2_real_dir):
    """Five updates of gpt2-real (dropout on, weight decay 0.01, lr 1e-3) by the fused kernel and by torch's default
    kernel: the weights agree to 1% of how far they moved (the kernels order the float operations differently, and
    Adam divides by sqrt(v) + eps, which turns rounding into relative differences where gradients are near eps)."""
    weights = {}
    for name in ("adamw_fused", "adamw"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(gpt2_real_dir, dtype=torch.float32).train()
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        optimizer = make_optimizer(model.parameters(), TrainConfig(optimizer=name, learning_rate=1e-3,
                                                                   weight_decay=0.01))
        steps(model, optimizer, torch.randint(0, model.config.vocab_size, (2, 24)), 5)
        weights[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = float((weights["adamw"] - start).abs().max())
    assert moved > 1e-3
    assert float((weights["adamw_fused"] - weights["adamw"]).abs().max()) < 0.01 * moved
