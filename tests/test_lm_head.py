"""The LM head in chunks (prefopt.lm_head): the same log-probs, entropies, losses and gradients as one log_softmax
over the full logits, without ever making a [tokens, vocab] tensor.

The reference is the unchunked computation written out: ``log_softmax(head(hidden) / T)`` gathered at the targets,
its entropy ``-(p * log p).sum()``, and autograd's gradients of both. Measured on the realistic fixtures (chunks of 7
positions x 100 vocabulary entries, all kept from the forward or all recomputed in the backward): log-probs within 1e-6, entropies 4e-6
(of ~6 nats), gradients 1e-6 relative in fp32; bf16 within bf16's rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import prefopt.lm_head
import prefopt.scoring
from prefopt.config import LogitsConfig, build_run_config
from prefopt.errors import ConfigError
from prefopt.lm_head import chunking, head_logps
from prefopt.registry import ALGORITHMS
from prefopt.stopping import NonFiniteGuard
from prefopt.trainer import Trainer
from test_conformance import recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = LogitsConfig(chunk=7, vocab_block=100, keep_mb=0.01)  # 2.8 KB blocks, none kept: each recomputed
KEPT = LogitsConfig(chunk=7, vocab_block=100, keep_mb=1.0)  # the same blocks, all kept for the backward


def unchunked(hidden, head, targets, temperature=1.0, with_entropy=False):
    """The reference: one log_softmax over the full [M, V] logits."""
    logps = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    picked = logps.gather(-1, targets[:, None])[:, 0]
    return picked, -(logps.exp() * logps).sum(-1) if with_entropy else None


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (0 when both are 0)."""
    difference = float((a.float() - b.float()).norm())
    return difference / float(b.float().norm()) if difference else 0.0


def run(fn, model, hidden, targets, precision, temperature=0.7):
    """Values and gradients (hidden, head) of a weighted sum of log-probs and entropies."""
    model.zero_grad()
    hidden = hidden.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logps, entropy = fn(hidden, model.get_output_embeddings(), targets, temperature, True)
    weights = torch.linspace(-1.0, 2.0, len(targets))
    ((logps * weights).sum() + (entropy * weights.flip(0)).sum()).backward()
    return logps.detach(), entropy.detach(), hidden.grad, model.get_output_embeddings().weight.grad.clone()


@pytest.mark.parametrize("config", [SMALL, KEPT], ids=["recomputed", "kept"])
@pytest.mark.parametrize("fixture,precision", [("gpt2-real", "fp32"), ("llama-chat", "fp32"), ("llama-chat", "bf16")])
def test_values_and_gradients_equal_one_log_softmax(fixture, precision, config, realistic_model_dirs):
    """Hidden states of the fixture on real tokens (gpt2-real: tied head; llama-chat: untied, in fp32 and under bf16
    autocast), 7-position chunks: under fp32 the vocabulary is cut in 100-entry blocks, under bf16 it runs whole;
    the blocks' logits recomputed in the backward or all kept from the forward."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(realistic_model_dirs[fixture], dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state.flatten(0, 1)  # [120, H]
    targets = ids.roll(-1, 1).flatten()
    with chunking(config):
        ours = run(head_logps, model, hidden, targets, precision)
    reference = run(unchunked, model, hidden, targets, precision)
    logps, entropy, grad_hidden, grad_head = ours
    torch.testing.assert_close(logps, reference[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, reference[1], atol=1e-5, rtol=0)
    bound = 1e-6 if precision == "fp32" else 1e-2  # bf16: the weight gradient is rounded once per 7-position chunk
    assert relative(grad_hidden, reference[2]) < (1e-6 if precision == "fp32" else 1e-5)
    assert relative(grad_head, reference[3]) < bound


class LargestTensor(TorchDispatchMode):
    """The number of elements of the largest tensor any op makes while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("keep_mb", [0.0, 1.0])  # nothing kept; all 400 x 512 kept
def test_no_tensor_grows_with_tokens_times_vocabulary(keep_mb, gpt2_real_dir):
    """400 positions x a 512-token vocabulary: forward and backward make nothing larger than the head's own weight
    (its gradient), the hidden states or a block; the unchunked head makes [400, 512]."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(gpt2_real_dir, dtype=torch.float32)
    head = model.get_output_embeddings()
    hidden = torch.randn(400, head.in_features, requires_grad=True)
    targets = torch.randint(0, head.out_features, (400,))
    sizes = {}
    for name, fn, config in [("chunked", head_logps, LogitsConfig(16, 128, keep_mb)),
                             ("unchunked", unchunked, LogitsConfig())]:
        with LargestTensor() as seen, chunking(config):
            logps, entropy = fn(hidden, head, targets, 1.0, True)
            (logps.sum() + entropy.sum()).backward()
        sizes[name] = seen.largest
    assert sizes["unchunked"] >= 400 * head.out_features
    assert sizes["chunked"] <= max(head.weight.numel(), hidden.numel())


def head_calls(gpt2_real_dir, monkeypatch, config: LogitsConfig, budgets, autocast: bool = False):
    """(head forwards in the call, head forwards in its backward) of 120 positions on gpt2-real's head under each
    ``keep_mb`` of ``budgets`` (the rest of ``config`` fixed), and the head."""
    torch.manual_seed(0)
    head = AutoModelForCausalLM.from_pretrained(gpt2_real_dir, dtype=torch.float32).get_output_embeddings()
    hidden = torch.randn(120, head.in_features, requires_grad=True)
    targets = torch.randint(0, head.out_features, (120,))
    calls = []
    logits = prefopt.lm_head._Block.logits
    monkeypatch.setattr(prefopt.lm_head._Block, "logits", lambda self, *args: calls.append(1) or logits(self, *args))
    counts = []
    for budget in budgets(head):
        calls.clear()
        with chunking(dataclasses.replace(config, keep_mb=budget)), torch.autocast("cpu", enabled=autocast):
            logps, _ = head_logps(hidden, head, targets)
            forward = len(calls)
            logps.sum().backward()
        counts.append((forward, len(calls) - forward))
    return counts


def test_a_call_keeps_all_its_logits_or_none(gpt2_real_dir, monkeypatch):
    """``keep_mb`` is all or nothing: 120 positions' logits are kept whole when they fit (the backward runs no head
    forward) and not at all when the budget is 1% short (every block recomputed in the backward, none held from
    the forward): kept in part, they would cost the whole budget at the step's peak for a share of the recompute."""
    size_mb = lambda head: 4 * 120 * head.out_features / 2**20  # noqa: E731
    counts = head_calls(gpt2_real_dir, monkeypatch, LogitsConfig(chunk=7, vocab_block=100),
                        lambda head: (size_mb(head), 0.99 * size_mb(head)))
    vocab = AutoModelForCausalLM.from_pretrained(gpt2_real_dir).config.vocab_size
    blocks = math.ceil(120 / 7) * math.ceil(vocab / 100)
    assert counts == [(blocks, 0), (blocks, blocks)]


