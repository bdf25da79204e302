"""Small nn.Module wrappers whose ``forward`` returns exactly what an algorithm needs.

The Trainer hands the wrapped module to ``accelerator.prepare``; every forward therefore goes through the
DDP/FSDP wrapper's ``forward`` (so gradients synchronise), while the LM head still runs only on the scored
positions (see ``prefopt.functional.token_logps``).
"""

from __future__ import annotations

from torch import Tensor, nn

from prefopt.functional import token_logps
from prefopt.prefix import SharedPrefixLayout


class TokenScorer(nn.Module):
    """Wraps a causal LM: ``forward(input_ids, attention_mask, score_mask)`` -> per-token log-probs [N, T]
    (and entropies when ``with_entropy``). ``self.lm`` is the plain transformers / peft model.

    With ``layout`` (prefopt.prefix.share_prefixes of these rows) the decoder runs on the packed rows, where each
    group's shared prefix is computed once; the result is the same [N, T] tensor."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor, temperature: float = 1.0,
                with_entropy: bool = False, layout: SharedPrefixLayout | None = None) -> tuple[Tensor, Tensor | None]:
        return token_logps(self.lm, input_ids, attention_mask, score_mask, temperature, with_entropy, layout)

    def save_pretrained(self, out_dir, **kwargs) -> None:
        self.lm.save_pretrained(out_dir, **kwargs)

