"""``prefopt data``: what a recipe's data becomes, shown without training.

The rows go through the very path training takes (``load_rows`` and ``build_dataloader`` with the recipe's
``data`` section and tokenizer); the report lists the detected formats, the rows per split, every skip reason
with its places, how chat messages are rendered, and the first example of each split decoded from the token ids
of its batch: ``┃`` marks where the prompt ends and the response starts, ``⟦ ⟧`` enclose the tokens that carry
loss (sft: labels other than -100; pairs / unpaired: the completion mask; ranks: the last token, where the
reward model reads its score; prompts: none, generation starts after the prompt), and those tokens are listed;
for SFT, how many assistant turns carry loss (``data.assistant_turns``).
Long spans are cut to ``SHOWN_CHARS`` characters (a prompt keeps its end, a response its start).
"""

from __future__ import annotations

from typing import Any

import torch

from prefopt.config import DataConfig
from prefopt.data import LoadedData, load_rows
from prefopt.data.chat import describe_rendering
from prefopt.data.collate import IGNORE_INDEX, build_dataloader
from prefopt.data.readers import SkipLog, summarise
from prefopt.types import LMBatch, PairBatch, PromptBatch, RankBatch, UnpairedBatch

SHOWN_CHARS = 400
SHOWN_LOSS_TOKENS = 24


def preview(data: DataConfig, kind: str, tokenizer: Any, eval_data: DataConfig | None = None) -> str:
    """The report of ``prefopt data`` (see the module docstring); DataError when the data is unusable."""
    loaded = load_rows(data, kind)
    lines = [f"data: {data.path}  (kind {kind}, split {data.split!r}, format {data.format})",
             f"detected format: {_counts(loaded.formats)}",
             f"rendering: {describe_rendering(tokenizer, data.chat_template)}"]
    lines += _rows_report(loaded, "data")
    splits = {"train": (loaded.train, loaded.places["train"]), "eval": (loaded.eval, loaded.places["eval"])}
    if eval_data is not None:  # as the Trainer: its held-out part, or all of it
        held_out = load_rows(eval_data, kind)
        lines.append(f"eval_data: {eval_data.path}  (detected format: {_counts(held_out.formats)})")
        lines += _rows_report(held_out, "eval_data")
        part = "eval" if held_out.eval else "train"
        splits["eval"] = (getattr(held_out, part), held_out.places[part])
    for split, (records, places) in splits.items():
        if not records:
            lines.append(f"\n[{split}] no rows")
            continue
        skips = SkipLog()
        loader, _ = build_dataloader(records, kind, tokenizer, data, batch_size=1, shuffle=False, seed=0,
                                     skips=skips, places=places, split=split)
        kept = len(loader.dataset)
        note = f"; skipped at tokenization {skips.total}: {skips.summary()}" if skips.total else ""
        unit = ("packed chunks" if kind == "text" else "packed sequences" if kind == "sft" and data.packing
                else "rows")
        lines.append(f"\n[{split}] {len(records)} records -> {kept} {unit} of tokens{note}")
        if kind == "sft":
            lines.append(_turns_line(loader.dataset, data))
        feature = loader.dataset[0]
        where = places[feature["index"]] if "index" in feature else "the first documents, packed"
        lines.append(f"first example ({where}):")
        lines += _example(next(iter(loader)), feature, tokenizer)
    return "\n".join(lines)


def _turns_line(features: list[dict[str, Any]], data: DataConfig) -> str:
    """``assistant turns carrying loss: 3474 of 3474 (data.assistant_turns: all)``, over the tokenized rows."""
    with_loss = sum(f["turns"][0] for f in features if "turns" in f)
    turns = sum(f["turns"][1] for f in features if "turns" in f)
    note = ("" if with_loss == turns or data.assistant_turns == "last"
            else "; string prompts and turns cut by data.max_prompt_length carry none")
    return f"assistant turns carrying loss: {with_loss} of {turns} (data.assistant_turns: {data.assistant_turns}{note})"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} ({n} rows)" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def _rows_report(loaded: LoadedData, section: str) -> list[str]:
    lines = [f"rows ({section}): train {len(loaded.train)}, eval {len(loaded.eval)}; "
             f"skipped {sum(loaded.skipped.values())}"]
    for reason, entry in loaded.manifest["skipped"]["reasons"].items():
        lines.append(f"  skipped: {summarise({reason: entry})}")
    return lines


