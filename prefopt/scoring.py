"""The ONE way a model turns token ids into per-token log-probs, entropies and sequence scores.

Every algorithm, offline and online, scores through this module, so a batch is scored the same way whether its
rows are right-padded (offline pairs), left-padded prompt + right-padded response (rollouts) or packed with shared
prefixes (prefopt.prefix):

* positions always come from the attention mask: ``position_ids = cumsum(attention_mask) - 1``, the numbering
  ``generate`` gives a left-padded row; on right-padded rows it is 0..L-1, as a plain forward counts;
* entry t of a per-token result [N, T] belongs to token t, predicted from the tokens before it; column 0 is never
  scored; the LM head runs only on the scored positions, a chunk at a time (``prefopt.lm_head``), so neither the
  [N, T, V] nor the [scored tokens, V] logits are ever held;
* with a layout (``prefopt.prefix``: the packed rows or the prefix's KV cache reused by its branches) a prompt
  shared by several rows (a preference pair, a ranking, the G samples of one prompt: ``grouped_token_logps``) is
  computed once; the result is in the layout of ``input_ids`` either way.

``TokenScorer`` (a causal LM), ``RewardScorer`` (a sequence-classification reward model) and ``PolicyAndValue`` (a
causal LM and, optionally, its critic: per-token values V(tokens < t)) wrap models so that their ``forward`` returns
exactly these quantities and goes through the DDP/FSDP wrapper (see prefopt.trainer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefopt.lm_head import head_logps
from prefopt.models import adapted
from prefopt.prefix import CachedPrefixLayout, SharedPrefixLayout, choose_layout

Layout = SharedPrefixLayout | CachedPrefixLayout


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token, as generate numbers left-padded rows (0 on padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   positions: Tensor | None = None) -> Tensor:
    """Last hidden states [N, T, H] of a causal LM's decoder (no LM head); positions from the mask by default."""
    positions = position_ids(attention_mask) if positions is None else positions
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              use_cache=False)
    return out.last_hidden_state


def logps_from_hidden(hidden: Tensor, head: nn.Module, input_ids: Tensor, score_mask: Tensor,
                      temperature: float = 1.0, with_entropy: bool | str = False) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and entropies) [N, T] of ``input_ids[:, t]`` where ``score_mask[:, t]`` is 1.

    ``hidden`` [N, T, H] are the decoder states in the layout of ``input_ids``; token t is predicted from position
    t - 1 and the LM ``head`` runs only there, in chunks (``prefopt.lm_head``). Both outputs keep their graph (an
    entropy bonus needs it), except with ``with_entropy="detached"``: the entropies are then a metric without one.
    """
    rows, cols = score_mask[:, 1:].bool().nonzero(as_tuple=True)
    return _scatter(hidden[:, :-1][rows, cols], head, input_ids, rows, cols, temperature, with_entropy)


def _scatter(hidden: Tensor, head: nn.Module, input_ids: Tensor, rows: Tensor, cols: Tensor, temperature: float,
             with_entropy: bool | str) -> tuple[Tensor, Tensor | None]:
    """log softmax(head(hidden) / T)[target] of the selected positions [M, H], scattered back to [N, T] (and the
    entropies): token (rows[m], cols[m] + 1) is predicted from ``hidden[m]``."""
    picked, entropy = head_logps(hidden, head, input_ids[:, 1:][rows, cols], temperature, bool(with_entropy))
    logps = picked.new_zeros(input_ids.shape).index_put((rows, cols + 1), picked)
    if not with_entropy:
        return logps, None
    if with_entropy == "detached":
        entropy = entropy.detach()
    return logps, picked.new_zeros(input_ids.shape).index_put((rows, cols + 1), entropy)


def token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor,
                temperature: float = 1.0, with_entropy: bool | str = False,
                layout: Layout | None = None) -> tuple[Tensor, Tensor | None]:
    """Log-probs [N, T] of ``input_ids[:, t]`` given tokens < t where ``score_mask[:, t]`` is 1 (0 elsewhere), and
    the entropies [N, T] when asked. Left, right or no padding; ``layout``: run the rows' shared prefixes once."""
    if layout is None:
        return logps_from_hidden(decoder_hidden(model, input_ids, attention_mask), model.get_output_embeddings(),
                                 input_ids, score_mask, temperature, with_entropy)
    rows, cols = score_mask[:, 1:].bool().nonzero(as_tuple=True)
    hidden = layout.hidden(model.get_decoder())
    return _scatter(layout.gather(hidden, rows, cols), model.get_output_embeddings(), input_ids, rows, cols,
                    temperature, with_entropy)