def test_under_autocast_the_budget_counts_the_cast_head(gpt2_real_dir, monkeypatch):
    """Under autocast each kept chunk's graph also holds the head cast to bf16 ([V, H], once per chunk): a budget
    that fits the logits alone but not the logits and those copies keeps nothing (review: 97 MB of copies beside
    96 MB of logits under a 128 MB budget; ~2 GB at a Llama-3-8B head)."""
    chunks = math.ceil(120 / 7)
    logits_mb = lambda head: 4 * 120 * head.out_features / 2**20  # noqa: E731
    copies_mb = lambda head: chunks * 2 * head.weight.numel() / 2**20  # noqa: E731
    counts = head_calls(gpt2_real_dir, monkeypatch, LogitsConfig(chunk=7),
                        lambda head: (logits_mb(head) + copies_mb(head), 1.01 * logits_mb(head)), autocast=True)
    assert counts == [(chunks, 0), (chunks, chunks)]


def test_logits_settings_are_validated():
    with pytest.raises(ConfigError, match="model.logits.chunk"):
        LogitsConfig(chunk=0)
    with pytest.raises(ConfigError, match="model.logits.keep_mb"):
        LogitsConfig(keep_mb=-1)


# ------------------------------------------------------------------------------------------ every algorithm


def first_update(monkeypatch, data: dict, out: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """The first step's loss and the gradients the first update clips (every trainable parameter)."""
    grads: dict[str, torch.Tensor] = {}
    clip = NonFiniteGuard.clip

    def recording_clip(self, params, *args, **kwargs):
        if not grads:
            grads.update({str(i): p.grad.detach().clone() for i, p in enumerate(params) if p.grad is not None})
        return clip(self, params, *args, **kwargs)

    monkeypatch.setattr(NonFiniteGuard, "clip", recording_clip)
    data = {**data, "train": {**data["train"], "output_dir": str(out), "max_steps": 1}}
    AcceleratorState._reset_state()  # each run its own mixed precision (accelerate keeps one per process)
    try:
        Trainer(build_run_config(data)).fit()
    finally:
        AcceleratorState._reset_state()
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return first["train/loss"], grads


def characters(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """A reward that differs between the samples of a prompt (so group advantages are not 0): characters / 10."""
    return [len(completion) / 10 for completion in completions]


CAUSAL = [name for name in ALGORITHMS.available() if ALGORITHMS.get(name).kind != "ranks"]


@pytest.mark.parametrize("precision,bound", [("fp32", 1e-6), ("bf16", 1e-3)])
@pytest.mark.parametrize("algorithm", CAUSAL)
def test_every_algorithm_has_the_unchunked_loss_and_gradients(algorithm, precision, bound, gpt2_real_dir, hh_head,
                                                              tmp_path, monkeypatch):
    """One step of each algorithm through the real Trainer on gpt2-real (fp32 and bf16 autocast, accumulation 2;
    online ones with a reward that differs between samples), scored in tiny chunks (the conformance settings) and
    again with the head unchunked: the same loss and gradients (issue 24: 1e-6 fp32, 1e-3 bf16)."""
    data = recipe(algorithm, gpt2_real_dir, hh_head(16), precision, "full", 2, tmp_path)
    if "rewards" in data["algorithm"]:
        data["algorithm"]["rewards"] = [{"name": "callable", "params": {"fn": "test_lm_head:characters"}}]
    chunked = first_update(monkeypatch, data, tmp_path / "chunked")
    monkeypatch.setattr(prefopt.scoring, "head_logps", unchunked)
    reference = first_update(monkeypatch, data, tmp_path / "unchunked")
    assert chunked[0] == pytest.approx(reference[0], abs=bound)
    assert chunked[1].keys() == reference[1].keys() and chunked[1]
    if precision == "fp32":
        for name, grad in chunked[1].items():
            assert relative(grad, reference[1][name]) < bound, name
        return
    # bf16: the two differ by bf16's rounding (about 2e-3 of the head's weight gradient, both ways of rounding
    # equally far from the truth); the check is that chunking adds no error: each within 1e-3 + the unchunked bf16
    # path's own distance to the fp32 gradient
    exact = recipe(algorithm, gpt2_real_dir, hh_head(16), "fp32", "full", 2, tmp_path)
    exact["algorithm"] = data["algorithm"]
    truth = first_update(monkeypatch, exact, tmp_path / "fp32")
    for name, grad in chunked[1].items():
        assert relative(grad, truth[1][name]) < relative(reference[1][name], truth[1][name]) + bound, name