def _example(batch: Any, feature: dict[str, Any], tokenizer: Any) -> list[str]:
    """Each sequence of a one-example batch, decoded, with the boundary and the loss-carrying tokens marked."""
    prompt_len = len(feature.get("prompt_ids", []))
    rows_note: list[str] = []
    if isinstance(batch, LMBatch):
        rows = [("sequence", batch.input_ids[0], batch.attention_mask[0], batch.labels[0] != IGNORE_INDEX)]
        prompt_len = feature.get("prompt_length", int((batch.labels[0] == IGNORE_INDEX).long().cumprod(0).sum()))
        if "examples" in feature:  # packed SFT examples (data.packing): no one prompt boundary
            count = feature['examples']
            rows_note, prompt_len = [f"  {count} example{'s' if count > 1 else ''} packed into this sequence"], 0
    elif isinstance(batch, PairBatch):
        rows = [(name, batch.input_ids[i], batch.attention_mask[i], batch.completion_mask[i].bool())
                for i, name in enumerate(("chosen", "rejected"))]
    elif isinstance(batch, UnpairedBatch):
        label = "desirable" if bool(batch.desirable[0]) else "undesirable"
        rows = [(label, batch.input_ids[0], batch.attention_mask[0], batch.completion_mask[0].bool())]
    elif isinstance(batch, RankBatch):
        rows = []
        for i, score in enumerate(feature["scores"]):
            last = torch.zeros_like(batch.attention_mask[i], dtype=torch.bool)
            last[int(batch.attention_mask[i].sum()) - 1] = True
            rows.append((f"response {i + 1}, score {score:g}", batch.input_ids[i], batch.attention_mask[i], last))
        ranked = ", ".join(f"{better + 1} > {worse + 1} (margin {float(margin):g})"
                           for (better, worse), margin in zip(batch.pairs.tolist(), batch.margins))
        rows_note = [f"  ranked pairs: {ranked}"]
    elif isinstance(batch, PromptBatch):
        mask = batch.attention_mask[0]
        rows = [("prompt", batch.input_ids[0], mask, torch.zeros_like(mask, dtype=torch.bool))]
        prompt_len = int(mask.sum())
    else:
        raise TypeError(f"no preview for batch type {type(batch).__name__}")
    out = []
    for name, ids, attention, loss in rows:
        keep = attention.bool()
        ids, loss = ids[keep].tolist(), loss[keep].tolist()
        out.append(f"  {name}: {len(ids)} tokens, prompt {prompt_len}, loss on {sum(loss)}")
        out.append("    " + _marked(tokenizer, ids, loss, prompt_len))
        carried = [t for t, on in zip(ids, loss) if on]
        if carried:
            more = f" ... (+{len(carried) - SHOWN_LOSS_TOKENS})" if len(carried) > SHOWN_LOSS_TOKENS else ""
            pieces = _pieces(tokenizer, carried[:SHOWN_LOSS_TOKENS])
            out.append("    loss tokens: " + " ".join(f"'{_show(p)}'" for p in pieces) + more)
    return rows_note + out


def _marked(tokenizer: Any, ids: list[int], loss: list[bool], boundary: int) -> str:
    """The decoded ids: ``┃`` at the prompt / response boundary, ``⟦ ⟧`` around each run of loss tokens."""
    text, start = "", 0
    spans = []  # (start, end, carries loss), cut at the boundary and wherever the loss flag changes
    for i in range(1, len(ids) + 1):
        if i == len(ids) or i == boundary or loss[i] != loss[start]:
            spans.append((start, i, loss[start]))
            start = i
    for begin, end, on in spans:
        piece = _show(tokenizer.decode(ids[begin:end]))
        if len(piece) > SHOWN_CHARS:  # the prompt keeps its end, a response its start
            piece = "…" + piece[-SHOWN_CHARS:] if end <= boundary else piece[:SHOWN_CHARS] + "…"
        text += ("┃" if begin == boundary and begin > 0 else "") + (f"⟦{piece}⟧" if on else piece)
    return text + ("┃" if boundary >= len(ids) else "")


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds, decoded in context (a token that ends inside a character adds ''; the next one
    adds the character), so byte-level and SentencePiece pieces read as the text they make."""
    pieces, before = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1])
        if text.endswith("\ufffd"):
            pieces.append("")
            continue
        pieces.append(text[len(before):])
        before = text
    return pieces


def _show(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