def sum_scored(per_token: Tensor, score_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum per-token log-probs over scored tokens -> (logps [N], lengths [N]). Column 0 is never scored."""
    mask = score_mask.clone()
    mask[:, 0] = 0
    return (per_token * mask).sum(-1), mask.sum(-1)


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens of each row and the completion lengths: ([N], [N])."""
    per_token, _ = token_logps(model, input_ids, attention_mask, completion_mask)
    return sum_scored(per_token, completion_mask)


def group_lists(group: Tensor) -> list[list[int]]:
    """Row indices of each group id, in order of first appearance: [[0, 1, 2, 3], [4, 5, 6, 7], ...]."""
    rows: dict[int, list[int]] = {}
    for row, g in enumerate(group.tolist()):
        rows.setdefault(g, []).append(row)
    return list(rows.values())


def grouped_token_logps(scorer: nn.Module, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor,
                        group: Tensor | None, temperature: float = 1.0, with_entropy: bool | str = False,
                        lm: nn.Module | None = None, **kwargs) -> tuple[Tensor | None, ...]:
    """``scorer(input_ids, attention_mask, score_mask)`` (a ``TokenScorer``, maybe DDP-wrapped) with the rows of
    each ``group`` sharing their common prefix (the prompt of G samples) in the layout that costs least
    (``prefopt.prefix.choose_layout``: the prompt's KV cache reused by its G samples, the packed rows, or the padded
    rows); the same result either way.

    Rows may be left-padded (a rollout): each is rotated so its real tokens start at column 0, scored in that
    layout, and rotated back. ``group`` None: the padded rows as they are, by any scorer taking these arguments
    (``kwargs`` too; a ``PolicyAndValue`` also returns values). ``lm``: the plain model the scorer runs, whose
    shape the cost reads (None: the scorer's ``lm``).
    """
    if group is None:
        return scorer(input_ids, attention_mask, score_mask, temperature, with_entropy, **kwargs)
    width = input_ids.shape[1]
    columns = torch.arange(width, device=input_ids.device)
    pads = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # leading padding of each row
    forward, back = (columns + pads) % width, (columns - pads) % width
    ids, mask, scored = (x.gather(1, forward) for x in (input_ids, attention_mask, score_mask))
    layout = choose_layout(ids, mask, group_lists(group), lm or getattr(scorer, "module", scorer).lm)
    if layout is None:
        return scorer(input_ids, attention_mask, score_mask, temperature, with_entropy, **kwargs)
    logps, entropy = scorer(ids, mask, scored, temperature, with_entropy, layout=layout, **kwargs)
    return logps.gather(1, back), None if entropy is None else entropy.gather(1, back)


class TokenScorer(nn.Module):
    """Wraps a causal LM: ``forward(input_ids, attention_mask, score_mask)`` -> per-token log-probs [N, T]
    (and entropies when ``with_entropy``), as ``token_logps``. ``self.lm`` is the plain transformers / peft model."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor, temperature: float = 1.0,
                with_entropy: bool | str = False, layout: Layout | None = None) -> tuple[Tensor, Tensor | None]:
        return token_logps(self.lm, input_ids, attention_mask, score_mask, temperature, with_entropy, layout)

    def save_pretrained(self, out_dir, **kwargs) -> None:
        self.lm.save_pretrained(out_dir, **kwargs)


def score_positions(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int | None) -> Tensor:
    """The token a sequence-classification head reads in each row [N]: the last attended one that is not pad.

    This is transformers' rule (the rightmost token != ``config.pad_token_id``, left or right padding), restricted
    to attended tokens: when pad = eos, a text ending with eos is read at the token before it, as plain
    transformers reads it.
    """
    readable = attention_mask.bool()
    if pad_token_id is not None:
        readable = readable & (input_ids != pad_token_id)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (readable * positions).argmax(-1)


class RewardScorer(nn.Module):
    """Wraps a sequence-classification model: ``forward(input_ids, attention_mask)`` -> scores [N].

    With ``layout`` (prefopt.prefix.choose_layout of these right-padded rows) the backbone runs the prompt shared by
    a group of completions once; the scores are the same. Scores are read
    where plain transformers reads them (``score_positions``)."""

    def __init__(self, rm: nn.Module):
        super().__init__()
        self.rm = rm

    @property
    def backbone(self) -> nn.Module:
        """The plain transformers model (LoRA: adapted in place)."""
        return adapted(self.rm)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, layout: Layout | None = None) -> Tensor:
        rm = self.backbone
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        read = score_positions(input_ids, attention_mask, rm.config.pad_token_id)
        if layout is None:
            hidden = rm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            pooled = hidden.last_hidden_state[rows, read]
        else:
            pooled = layout.gather(layout.hidden(rm.base_model), rows, read)
        return rm.score(pooled).squeeze(-1).float()

    def save_pretrained(self, out_dir, **kwargs) -> None:
        self.rm.save_pretrained(out_dir, **kwargs)


class PolicyAndValue(nn.Module):
    """The policy LM and its critic (optional) in one module, so that DDP sees every trained forward.

    ``forward(input_ids, attention_mask, score_mask)`` -> (log-probs, entropies, values), each [B, T] and
    aligned with ``input_ids``: ``values[:, t]`` is V(tokens < t), the value of the state in which token t
    is chosen. Called as a ``TokenScorer`` is (``temperature``, ``with_entropy``; no shared-prefix layout), it
    returns the same log-probs and entropies, plus the values (None with ``with_values=False`` or without a critic).
    Critic: ``value_head`` (a Linear on the policy's hidden states) or ``critic`` (a sequence-classification reward
    model whose score head is read at every position, InstructGPT sec. 3.5); neither for a frozen reference.
    """

    def __init__(self, lm: nn.Module, value_head: nn.Module | None = None, critic: nn.Module | None = None):
        super().__init__()
        if value_head is not None and critic is not None:
            raise ValueError("give at most one of value_head (shared critic) and critic (separate)")
        self.lm = lm
        self.value_head = value_head
        self.critic = critic

    def forward(self, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor, temperature: float = 1.0,
                with_entropy: bool | str = True,
                with_values: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        positions = position_ids(attention_mask)
        hidden = decoder_hidden(self.lm, input_ids, attention_mask, positions)
        logps, entropy = logps_from_hidden(hidden, self.lm.get_output_embeddings(), input_ids, score_mask,
                                           temperature, with_entropy)
        if not with_values or (self.value_head is None and self.critic is None):
            return logps, entropy, None
        if self.critic is not None:
            critic = adapted(self.critic)
            hidden = critic.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                       use_cache=False).last_hidden_state  # the backbone (with its adapter, if any)
            values = critic.score(hidden).squeeze(-1).float()
        else:
            values = self.value_head(hidden.float()).squeeze(-1)
        return logps, entropy, F.pad(values[:, :-1], (1, 0))  # shift: V(tokens < t) sits at column t

    def save_pretrained(self, out_dir, **kwargs) -> None:
        """Save the policy (what the next stage loads); the critic lives in the training checkpoints."""
        self.lm.save_pretrained(out_dir, **kwargs)


def value_head(hidden_size: int, std: float = 0.0) -> nn.Linear:
    """A scalar value head; weights N(0, std^2) (std 0: zeros, so the first values are 0), bias 0."""
    head = nn.Linear(hidden_size, 1)
    nn.init.normal_(head.weight, std=std) if std > 0 else nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head
