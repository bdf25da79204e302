"""Turn raw rows of any supported source format into canonical records of one data kind.

Source formats, detected per row from its keys (or forced by ``data.format``):

=================  ========================================================================================
hh                 ``{chosen, rejected}``: full HH dialogues (strings), split at the last "\\n\\nAssistant:"
pairs              ``{prompt, chosen, rejected}``: strings, used as they are
messages           TRL conversational preference: ``chosen`` / ``rejected`` message lists, with a ``prompt``
                   list (explicit prompt) or without (implicit: the turns before the last assistant turn), or
                   LLaMA-Factory's ``{messages, chosen: {role, content}, rejected}``; ``{messages: [...]}``
                   alone (OpenAI style, system turns kept) is an SFT row
ultrafeedback      UltraFeedback-binarized: a string ``prompt``, ``chosen`` / ``rejected`` FULL conversations
                   (they repeat the user turn, which is kept once), ``score_chosen`` / ``score_rejected``
ultrafeedback_raw  raw UltraFeedback ``{instruction, completions: [{response, fine-grained_score |
                   overall_score}]}``: all completions of the instruction as one K-wise ranking
conversations      ShareGPT / MedicalGPT / LLaMA-Factory sharegpt: ``{conversations: [{from, value}], system?}``
                   with ``chosen`` / ``rejected`` (strings or ``{from, value}`` turns), or SFT without them
alpaca             Alpaca / LLaMA-Factory alpaca ``{instruction, input?, system?, history?}`` with ``output``
                   (SFT) or ``chosen`` / ``rejected`` (preference)
sft                ``{prompt, completion}``: strings, or TRL conversational prompt-completion message lists
text               ``{text}``
ranks              ``{prompt, responses, ranking}`` (indices, best first) or ``{prompt, responses, scores}``
unpaired           ``{prompt, completion, label}`` (label: true = desirable), strings or TRL conversational KTO
prompts            ``{prompt, ...extra}``, a string or a message list
=================  ========================================================================================

Records keep strings as strings; conversational sources give chat messages ``[{role, content}]`` (system, user,
assistant), rendered at tokenization with the chat template (prefopt.data.chat). A response is one assistant
message. Canonical records per kind: pairs ``{prompt, chosen, rejected}``; sft ``{prompt, completion}``; text
``{text}``; ranks ``{prompt, responses, scores}`` (higher is better); prompts ``{prompt, meta}``; unpaired
``{prompt, completion, label}``. Pair rows also give sft / text (prompt + chosen), prompts, ranks (K=2, scores
[1, 0], or the row's scores: UltraFeedback's become the margins) and unpaired (two rows); SFT rows give text and
prompts. A bad row raises SkipRow whose reason starts with the detected format ("ultrafeedback: field
'score_chosen' is not a number"); a format that cannot give the kind at all raises DataError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefopt.data.chat import Message, as_messages, is_chat
from prefopt.data.hh import hh_pair
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
SCORE_KEYS = ("fine-grained_score", "overall_score", "score")  # raw UltraFeedback completion scores, in this order


def parse_row(row: dict[str, Any], fmt: str) -> tuple[str, str, Record]:
    """``(format, shape, record)``: the row's canonical record of the kind its format gives natively.

    SkipRow reasons are prefixed with the format: ``"messages: missing field 'rejected'"``."""
    if fmt == "auto":
        fmt = detect_format(row)
    try:
        shape, record = PARSERS[fmt](row)
    except SkipRow as exc:
        raise SkipRow(f"{fmt}: {exc.reason}") from None
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
    if "instruction" in row:
        return "ultrafeedback_raw" if "completions" in row else "alpaca"
    if "chosen" in row or "rejected" in row:
        if "score_chosen" in row or "score_rejected" in row:
            return "ultrafeedback"
        if (any(isinstance(row.get(key), (list, dict)) for key in ("prompt", "chosen", "rejected"))
                or ("prompt" not in row and isinstance(row.get("messages"), list))):
            return "messages"
        return "pairs" if "prompt" in row else "hh"
    for key, fmt in (("responses", "ranks"), ("label", "unpaired"), ("messages", "messages"),
                     ("completion", "sft"), ("output", "alpaca"), ("text", "text"), ("prompt", "prompts")):
        if key in row:
            return fmt
    keys = ", ".join(sorted(map(str, row)))
    raise SkipRow(f"unknown row format (keys: {keys[:80]})")


def convert(record: Record, shape: str, kind: str, fmt: str) -> list[Record]:
    """Records of ``kind`` from a parsed record of kind ``shape`` (a pair gives two unpaired records)."""
    if kind == shape:
        return [{key: record[key] for key in record if key != "scores"} if shape == "pairs" else record]
    if shape == "prompts":
        raise SkipRow(f"{fmt}: prompt-only row")
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
        scores = record.get("scores", [1.0, 0.0])
        if scores[0] == scores[1]:
            raise SkipRow(f"{fmt}: all scores tied")
        return [{"prompt": prompt, "responses": [response, record["rejected"]], "scores": scores}]
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
    """TRL conversational preference (explicit or implicit prompt), or ``{messages}`` as an SFT row."""
    if "chosen" not in row and "rejected" not in row and "messages" in row:
        return _sft(*_last_turn(as_messages(row["messages"], "messages")))
    _require_response(row, "chosen", "rejected")
    context = "prompt" if "prompt" in row else "messages"  # LLaMA-Factory sharegpt with role/content tags
    prompt = as_messages(row[context], context) if context in row else []
    chosen = _after_prompt(prompt, as_messages(_field(row, "chosen"), "chosen", "assistant"), "chosen")
    rejected = _after_prompt(prompt, as_messages(_field(row, "rejected"), "rejected", "assistant"), "rejected")
    prompt, chosen = _last_turn(chosen)
    rejected_prompt, rejected = _last_turn(rejected)
    if rejected_prompt != prompt:
        raise SkipRow("chosen and rejected prompts differ")
    return _pair(prompt, chosen, rejected)


def parse_ultrafeedback(row: dict[str, Any]) -> tuple[str, Record]:
    """UltraFeedback-binarized: the pair of ``parse_messages`` and the scores (margins for ``ranks``)."""
    shape, record = parse_messages(row)
    record["scores"] = [_number(row, "score_chosen"), _number(row, "score_rejected")]
    return shape, record


def parse_ultrafeedback_raw(row: dict[str, Any]) -> tuple[str, Record]:
    """Raw UltraFeedback: the instruction and all its scored completions as one ranking."""
    prompt = as_messages(_text(row, "instruction"), "instruction")
    completions = _field(row, "completions")
    if not isinstance(completions, list) or len(completions) < 2:
        raise SkipRow("field 'completions' is not a list of 2 or more completions")
    responses, scores = [], []
    for place, completion in enumerate(completions, 1):
        if not isinstance(completion, dict) or not isinstance(completion.get("response"), str):
            raise SkipRow(f"completion {place} has no string 'response'")
        key = next((k for k in SCORE_KEYS if k in completion), None)
        if key is None:
            raise SkipRow(f"completion {place} has none of the score fields {', '.join(SCORE_KEYS)}")
        responses.append([{"role": "assistant", "content": _nonempty(completion["response"])}])
        scores.append(_number(completion, key, f"completion {place} field {key!r}"))
    return _ranking(prompt, responses, scores)


def parse_conversations(row: dict[str, Any]) -> tuple[str, Record]:
    """ShareGPT turns; a top-level ``system`` (LLaMA-Factory) is the first message."""
    turns = _system(row) + as_messages(_field(row, "conversations"), "conversations")
    if "chosen" in row or "rejected" in row:
        chosen = as_messages(_field(row, "chosen"), "chosen", "assistant")
        rejected = as_messages(_field(row, "rejected"), "rejected", "assistant")
        return _pair(turns, _one_reply(chosen, "chosen"), _one_reply(rejected, "rejected"))
    return _sft(*_last_turn(turns))


def parse_alpaca(row: dict[str, Any]) -> tuple[str, Record]:
    """Alpaca SFT (``output``) or LLaMA-Factory alpaca preference (``chosen`` / ``rejected``), with history."""
    request = _text(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise SkipRow("field 'input' is not a string")
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise SkipRow("field 'history' is not a list of [user, assistant] pairs")
    prompt = _system(row)
    for user, assistant in history:
        prompt += [*as_messages(user, "history"), *as_messages(assistant, "history", "assistant")]
    prompt += as_messages(f"{request}\n\n{extra}" if extra else request, "instruction")
    if "chosen" in row or "rejected" in row:
        return _pair(prompt, _reply(_text(row, "chosen")), _reply(_text(row, "rejected")))
    return _sft(prompt, _reply(_text(row, "output")))


def parse_sft(row: dict[str, Any]) -> tuple[str, Record]:
    if "instruction" in row or "output" in row:
        return parse_alpaca(row)
    _require_response(row, "completion")
    prompt, completion = _field(row, "prompt"), _field(row, "completion")
    if is_chat(prompt) or is_chat(completion):
        return _sft(as_messages(prompt, "prompt"), as_messages(completion, "completion", "assistant"))
    return _sft(_text(row, "prompt"), _text(row, "completion"))


def parse_text(row: dict[str, Any]) -> tuple[str, Record]:
    text = _text(row, "text")
    if not text.strip():
        raise SkipRow("empty text")
    return "text", {"text": text}


def parse_ranks(row: dict[str, Any]) -> tuple[str, Record]:
    _require_response(row, "responses")
    prompt, responses = _field(row, "prompt"), _field(row, "responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise SkipRow("field 'responses' is not a list of 2 or more responses")
    if is_chat(prompt) or any(is_chat(r) for r in responses):
        prompt = as_messages(prompt, "prompt")
        responses = [as_messages(r, "responses", "assistant") for r in responses]
    elif not isinstance(prompt, str) or not all(isinstance(r, str) for r in responses):
        raise SkipRow("fields 'prompt' and 'responses' are not strings (or message lists)")
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
        if not isinstance(scores, list) or len(scores) != k or not all(_is_number(s) for s in scores):
            raise SkipRow("field 'scores' is not a list of numbers, one per response")
        scores = [float(s) for s in scores]
    else:
        raise SkipRow("missing field 'ranking' or 'scores'")
    return _ranking(prompt, responses, scores)


def parse_unpaired(row: dict[str, Any]) -> tuple[str, Record]:
    _require_response(row, "completion")
    prompt, completion = _field(row, "prompt"), _field(row, "completion")
    if is_chat(prompt) or is_chat(completion):
        prompt, completion = as_messages(prompt, "prompt"), as_messages(completion, "completion", "assistant")
        _nonempty(completion[-1]["content"])
    else:
        prompt, completion = _text(row, "prompt"), _nonempty(_text(row, "completion"))
    label = _field(row, "label")
    if not isinstance(label, bool):
        raise SkipRow("field 'label' is not a boolean")
    return "unpaired", {"prompt": prompt, "completion": completion, "label": label}


def parse_prompts(row: dict[str, Any]) -> tuple[str, Record]:
    value = _field(row, "prompt")
    prompt = value if isinstance(value, str) else as_messages(value, "prompt")
    if not (prompt if isinstance(prompt, str) else prompt[-1]["content"]).strip():
        raise SkipRow("empty prompt")
    return "prompts", {"prompt": prompt, "meta": {k: v for k, v in row.items() if k != "prompt"}}


PARSERS: dict[str, Callable[[dict[str, Any]], tuple[str, Record]]] = {
    "hh": parse_hh, "pairs": parse_pairs, "messages": parse_messages, "ultrafeedback": parse_ultrafeedback,
    "ultrafeedback_raw": parse_ultrafeedback_raw, "conversations": parse_conversations, "alpaca": parse_alpaca,
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _number(row: dict[str, Any], key: str, name: str | None = None) -> float:
    value = _field(row, key)
    if not _is_number(value):
        raise SkipRow(f"{name or f'field {key!r}'} is not a number")
    return float(value)


def _nonempty(response: str) -> str:
    if not response.strip():
        raise SkipRow("empty response")
    return response


def _require_response(row: dict[str, Any], *keys: str) -> None:
    """A row with a prompt but none of the response fields is a "prompt-only row"."""
    if "prompt" in row and not any(key in row for key in keys):
        raise SkipRow("prompt-only row")


def _system(row: dict[str, Any]) -> list[Message]:
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise SkipRow("field 'system' is not a string")
    return [{"role": "system", "content": system}] if system else []


def _after_prompt(prompt: list[Message], conversation: list[Message], field: str) -> list[Message]:
    """``prompt + conversation``; a WHOLE conversation (it starts with a user or system turn, as UltraFeedback-
    binarized's chosen / rejected do) must start with the prompt's messages, which are then not repeated."""
    if not prompt or conversation[0]["role"] == "assistant":
        return prompt + conversation
    if conversation[:len(prompt)] != prompt:
        raise SkipRow(f"field {field!r} is a whole conversation that does not start with the prompt")
    return conversation


def _last_turn(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    """``(prompt, [last assistant message])``: the messages before the last assistant turn, and that turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise SkipRow("no assistant turn")
    return messages[:last], [messages[last]]


def _reply(content: str) -> list[Message]:
    return [{"role": "assistant", "content": content}]


def _one_reply(messages: list[Message], field: str) -> list[Message]:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise SkipRow(f"field {field!r} is not one assistant turn")
    return messages


def _content(response: str | list[Message]) -> str:
    return response if isinstance(response, str) else response[-1]["content"]


def _pair(prompt: Any, chosen: Any, rejected: Any) -> tuple[str, Record]:
    _nonempty(_content(chosen))
    _nonempty(_content(rejected))
    if chosen == rejected:
        raise SkipRow("chosen == rejected")
    return "pairs", {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _sft(prompt: Any, completion: Any) -> tuple[str, Record]:
    _nonempty(_content(completion))
    return "sft", {"prompt": prompt, "completion": completion}


def _ranking(prompt: Any, responses: list[Any], scores: list[float]) -> tuple[str, Record]:
    for response in responses:
        _nonempty(_content(response))
    if len(set(scores)) == 1:
        raise SkipRow("all scores tied")
    return "ranks", {"prompt": prompt, "responses": responses, "scores": scores}
