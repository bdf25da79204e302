"""The generation engine: one batched sampler for every online algorithm, evaluation and the benchmark.

``generate(model, tokenizer, batch, gen, num_samples=G)`` samples G responses to each prompt of a LEFT-padded
``PromptBatch`` and returns a ``Rollout`` (rows i*G .. i*G+G-1 answer prompt i; ``group`` holds i). The decode loop
is ``prefopt.rl.decoding``: each prompt is prefilled ONCE and its KV cache repeated G times into buffers written in
place, then one model call and one sampling step per token. The Rollout holds:

* ``response_ids``: the sampled tokens, right-padded with the pad token;
* ``response_mask``: 1 on every token up to and including the first EOS (a response cut at
  ``max_new_tokens`` has no EOS and is 1 throughout its length); ``ended``: whether it stopped at an EOS. EOS is
  any id of ``eos_ids``: the tokenizer's and every one the model's generation config lists (Llama 3 ends a turn
  with ``<|eot_id|>``, Qwen with ``<|im_end|>``);
* ``logprobs``: behaviour log-probs  log softmax(z_t / temperature)[y_t]  of each sampled token, from the logits
  the sampling step drew from, so no second forward is run. Top-k / top-p truncation is not folded in: these are
  the log-probs the training forward recomputes (as TRL and OpenRLHF do), so the PPO ratio starts at exactly 1.
  Sampling uses the algorithm's ``GenerationConfig`` and nothing else: what a checkpoint's own generation_config
  asks for (repetition penalty, forced or length-decayed EOS, n-gram blocking, minimum length, its own
  temperature, ...) is never read, so the samples come from the policy whose log-probs are trained on; only its
  EOS ids are kept (``eos_ids``);
* decoded response texts (special tokens dropped), and the prompts / meta of the batch (repeated G times);
* ``seconds`` and ``new_tokens``: the generation time and the generated (unmasked) token count, so an
  algorithm can log generation tokens/s apart from training tokens/s;
* ``hidden`` (when ``capture`` names a module of the model, e.g. the last block of Sparrow's shared trunk): that
  module's output at every position of the sampled sequences, recorded from the loop's own forwards (the prompt
  prefill and one per sampled token; the last one is fed up to that module only), so nobody runs the model up to
  that module again.

Positions: the loop numbers the tokens of a left-padded row from its first real token
(``position_ids = cumsum(attention_mask) - 1``, as transformers' ``generate``); prefopt.scoring numbers them the same
way, so a teacher-forced forward reproduces these log-probs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.config import check
from prefopt.samples import note_rollout
from prefopt.rl.decoding import decode
from prefopt.types import PromptBatch, Rollout


@dataclass
class GenerationConfig:
    """Sampling settings shared by every online algorithm."""

    max_new_tokens: int = 48
    """Most tokens generated per response."""
    temperature: float = 1.0
    """Softmax temperature of the sampling distribution (the log-probs use it too)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: off)."""
    do_sample: bool = True
    """Sample; False decodes greedily (temperature, top_p, top_k unused, log-probs at temperature 1)."""

    def __post_init__(self):
        check(self.max_new_tokens > 0, "generation.max_new_tokens", self.max_new_tokens, "must be > 0")
        check(self.temperature > 0, "generation.temperature", self.temperature, "must be > 0")
        check(0 < self.top_p <= 1, "generation.top_p", self.top_p, "must be in (0, 1]")
        check(self.top_k >= 0, "generation.top_k", self.top_k, "must be >= 0")

    @property
    def logprob_temperature(self) -> float:
        """The temperature the behaviour log-probs (and every policy forward scoring them) use."""
        return self.temperature if self.do_sample else 1.0


@dataclass
class SampledRollout(Rollout):
    """A Rollout plus what its generation cost (set by ``generate``)."""

    seconds: float = 0.0  # wall time of model.generate
    new_tokens: int = 0  # generated tokens under response_mask
    hidden: Tensor | None = None  # [B, Tp + Tr, H] output of ``generate(capture=module)``; 0 where not attended

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def eos_ids(tokenizer, model: nn.Module) -> list[int]:
    """Every token id that ends a response: the tokenizer's eos and the eos ids of the model's generation config
    and model config (one id or a list)."""
    ids = {tokenizer.eos_token_id}
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        config_eos = getattr(config, "eos_token_id", None)
        ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return sorted(i for i in ids if i is not None)


def response_mask(response_ids: Tensor, eos: list[int]) -> Tensor:
    """1 on every token up to and including the first EOS of each row; 0 after it. [B, Tr] long."""
    is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device)).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).long()


def repeat_prompts(batch: PromptBatch, num_samples: int) -> PromptBatch:
    """Each prompt row (and its text and meta) ``num_samples`` times in a row."""
    if num_samples == 1:
        return batch
    return dataclasses.replace(
        batch, input_ids=batch.input_ids.repeat_interleave(num_samples, 0),
        attention_mask=batch.attention_mask.repeat_interleave(num_samples, 0),
        prompts=[p for p in batch.prompts for _ in range(num_samples)],
        meta=[m for m in batch.meta for _ in range(num_samples)],
        raw_prompts=[p for p in batch.raw_prompts for _ in range(num_samples)])


@contextlib.contextmanager
def recording(module: nn.Module) -> Iterator[list[Tensor]]:
    """The outputs of ``module`` [b, t, H] of every forward while open, in order."""
    outputs: list[Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def captured_hidden(module: nn.Module, outputs: list[Tensor], rows: int, width: int) -> Tensor:
    """The output of ``module`` at every column of the sampled sequences [rows, width, H] from the ``outputs`` the
    decode loop's forwards recorded: the prompts (prefilled once per prompt for its G samples) and one column per
    sampled token (``decode(capture=module)`` feeds the last one too, up to the module)."""
    if not outputs:
        raise ValueError(f"generate(capture=...): {type(module).__name__} is not a module of the generating model")
    return torch.cat([out.repeat_interleave(rows // out.shape[0], 0) for out in outputs], dim=1)[:, :width]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, batch: PromptBatch, gen: GenerationConfig, num_samples: int = 1,
             seed: int | None = None, capture: nn.Module | None = None) -> SampledRollout:
    """Sample ``num_samples`` responses per prompt of ``batch`` (see the module docstring); ``seed`` fixes the draw.

    ``model`` is a plain (unwrapped) transformers or peft causal LM; it is put in eval mode for generation and
    its mode restored. With ``seed`` the global RNG is forked, so training randomness is left untouched.
    ``capture``: a module of ``model`` (e.g. a block) whose output at every position of the sampled sequences is
    kept as ``rollout.hidden`` (``captured_hidden``), so a later pass need not run the model up to it again.
    Sampling draws from the global RNG (``torch.rand``: one uniform variate per row, token and vocabulary entry).
    """
    was_training = model.training
    model.eval()
    eos = eos_ids(tokenizer, model)
    repeated = repeat_prompts(batch, num_samples)
    hidden = None
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=_rng_devices(batch.input_ids), enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with recording(capture) if capture is not None else contextlib.nullcontext([]) as outputs:
                response_ids, logprobs, once = decode(model, batch.input_ids, batch.attention_mask, num_samples, gen,
                                                      eos, tokenizer.pad_token_id, capture)
            if capture is not None:
                del outputs[:0 if once else 1]  # a prefill of the B prompts whose cache could not be repeated
                hidden = captured_hidden(capture, outputs, len(response_ids),
                                         batch.input_ids.shape[1] + response_ids.shape[1])
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    mask = response_mask(response_ids, eos)
    if capture is not None:  # padding and the columns after EOS are garbage (the loop attends to them): zero
        hidden = hidden * torch.cat([repeated.attention_mask, mask], dim=1)[..., None].to(hidden.dtype)
    is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device))
    ended = (is_eos & mask.bool()).any(-1)
    logprobs = logprobs * mask
    response_ids = response_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(response_ids, mask)]
    group = torch.arange(batch.input_ids.shape[0], device=response_ids.device).repeat_interleave(num_samples)
    rollout = SampledRollout(prompt_ids=repeated.input_ids, prompt_mask=repeated.attention_mask,
                             response_ids=response_ids, response_mask=mask, logprobs=logprobs, ended=ended,
                             prompts=list(repeated.prompts), responses=texts, meta=list(repeated.meta),
                             raw_prompts=list(repeated.raw_prompts), group=group,
                             seconds=seconds, new_tokens=int(mask.sum()), hidden=hidden)
    note_rollout(rollout)  # samples.jsonl, while the Trainer records
    return rollout


def rollout_inputs(rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
    """(sequences, attention_mask, score_mask) [B, Tp + Tr]; score_mask is 1 on the response tokens."""
    score_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
    return rollout.sequences, rollout.attention_mask, score_mask


def _rng_devices(tensor: Tensor) -> list[int]:
    return [tensor.device.index or 0] if tensor.device.type == "cuda" else []
