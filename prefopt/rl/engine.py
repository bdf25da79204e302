"""The generation engine of the online algorithms: G samples per prompt, each row tagged with its prompt.

``sample(model, tokenizer, batch, gen, num_samples=G)`` repeats each prompt of a left-padded ``PromptBatch`` G times
(rows i*G .. i*G+G-1 answer prompt i), samples one response per row with prefopt.rollout's engine (transformers'
``generate``, KV cache on, behaviour log-probs from the sampling logits) and sets ``rollout.group`` to the prompt
index of every row, which the group estimators (prefopt.rl.advantages) read.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from prefopt.rollout import GenerationConfig, SampledRollout, generate
from prefopt.types import PromptBatch


def repeat_prompts(batch: PromptBatch, num_samples: int) -> PromptBatch:
    """Each prompt row (and its text and meta) ``num_samples`` times in a row."""
    if num_samples == 1:
        return batch
    return dataclasses.replace(
        batch, input_ids=batch.input_ids.repeat_interleave(num_samples, 0),
        attention_mask=batch.attention_mask.repeat_interleave(num_samples, 0),
        prompts=[p for p in batch.prompts for _ in range(num_samples)],
        meta=[m for m in batch.meta for _ in range(num_samples)])


def sample(model: nn.Module, tokenizer, batch: PromptBatch, gen: GenerationConfig, num_samples: int = 1,
           seed: int | None = None) -> SampledRollout:
    """``num_samples`` responses to every prompt of ``batch``; ``rollout.group`` [B * G] says whose."""
    rollout = generate(model, tokenizer, repeat_prompts(batch, num_samples), gen, seed=seed)
    rollout.group = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device).repeat_interleave(
        num_samples)
    return rollout
