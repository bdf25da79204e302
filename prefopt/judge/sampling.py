"""Seeded replies of one policy on a prompt set, and what is measured on each reply.

Draws: sample j of prompt batch b is ``generate(model, tokenizer, batch_b, gen, seed=draw_seed(seed, b, j))`` with
the ONE generation engine (prefopt.rl.engine). Every model drawn on the same batches with the same ``seed`` gets
the same seeds, so the randomness is common to all of them (common random numbers: the baseline's replies are the
same whether it is sampled alone or beside other models), and sample j does not depend on how many samples are
drawn. ``draw_seed(seed, b, 0) = seed + b``; ``draw_seed(seed, b, j) = seed + 104729 j + b``.

Measures of a reply y to a prompt x, each one number per reply:

* ``length``: response tokens, the EOS included; ``ended``: it stopped at an EOS (not at max_new_tokens);
* ``logp`` = sum_t log pi(y_t | x, y_<t) and ``entropy`` = the mean over t of the entropy of pi(. | x, y_<t) (nats),
  from a teacher-forced forward (prefopt.scoring) at the sampling temperature;
* ``kl`` = sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]: the sequence-level Monte-Carlo estimate of
  KL(pi || pi_ref) on the sampled tokens (its mean over replies estimates the KL), both log-probs teacher-forced at
  the sampling temperature, so the reference itself scores exactly 0;
* one score per judge: a reward component of prefopt.rl.rewards (a reward model, a rule, a Python or TRL-style
  reward function) called on the rollout, as online training calls it.

``Draw`` carries a rollout with its place; ``measure`` turns it into rows. Rollouts rebuilt from saved replies
(prefopt.judge.replies) are measured the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.rl.engine import GenerationConfig, generate, rollout_inputs
from prefopt.scoring import token_logps
from prefopt.types import PromptBatch, Rollout

SAMPLE_STRIDE = 104729  # a prime larger than any number of batches: seeds of different (b, j) never meet
Judge = Callable[[Rollout], Tensor]


def draw_seed(seed: int, batch: int, sample: int) -> int:
    """The seed of sample ``sample`` of prompt batch ``batch`` (the module docstring)."""
    return seed + SAMPLE_STRIDE * sample + batch


@dataclass
class Draw:
    """One rollout: sample ``sample`` of every prompt of batch ``batch``, drawn with ``seed``."""

    batch: int
    sample: int
    seed: int
    first_prompt: int
    """Index in the prompt set of the batch's first prompt (row i of the rollout answers prompt first_prompt + i)."""
    rollout: Rollout


def draws(model: nn.Module, tokenizer: Any, batches: Iterable[PromptBatch], gen: GenerationConfig, seed: int,
          num_samples: int = 1) -> Iterator[Draw]:
    """``num_samples`` seeded rollouts of every batch, batch by batch (prompt rows in the order of ``batches``)."""
    device = _device(model)
    first = 0
    for b, batch in enumerate(batches):
        batch = batch.to(device)
        for j in range(num_samples):
            s = draw_seed(seed, b, j)
            yield Draw(b, j, s, first, generate(model, tokenizer, batch, gen, seed=s))
        first += batch.input_ids.shape[0]


@contextlib.contextmanager
def evaluating(*models: nn.Module | None) -> Iterator[None]:
    """Models in eval mode (no dropout) for the duration; their modes restored after."""
    present = [m for m in models if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(present, modes):
            m.train(mode)


@torch.no_grad()
def policy_measures(model: nn.Module, rollout: Rollout, temperature: float, reference: nn.Module | None = None,
                    entropy: bool = True) -> dict[str, Tensor]:
    """``logp``, ``entropy`` (when asked) and ``kl`` (with a ``reference``) of each reply [B] (module docstring)."""
    sequences, attention_mask, score_mask = (t.to(_device(model)) for t in rollout_inputs(rollout))
    width = rollout.prompt_ids.shape[1]
    mask = rollout.response_mask.to(sequences.device).float()
    with evaluating(model, reference):
        logps, entropies = token_logps(model, sequences, attention_mask, score_mask, temperature, with_entropy=entropy)
        logps = logps[:, width:]
        out = {"logp": (logps * mask).sum(-1)}
        if entropy:
            out["entropy"] = (entropies[:, width:] * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        if reference is not None:
            ref_logps = logps if reference is model else token_logps(reference, sequences, attention_mask, score_mask,
                                                                     temperature)[0][:, width:]
            out["kl"] = ((logps - ref_logps) * mask).sum(-1)
    return out


def measure(draw: Draw, judges: dict[str, Judge] | None = None, model: nn.Module | None = None,
            reference: nn.Module | None = None, temperature: float = 1.0, entropy: bool = False
            ) -> list[dict[str, Any]]:
    """One row per reply of ``draw``: its place (prompt_index, sample, seed), texts, tokens and measures.

    ``judges``: {name: component} scored on the rollout; ``model``: the policy that drew it (logp, entropy, and
    kl when ``reference`` is given); ``temperature``: the sampling temperature (``gen.logprob_temperature``).
    """
    rollout = draw.rollout
    values: dict[str, Tensor] = {}
    if model is not None:
        values.update(policy_measures(model, rollout, temperature, reference, entropy))
    for name, judge in (judges or {}).items():
        scores = judge(rollout).float()
        if scores.shape != (len(rollout.responses),):
            raise ValueError(f"judge {name!r} gave {tuple(scores.shape)} scores for {len(rollout.responses)} replies")
        values[name] = scores
    columns = {name: value.tolist() for name, value in values.items()}
    lengths = rollout.response_mask.sum(-1).tolist()
    rows = []
    for i, (prompt, response) in enumerate(zip(rollout.prompts, rollout.responses)):
        ids = rollout.response_ids[i, :lengths[i]].tolist()
        rows.append({"prompt_index": draw.first_prompt + i, "sample": draw.sample, "seed": draw.seed,
                     "prompt_text": prompt, "response": response, "response_ids": ids, "length": int(lengths[i]),
                     "ended": bool(rollout.ended[i]), **{name: float(column[i]) for name, column in columns.items()}})
    return rows


def sample_and_measure(model: nn.Module, tokenizer: Any, batches: Iterable[PromptBatch], gen: GenerationConfig,
                       seed: int, num_samples: int = 1, judges: dict[str, Judge] | None = None,
                       reference: nn.Module | None = None, entropy: bool = False,
                       policy: bool = True) -> list[dict[str, Any]]:
    """Draw ``num_samples`` replies per prompt and measure each: the rows of ``measure`` for every draw, in prompt
    order then sample order. ``policy=False``: no policy forward (no logp / entropy / kl), judges only."""
    rows = []
    for draw in draws(model, tokenizer, batches, gen, seed, num_samples):
        rows += measure(draw, judges, model if policy else None, reference, gen.logprob_temperature, entropy)
    rows.sort(key=lambda r: (r["prompt_index"], r["sample"]))
    return rows


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
