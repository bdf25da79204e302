"""The ablations of ``vs_trl.py`` and ``vs_trl_online.py``: prefopt with one of its speed choices undone.

Each switch undoes one thing prefopt does that TRL does not, so the ablation table can say what it is worth:

- ``no_packing``: prefix-shared segments one per row instead of packed first-fit into rows (``prefopt.prefix``);
- ``full_logits``: the LM head on every position, then the scored positions picked (as TRL does on CPU), instead
  of logits on the scored positions only;
- ``unchunked``: the LM head on the scored positions in one piece, one log_softmax over their [tokens, vocab]
  logits (prefopt before ``prefopt.lm_head``), instead of chunk by chunk;
- ``two_forwards`` (DPO): chosen and rejected rows in a forward each, each trimmed to its own longest row, instead
  of one forward over both.

``sharing`` (prefix sharing off) and ``precompute`` (cached reference log-probs) are recipe fields, not here.
``before_online``: an online algorithm as it was before the chunked head, the decode loop and prefix sharing by cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def variant_class(algorithm: str, options: dict[str, Any]) -> type:
    """The algorithm class, or a subclass with one ablation switched on (ablations live in the benchmark)."""
    from prefopt.algorithms.dpo import DPO
    from prefopt.algorithms.lm import SFT
    from prefopt.algorithms.orpo import ORPO
    from prefopt.algorithms.reward import RewardModelling

    base = {"dpo": DPO, "orpo": ORPO, "reward": RewardModelling, "sft": SFT}[algorithm]
    if not any(options.get(k) for k in ("no_packing", "two_forwards", "full_logits", "unchunked")):
        return base
    from prefopt.scoring import sum_scored
    from prefopt.scoring import TokenScorer
    from prefopt.prefix import pair_groups, rank_groups, share_prefixes
    from prefopt.types import PairBatch, PairLogps

    class Variant(base):
        def layout(self, batch):
            if not options.get("no_packing"):
                return super().layout(batch)
            if isinstance(batch, PairBatch):
                groups = pair_groups(batch.num_pairs)
            else:
                groups = rank_groups(batch.input_ids.shape[0], batch.pairs, batch.pair_group)
            return share_prefixes(batch.input_ids, batch.attention_mask, groups, pack=False)

        def build(self):
            super().build()
            scorer = FullLogitsScorer if options.get("full_logits") else unchunked_scorer()
            if options.get("full_logits") or options.get("unchunked"):
                self.model = scorer(self.model.lm)
                if getattr(self, "reference", None) is not None:
                    self.reference = scorer(self.reference.lm)

        def pair_logps(self, batch, split):
            if not options.get("two_forwards"):
                return super().pair_logps(batch, split)
            chosen, chosen_len = halves_logps(self.model, batch, 0)
            rejected, rejected_len = halves_logps(self.model, batch, 1)
            cached = self.cache.lookup(split, batch)
            if cached is None:
                ref_chosen, _ = halves_logps(self.reference_forward, batch, 0)
                ref_rejected, _ = halves_logps(self.reference_forward, batch, 1)
            else:
                ref_chosen, ref_rejected = cached
            return PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)

    class FullLogitsScorer(TokenScorer):
        """The LM head on every position (as TRL does on CPU), then the scored positions picked."""

        def forward(self, input_ids, attention_mask, score_mask, temperature=1.0, with_entropy=False, layout=None):
            import torch

            from prefopt.scoring import decoder_hidden

            if layout is None:
                hidden = decoder_hidden(self.lm, input_ids, attention_mask)[:, :-1]
                rows, cols = torch.meshgrid(torch.arange(input_ids.shape[0]), torch.arange(input_ids.shape[1] - 1),
                                            indexing="ij")
            else:
                packed = layout.hidden(self.lm.get_decoder())
                rows, cols = torch.meshgrid(torch.arange(input_ids.shape[0]), torch.arange(input_ids.shape[1] - 1),
                                            indexing="ij")
                hidden = layout.gather(packed, rows, cols)
            logp = torch.log_softmax(self.lm.get_output_embeddings()(hidden).float(), -1)
            picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * score_mask[:, 1:]
            return torch.cat([torch.zeros_like(picked[:, :1]), picked], 1), None

    def halves_logps(scorer, batch, half):
        """Summed log-probs of the chosen (half 0) or rejected (half 1) rows, in a forward of their own."""
        n = batch.num_pairs
        rows = slice(half * n, (half + 1) * n)
        width = int(batch.attention_mask[rows].sum(1).max())
        ids, mask, completion = (x[rows, :width] for x in (batch.input_ids, batch.attention_mask,
                                                           batch.completion_mask))
        per_token, _ = scorer(ids, mask, completion)
        return sum_scored(per_token, completion)

    Variant.__name__ = f"{base.__name__}Variant"
    return Variant


def unchunked_scorer() -> type:
    """A TokenScorer with the LM head on the scored positions in one piece: one log_softmax over [scored tokens,
    vocab] (prefopt's scoring before ``prefopt.lm_head``)."""
    from prefopt.scoring import TokenScorer

    class UnchunkedScorer(TokenScorer):
        """The LM head on the scored positions in one piece."""

        def forward(self, input_ids, attention_mask, score_mask, temperature=1.0, with_entropy=False, layout=None):
            import torch

            from prefopt.scoring import decoder_hidden

            rows, cols = score_mask[:, 1:].bool().nonzero(as_tuple=True)
            if layout is None:
                hidden = decoder_hidden(self.lm, input_ids, attention_mask)[:, :-1][rows, cols]
            else:
                packed = layout.hidden(self.lm.get_decoder())
                hidden = layout.gather(packed, rows, cols)
            logp = torch.log_softmax(self.lm.get_output_embeddings()(hidden).float() / temperature, -1)
            picked = logp.gather(-1, input_ids[:, 1:][rows, cols, None])[:, 0]
            logps = picked.new_zeros(input_ids.shape).index_put((rows, cols + 1), picked)
            if not with_entropy:
                return logps, None
            if with_entropy == "detached":  # a metric: no [tokens, vocab] probabilities kept for the backward
                logp = logp.detach()
            entropy = -(logp.exp() * logp).sum(-1)
            return logps, logps.new_zeros(input_ids.shape).index_put((rows, cols + 1), entropy)

    return UnchunkedScorer


# ----------------------------------------------------------------------------------------------------- online
def before_online(base: type) -> type:
    """An online algorithm class as prefopt was before this work's three speed changes, each undone where the
    variant itself runs (the baton of ``turns.py`` lets one contestant run at a time, so a module attribute swapped
    for the length of the variant's own call is seen by nobody else):

    - the sampler: transformers' ``generate`` (its cache, its ``torch.multinomial`` sampler, ``output_logits``)
      with each prompt prefilled once, instead of ``prefopt.rl.decoding``'s loop (``hf_decode``);
    - the LM head: one log_softmax over the [scored tokens, vocab] logits (``UnchunkedScorer``);
    - prefix sharing of the G samples always in the packed layout, instead of the layout that costs least
      (``prefopt.prefix.choose_layout``).
    """
    import prefopt.rl.engine
    import prefopt.scoring
    from prefopt.prefix import share_prefixes

    class Before(base):
        def build(self):
            super().build()
            scorer = unchunked_scorer()
            self.model = scorer(self.model.lm)
            if self.reference is not None:
                self.reference = scorer(self.reference.lm)

        def collect(self, batch):
            with swapped(prefopt.rl.engine, "decode", hf_decode):
                return super().collect(batch)

        def response_logps(self, *args, **kwargs):
            packed = lambda ids, mask, groups, model: share_prefixes(ids, mask, groups)  # noqa: E731
            with swapped(prefopt.scoring, "choose_layout", packed):
                return super().response_logps(*args, **kwargs)

    Before.__name__ = f"{base.__name__}Before"
    return Before


@contextlib.contextmanager
def swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def hf_decode(model, input_ids, attention_mask, num_samples, gen, eos, pad_token_id, capture=None):
    """``prefopt.rl.decoding.decode`` as it was: the prompts (all but their last token) prefilled once and their
    cache repeated G times, then transformers' ``generate`` with ``output_logits``; behaviour log-probs from them."""
    import torch
    import transformers

    from prefopt.scoring import position_ids

    sampling = dict(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k) if gen.do_sample else {}
    config = transformers.GenerationConfig(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, **sampling,
                                           eos_token_id=eos, pad_token_id=pad_token_id, use_cache=True,
                                           return_dict_in_generate=True, output_logits=True)
    ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
    out.cache.batch_repeat_interleave(num_samples)
    saved, model.generation_config = model.generation_config, config
    try:
        out = model.generate(input_ids=input_ids.repeat_interleave(num_samples, 0),
                             attention_mask=attention_mask.repeat_interleave(num_samples, 0),
                             generation_config=config, cache=out.cache)
    finally:
        model.generation_config = saved
    tokens = out.sequences[:, input_ids.shape[1]:]
    logprobs = torch.stack([torch.log_softmax(logits.float() / gen.logprob_temperature, -1).gather(
        -1, tokens[:, t, None])[:, 0] for t, logits in enumerate(out.logits)], dim=1)
    return tokens, logprobs, True
