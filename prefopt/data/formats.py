"""Turn raw rows of any supported source format into canonical records of one data kind.

Source formats, detected per row from its keys (or forced by ``data.format``):

==============  ===========================================================================================
hh              ``{chosen, rejected}``: full HH dialogues, split at the last "\\n\\nAssistant:"
pairs           ``{prompt, chosen, rejected}``: strings, used as they are
messages        ``chosen`` / ``rejected`` as chat lists ``[{role, content}]`` (an optional ``prompt`` list is
                put before them); ``{messages: [...]}`` alone is an SFT row
conversations   MedicalGPT / ShareGPT ``{conversations: [{from, value}], chosen, rejected}``; without
                chosen / rejected an SFT row (the turns before the last gpt turn are the prompt)
sft             ``{prompt, completion}``, or Alpaca ``{instruction, input, output}``
text            ``{text}``
ranks           ``{prompt, responses, ranking}`` (indices, best first) or ``{prompt, responses, scores}``
unpaired        ``{prompt, completion, label}`` (label: true = desirable)
prompts         ``{prompt, ...extra}``
==============  ===========================================================================================

Chat lists are rendered as HH text (prefopt.data.hh), so rendered responses start with a space.

Canonical records per kind: pairs ``{prompt, chosen, rejected}``; sft ``{prompt, completion}``; text
``{text}``; ranks ``{prompt, responses, scores}`` (higher is better); prompts ``{prompt, meta}``; unpaired
``{prompt, completion, label}``. Pair rows also give sft / text (prompt + chosen), prompts, ranks (K=2,
scores [1, 0]) and unpaired (two rows); SFT rows give text and prompts. A bad row raises SkipRow(reason); a
format that cannot give the kind at all raises DataError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefopt.data.hh import as_turns, hh_pair, render_prompt, split_turns
from prefopt.data.readers import SkipRow
from prefopt.errors import DataError

Record = dict[str, Any]
DATA_KINDS = ("pairs", "sft", "text", "ranks", "prompts", "unpaired")
CONVERTS_TO = {
    "pairs": ("pairs", "sft", "text", "prompts", "ranks", "unpaired"),
    "sft": ("sft", "text", "prompts"),
    "text": ("text",),
    "ranks": ("ranks", "prompts"),
    "unpaired": ("unpaired", "prompts"),
    "prompts": ("prompts",),
}


def parse_row(row: dict[str, Any], fmt: str) -> tuple[str, str, Record]:
    """``(format, shape, record)``: the row's canonical record of the kind its format gives natively."""
    if fmt == "auto":
        fmt = detect_format(row)
    shape, record = PARSERS[fmt](row)
    return fmt, shape, record


def check_names(fmt: str, kind: str) -> None:
    """DataError unless ``fmt`` is a known format (or "auto") and ``kind`` a known kind."""
    if fmt != "auto" and fmt not in PARSERS:
        raise DataError(f"unknown data.format {fmt!r}; known: auto, {', '.join(PARSERS)}")
    if kind not in DATA_KINDS:
        raise DataError(f"unknown data kind {kind!r}; known: {', '.join(DATA_KINDS)}")


def detect_format(row: dict[str, Any]) -> str:
    """The source format of a row, from its keys."""
    if "conversations" in row:
        return "conversations"
    if "chosen" in row or "rejected" in row:
        if any(isinstance(row.get(key), list) for key in ("prompt", "chosen", "rejected")):
            return "messages"
        return "pairs" if "prompt" in row else "hh"
    for key, fmt in (("responses", "ranks"), ("label", "unpaired"), ("messages", "messages"),
                     ("completion", "sft"), ("instruction", "sft"), ("output", "sft"), ("text", "text"),
                     ("prompt", "prompts")):
        if key in row:
            return fmt
    raise SkipRow("unknown row format")


def convert(record: Record, shape: str, kind: str, fmt: str) -> list[Record]:
    """Records of ``kind`` from a parsed record of kind ``shape`` (a pair gives two unpaired records)."""
    if kind == shape:
        return [record]
    if shape == "prompts":
        raise SkipRow("prompt-only row")
    if kind not in CONVERTS_TO[shape]:
        raise DataError(f"format {fmt!r} ({shape} rows) cannot be converted to kind {kind!r}; "
                        f"it gives: {', '.join(CONVERTS_TO[shape])}")
    prompt = record["prompt"]
    if kind == "prompts":
        return [{"prompt": prompt, "meta": {}}]
    response = record["chosen"] if shape == "pairs" else record["completion"]
    if kind == "text":
        return [{"text": prompt + response}]
    if kind == "sft":
        return [{"prompt": prompt, "completion": response}]
    if kind == "ranks":
        return [{"prompt": prompt, "responses": [response, record["rejected"]], "scores": [1.0, 0.0]}]
    return [{"prompt": prompt, "completion": response, "label": True},
            {"prompt": prompt, "completion": record["rejected"], "label": False}]


# ------------------------------------------------------------------------------------------- parsers


def parse_hh(row: dict[str, Any]) -> tuple[str, Record]:
    _require_response(row, "chosen", "rejected")
    return _pair(*hh_pair(_text(row, "chosen"), _text(row, "rejected")))


