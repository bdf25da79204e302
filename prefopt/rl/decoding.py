"""The decode loop of the generation engine: each prompt prefilled once, a KV cache written in place, and per token
one model call and one sampling step.

transformers' ``generate`` spends most of a decoding step outside the model on small batches: its default cache
concatenates every layer's keys and values at every token (copying the whole cache), its sampler draws with
``torch.multinomial`` (an exponential variate per vocabulary entry: 16 ms for 32 x 4,096 on this CPU, more than the
model's matmuls), and ``output_logits`` keeps every step's [rows, vocab] logits. This loop does only what a rollout
needs:

* ``prefill``: one forward over the B prompts (logits of the last position only), its cache repeated G times
  (``repeat_interleave`` per layer) into ``PreallocatedLayer`` buffers that hold the prompt and every token to come;
* ``decode``: per step the model on the B x G new tokens (the mask and positions are slices of tensors made once)
  and ``draw``: the logits divided by the temperature once, for the behaviour log-prob ``log softmax(z / T)[y]`` of
  the drawn token and for ``sample``: top-k and top-p (transformers' own warpers), then the Gumbel-max draw
  ``argmax(scores - log(-log U))`` with one uniform variate per vocabulary entry: an exact draw from the same
  distribution (as ``torch.multinomial``'s exponential race, at less than half its cost), and a coupled one: two
  nearby models given the same variates draw the same token unless their scores differ near the top, which the
  evaluation's common random numbers rely on (one uniform per row through the inverse CDF was 2-10x cheaper, but a
  small change of the scores shifts every CDF entry after it, and a model perturbed by 5% shared its first sampled
  token with the original on 1 row of 10). It stops when every row has ended.

Layers of another kind than transformers' ``DynamicLayer`` (sliding-window layers, which keep only their window)
keep their own class and are repeated with their own ``batch_repeat_interleave``; a cache that cannot be repeated is
refilled by a forward over the repeated prompts. The model builds its own 4D masks from the 2D mask, so sliding
windows and every attention implementation are handled as in ``generate``.

Where a step's time goes (GPT-2 shape of benchmarks/generation.py: 4 layers, width 256, vocabulary 4,096, fp32, one
thread): one model call costs 3.5 ms at 1 row, 9.3 ms at 16 and 13.7 ms at 32 (155 cached columns). At 32 rows the
matmuls take 5.2 ms (the core's ~65 GFLOP/s), attention 4.1 ms (reading the KV cache from memory at ~10 GB/s, the
rate of a bare matmul over the keys alone), elementwise ops 1.5 ms, Python and transformers' per-call work (mask,
wrappers, module calls) about 2 ms whatever the rows, and ``draw`` 1.3 ms (0.6 of it the uniform variates). So the
loop is bound by memory and arithmetic, not by Python: ``torch.compile`` of the model call saved 15% of a step after
30 s of compilation (and recompiled as the cache grew), which pays only over many long rollouts, and is not used.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from prefopt.models import adapted
from prefopt.scoring import position_ids


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values live in buffers made once for the whole generation:
    ``update`` writes the new columns in place and returns views of the filled part (``DynamicLayer`` concatenates,
    copying the whole cache at every token)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        rows, heads = key_states.shape[:2]
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(rows, heads, self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(rows, heads, self.capacity, value_states.shape[-1])
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        stop = start + key_states.shape[-2]
        if stop > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} columns is full (asked for {stop})")
        self.key_buffer[:, :, start:stop] = key_states
        self.value_buffer[:, :, start:stop] = value_states
        self.keys, self.values = self.key_buffer[:, :, :stop], self.value_buffer[:, :, :stop]
        return self.keys, self.values


def _accepts(model: nn.Module, name: str) -> bool:
    base = adapted(model)  # peft passes kwargs through
    return name in inspect.signature(base.forward).parameters


def repeated_cache(cache: Any, num_samples: int, capacity: int) -> Any | None:
    """``cache`` (of the B prompts) for the B x G rows, each prompt's KV repeated G times, full-attention layers in
    ``PreallocatedLayer`` buffers of ``capacity`` columns; None when a layer cannot be repeated."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache if num_samples == 1 and cache is not None else None
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            grown = PreallocatedLayer(capacity)
            grown.update(layer.keys.repeat_interleave(num_samples, 0), layer.values.repeat_interleave(num_samples, 0))
            layers[i] = grown
        elif num_samples > 1:
            if not hasattr(layer, "batch_repeat_interleave"):
                return None
            layer.batch_repeat_interleave(num_samples)
    return cache


def prefill(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, num_samples: int,
            capacity: int) -> tuple[Any, Tensor] | None:
    """One forward over the prompts [B, Tp]: (their cache repeated for B x G rows, the logits [B x G, V] of each
    prompt's last token); None when the cache cannot be repeated (then prefill the repeated prompts instead)."""
    last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=True, **last_only)
    cache = repeated_cache(getattr(out, "cache", None), num_samples, capacity)
    if cache is None:
        return None
    return cache, out.logits[:, -1].repeat_interleave(num_samples, 0)