def parse_pairs(row: dict[str, Any]) -> tuple[str, Record]:
    _require_response(row, "chosen", "rejected")
    return _pair(_text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected"))


def parse_messages(row: dict[str, Any]) -> tuple[str, Record]:
    if "chosen" not in row and "rejected" not in row and "messages" in row:
        return _sft(*split_turns(as_turns(row["messages"], "messages", "human")))
    _require_response(row, "chosen", "rejected")
    prompt_turns = as_turns(row.get("prompt", []), "prompt", "human")
    prompt, chosen = split_turns(prompt_turns + as_turns(_field(row, "chosen"), "chosen", "assistant"))
    rejected_prompt, rejected = split_turns(prompt_turns + as_turns(_field(row, "rejected"), "rejected", "assistant"))
    if rejected_prompt != prompt:
        raise SkipRow("chosen and rejected prompts differ")
    return _pair(prompt, chosen, rejected)


def parse_conversations(row: dict[str, Any]) -> tuple[str, Record]:
    turns = as_turns(_field(row, "conversations"), "conversations", "human")
    if "chosen" in row or "rejected" in row:
        return _pair(render_prompt(turns), f" {_text(row, 'chosen')}", f" {_text(row, 'rejected')}")
    return _sft(*split_turns(turns))


def parse_sft(row: dict[str, Any]) -> tuple[str, Record]:
    if "instruction" in row or "output" in row:
        request = _text(row, "instruction")
        extra = _text(row, "input") if row.get("input") is not None else ""
        prompt = render_prompt([("human", f"{request}\n\n{extra}" if extra else request)])
        return _sft(prompt, f" {_text(row, 'output')}")
    _require_response(row, "completion")
    return _sft(_text(row, "prompt"), _text(row, "completion"))


def parse_text(row: dict[str, Any]) -> tuple[str, Record]:
    text = _text(row, "text")
    if not text.strip():
        raise SkipRow("empty text")
    return "text", {"text": text}


def parse_ranks(row: dict[str, Any]) -> tuple[str, Record]:
    _require_response(row, "responses")
    prompt, responses = _text(row, "prompt"), _field(row, "responses")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise SkipRow("field 'responses' is not a list of 2 or more strings")
    for response in responses:
        _nonempty(response)
    k = len(responses)
    if "ranking" in row:
        ranking = row["ranking"]
        if not isinstance(ranking, list) or sorted(ranking) != list(range(k)):
            raise SkipRow("field 'ranking' is not a permutation of the response indices")
        scores = [0.0] * k
        for place, index in enumerate(ranking):
            scores[index] = float(k - 1 - place)
    elif "scores" in row:
        scores = row["scores"]
        if (not isinstance(scores, list) or len(scores) != k
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
            raise SkipRow("field 'scores' is not a list of numbers, one per response")
        scores = [float(s) for s in scores]
    else:
        raise SkipRow("missing field 'ranking' or 'scores'")
    if len(set(scores)) == 1:
        raise SkipRow("all scores tied")
    return "ranks", {"prompt": prompt, "responses": responses, "scores": scores}


def parse_unpaired(row: dict[str, Any]) -> tuple[str, Record]:
    _require_response(row, "completion")
    prompt, completion = _text(row, "prompt"), _nonempty(_text(row, "completion"))
    label = _field(row, "label")
    if not isinstance(label, bool):
        raise SkipRow("field 'label' is not a boolean")
    return "unpaired", {"prompt": prompt, "completion": completion, "label": label}


def parse_prompts(row: dict[str, Any]) -> tuple[str, Record]:
    value = _field(row, "prompt")
    prompt = value if isinstance(value, str) else render_prompt(as_turns(value, "prompt", "human"))
    if not prompt.strip():
        raise SkipRow("empty prompt")
    return "prompts", {"prompt": prompt, "meta": {k: v for k, v in row.items() if k != "prompt"}}


PARSERS: dict[str, Callable[[dict[str, Any]], tuple[str, Record]]] = {
    "hh": parse_hh, "pairs": parse_pairs, "messages": parse_messages, "conversations": parse_conversations,
    "sft": parse_sft, "text": parse_text, "ranks": parse_ranks, "unpaired": parse_unpaired,
    "prompts": parse_prompts,
}


# ------------------------------------------------------------------------------------------- helpers


def _field(row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise SkipRow(f"missing field {key!r}")
    return row[key]


def _text(row: dict[str, Any], key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise SkipRow(f"field {key!r} is not a string")
    return value


def _nonempty(response: str) -> str:
    if not response.strip():
        raise SkipRow("empty response")
    return response


def _require_response(row: dict[str, Any], *keys: str) -> None:
    """A row with a prompt but none of the response fields is a "prompt-only row"."""
    if "prompt" in row and not any(key in row for key in keys):
        raise SkipRow("prompt-only row")


def _pair(prompt: str, chosen: str, rejected: str) -> tuple[str, Record]:
    _nonempty(chosen)
    _nonempty(rejected)
    if chosen == rejected:
        raise SkipRow("chosen == rejected")
    return "pairs", {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _sft(prompt: str, completion: str) -> tuple[str, Record]:
    return "sft", {"prompt": prompt, "completion": _nonempty(completion)}