def sample(scores: Tensor, warpers: list[Any]) -> Tensor:
    """One token per row [N] from softmax(warped scores) by the Gumbel-max trick (Gumbel 1954; Maddison et al.
    2014): argmax over the vocabulary of scores + G, G = -log(-log U), U uniform per entry (in float32).
    ``scores``: float32 logits already divided by the temperature."""
    for warper in warpers:
        scores = warper(None, scores)
    noise = torch.rand_like(scores).log_().neg_().log_()  # log(-log U); U = 0 gives +inf: that entry is never drawn
    return torch.sub(scores, noise, out=noise).argmax(-1)


def draw(logits: Tensor, gen: Any, warpers: list[Any]) -> tuple[Tensor, Tensor]:
    """Each row's next token [N] and its behaviour log-prob  log softmax(z / T)[y]  [N] (T:
    ``gen.logprob_temperature``): drawn by ``sample`` from the tempered logits cut by the ``warpers``, or their argmax
    when ``gen.do_sample`` is off. The tempered logits are made once for both (a pass over [N, V] fewer than dividing
    twice), and a drawn token whose log-prob is not finite is the sign of a diverged policy (nan or inf logits give
    nan everywhere): an error (stopping.py reads its message), checked on [N] values instead of the whole [N, V]."""
    scores = logits.float()
    if gen.logprob_temperature != 1.0:
        scores = scores / gen.logprob_temperature
    drawn = sample(scores, warpers) if gen.do_sample else scores.argmax(-1)
    logprobs = torch.log_softmax(scores, -1).gather(1, drawn[:, None])[:, 0]
    if gen.do_sample and not bool(torch.isfinite(logprobs).all()):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0 (the policy's logits are "
                           "not finite)")
    return drawn, logprobs


def sampling_warpers(top_k: int, top_p: float) -> list[Any]:
    """transformers' top-k and top-p warpers, in generate's order (each only when it is on)."""
    return ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])


class _Stop(Exception):
    """Ends the forward of the last drawn token once the module it is fed for has run."""


@contextlib.contextmanager
def _stop_after(module: nn.Module | None) -> Iterator[None]:
    """Stop every forward made inside right after ``module`` ran (None: run the whole model)."""
    if module is None:
        yield
        return

    def stop(*_: Any) -> None:
        raise _Stop

    handle = module.register_forward_hook(stop)
    try:
        with contextlib.suppress(_Stop):
            yield
    finally:
        handle.remove()


def decode(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, num_samples: int, gen: Any, eos: list[int],
           pad_token_id: int, capture: nn.Module | None = None) -> tuple[Tensor, Tensor, bool]:
    """Sample ``gen.max_new_tokens`` tokens (fewer when every row ended) after each of the B left-padded prompts,
    ``num_samples`` times each: (tokens [B x G, n], behaviour log-probs [B x G, n], whether each prompt was
    prefilled once); a row that ended is padded with ``pad_token_id``. ``capture``: a module of the model that must
    see every column (a recording hook on it): the last drawn token is fed too, up to that module and no further.
    ``gen`` is a GenerationConfig of prefopt.rl.engine."""
    steps, prompt_width = gen.max_new_tokens, input_ids.shape[1]
    capacity = prompt_width + steps
    prefilled = prefill(model, input_ids, attention_mask, num_samples, capacity)
    once = prefilled is not None
    if once:
        attention_mask = attention_mask.repeat_interleave(num_samples, 0)
    else:  # a cache that cannot be repeated: prefill the repeated prompts
        input_ids, attention_mask = (x.repeat_interleave(num_samples, 0) for x in (input_ids, attention_mask))
        prefilled = prefill(model, input_ids, attention_mask, 1, capacity)
        if prefilled is None:
            raise RuntimeError(f"{type(model).__name__} returned no KV cache (use_cache=True): cannot decode with it")
    cache, logits = prefilled
    rows, device = attention_mask.shape[0], attention_mask.device
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, steps)], dim=1)
    next_position = attention_mask.sum(-1, keepdim=True)  # generate's numbering: from each row's first real token
    positions = {"position_ids": None} if _accepts(model, "position_ids") else {}
    warpers = sampling_warpers(gen.top_k, gen.top_p) if gen.do_sample else []
    eos_ids = torch.tensor(eos, device=device)
    tokens = torch.full((rows, steps), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, steps, device=device)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    for t in range(steps):
        drawn, logprobs[:, t] = draw(logits, gen, warpers)
        tokens[:, t] = drawn.masked_fill_(ended, pad_token_id)
        ended |= torch.isin(drawn, eos_ids)
        last = t == steps - 1 or bool(ended.all())
        if last and capture is None:
            break
        if positions:
            positions["position_ids"] = next_position + t
        with _stop_after(capture if last else None):
            out = model(input_ids=drawn[:, None], attention_mask=mask[:, :prompt_width + t + 1], cache=cache,
                        use_cache=True, **positions)
        if last:
            break
        logits = out.logits[:, -1]
    return tokens[:, :t + 1], logprobs[:, :t + 1], once
