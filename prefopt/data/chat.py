"""Conversational rows: chat messages, and how a prompt and its responses become token ids.

A canonical record (prefopt.data.formats) holds either plain strings or chat messages
``[{"role": "system" | "user" | "assistant", "content": str}]`` (TRL's conversational format). Strings are used
as they are (HH-RLHF text stays HH text). Messages are rendered, as TRL 1.16 does for conversational data
(``trl.data_utils.apply_chat_template``; its DPO, KTO and SFT trainers tokenize the same way):

* with a chat template (``data.chat_template: auto`` and the tokenizer has one, or a template file):
  ``prompt_ids = template(prompt, add_generation_prompt=True)`` and, for each response,
  ``full = template(prompt + response)``; the response ids are ``full[n:]``, ``n`` the common prefix length of
  ``prompt_ids`` and every ``full`` (``trl.data_utils.common_prefix_length``). The response so ends as the template
  ends an assistant turn (ChatML: ``<|im_end|>\\n``), and no EOS is appended;
* without one (``data.chat_template: none``, or a tokenizer without a template): as HH text
  (prefopt.data.hh), the prompt ending with "\\n\\nAssistant:", each response " {content}" followed by EOS.

Strings and HH text are tokenized without special tokens, the prompt and each response separately, so the
prompt / response boundary is exact; every string response ends with ``tokenizer.eos_token_id``.

A conversation's assistant turns (``conversation_ids``, the SFT kind's ``data.assistant_turns: all``) are found as
TRL's ``assistant_only_loss`` finds them through ``{% generation %}`` markers, without needing the markers: turn i
spans from where ``template(messages[:i], add_generation_prompt=True)`` and the whole conversation part to where
``template(messages[:i + 1])`` and the whole conversation part (the turn's content and the template's end of turn).

Chat messages on a tokenizer without a chat template are an error under ``data.chat_template: auto`` (as TRL
raises): name a template (``chatml``, ``llama3``: prefopt.chat_templates; or a file), or ``none`` for HH text.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefopt.data.hh import ASSISTANT, Message, render, render_prompt, render_response
from prefopt.data.readers import SkipRow
from prefopt.chat_templates import SPECIAL_TOKENS, TEMPLATES
from prefopt.errors import DataError

log = logging.getLogger("prefopt.data")

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system"}

Text = str | list[Message]  # a prompt, response or document: a string, or chat messages


def as_messages(value: Any, field: str, role: str = "user") -> list[Message]:
    """Chat messages of a field: ``{role, content}`` or ShareGPT ``{from, value}`` items (or one such item); a
    plain string is one ``role`` message. SkipRow naming the field when it is neither."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SkipRow(f"field {field!r} is not a string or a message list")
    messages = []
    for item in value:
        if not isinstance(item, dict):
            raise SkipRow(f"field {field!r} is not a string or a message list")
        name = item.get("role") or item.get("from")
        content = item.get("content", item.get("value"))
        if not isinstance(name, str) or not isinstance(content, str):
            raise SkipRow(f"field {field!r} has a message without a string role and content")
        if name.lower() not in ROLES:
            raise SkipRow(f"field {field!r} has a message of unknown role {name!r}")
        messages.append({"role": ROLES[name.lower()], "content": content})
    return messages


def is_chat(value: Any) -> bool:
    return isinstance(value, list)


def template_of(tokenizer: Any, setting: str) -> str | None:
    """The chat template ``data.chat_template`` selects: the tokenizer's ("auto"; None when it has none), none
    ("none"), a named one (prefopt.chat_templates) or a file's text."""
    if setting == "none":
        return None
    if setting == "auto":
        template = getattr(tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template else None
    if setting in TEMPLATES:
        return TEMPLATES[setting]
    return _read_template(setting)


def chat_template(tokenizer: Any, setting: str) -> str | None:
    """The template chat messages are rendered with (None: as HH text, ``data.chat_template: none``).

    DataError when the setting is "auto" and the tokenizer has no template: TRL raises there too, and training a chat
    model on "Human: / Assistant:" text without saying so is worse."""
    template = template_of(tokenizer, setting)
    if template is None and setting != "none":
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DataError(f"conversational rows (chat messages), but the tokenizer of {name!r} has no chat template: "
                        f"set data.chat_template to {' or '.join(TEMPLATES)} (built in), a Jinja template file, or "
                        "none to render them as HH text (\\n\\nHuman: ... \\n\\nAssistant: ...) on purpose")
    return template


def install_template(tokenizer: Any, setting: str) -> None:
    """Give ``tokenizer`` the template a named or file ``data.chat_template`` selects, so that the saved model (and
    whatever loads it: generation, evaluation, the next stage) renders chat as training did. "auto" / "none": as is.

    A warning names the template's markers that are not single tokens of this tokenizer (``prefopt init-model
    --chat-template`` adds them)."""
    if setting in ("auto", "none"):
        return
    tokenizer.chat_template = template_of(tokenizer, setting)
    missing = [t for t in SPECIAL_TOKENS.get(setting, []) if t not in tokenizer.get_vocab()]
    if missing:
        log.warning("data.chat_template=%s: the tokenizer has no token %s; the template's markers are split into "
                    "ordinary tokens (a model made with `prefopt init-model --chat-template %s` has them)",
                    setting, ", ".join(missing), setting)


@lru_cache(maxsize=8)
def _read_template(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"data.chat_template {path!r}: cannot read the template file ({exc})") from exc


def describe_rendering(tokenizer: Any, setting: str) -> str:
    """One line on how chat messages are rendered under ``setting`` (for ``prefopt data``)."""
    if setting == "none":
        return "chat messages as HH text (data.chat_template: none)"
    if template_of(tokenizer, setting) is None:
        return "chat messages are refused: the tokenizer has no chat template (set data.chat_template)"
    source = ("the tokenizer's chat template" if setting == "auto" else f"the built-in {setting} template"
              if setting in TEMPLATES else f"the template file {setting}")
    return f"chat messages with {source}; plain strings as they are"


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos token; set tokenizer.eos_token (responses must end with it)")
    return tokenizer.eos_token_id


def template_ids(tokenizer: Any, messages: list[Message], template: str, add_generation_prompt: bool = False
                 ) -> list[int]:
    """Token ids of ``messages`` rendered by ``template`` (transformers' ``apply_chat_template``, as TRL calls it)."""
    try:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises its own types (TemplateError, ...); the row is unusable
        raise SkipRow(f"chat template failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}") from exc
    return list(out["input_ids"])


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    length = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        length += 1
    return length


def prompt_and_response_ids(tokenizer: Any, prompt: Text, responses: list[Text], setting: str
                            ) -> tuple[list[int], list[list[int]]]:
    """Untruncated ``(prompt_ids, [response_ids, ...])`` of a prompt and its responses (see the module docstring)."""
    if is_chat(prompt):
        template = chat_template(tokenizer, setting)
        if template is not None:
            prompt_ids = template_ids(tokenizer, prompt, template, add_generation_prompt=True)
            full = [template_ids(tokenizer, prompt + response, template) for response in responses]
            n = min(common_prefix_length(prompt_ids, ids) for ids in full)
            return prompt_ids[:n], [ids[n:] for ids in full]
        prompt, responses = render_prompt(prompt), [render_response(prompt, r) for r in responses]
    eos = eos_token_id(tokenizer)
    return encode(tokenizer, prompt), [encode(tokenizer, response) + [eos] for response in responses]


def sft_ids(tokenizer: Any, prompt: Text, completion: Text, setting: str, all_turns: bool
            ) -> tuple[list[int], list[tuple[int, int]], list[int], int]:
    """Untruncated ``(prompt_ids, spans, completion_ids, earlier)`` of an SFT row: the prompt and completion ids as
    ``prompt_and_response_ids`` gives them, the ``[start, end)`` token spans of the prompt's own assistant turns that
    carry loss too (``all_turns``; see the module docstring), and how many assistant turns the prompt holds.

    String prompts are prompt + completion (TRL's completion-only loss): no span; their earlier turns are the
    "\\n\\nAssistant:" markers before the last one."""
    if not is_chat(prompt):
        prompt_ids, (completion_ids,) = prompt_and_response_ids(tokenizer, prompt, [completion], setting)
        return prompt_ids, [], completion_ids, max(prompt.count(ASSISTANT) - 1, 0)
    earlier = [i for i, message in enumerate(prompt) if message["role"] == "assistant"]
    template = chat_template(tokenizer, setting)
    if not (all_turns and earlier):
        prompt_ids, (completion_ids,) = prompt_and_response_ids(tokenizer, prompt, [completion], setting)
        return prompt_ids, [], completion_ids, len(earlier)
    if template is not None:
        full = template_ids(tokenizer, prompt + completion, template)
        cut = common_prefix_length(template_ids(tokenizer, prompt, template, add_generation_prompt=True), full)
        spans = []
        for i in earlier:
            start = common_prefix_length(template_ids(tokenizer, prompt[:i], template, add_generation_prompt=True),
                                         full)
            end = common_prefix_length(template_ids(tokenizer, prompt[:i + 1], template), full)
            spans.append((start, min(end, cut)))
        return full[:cut], spans, full[cut:], len(earlier)
    text, ids, spans, start = render_prompt(prompt), [], [], 0
    for i in earlier:  # HH text, cut at each turn's edges, each piece tokenized on its own
        begin, end = len(render_prompt(prompt[:i])), len(render(prompt[:i + 1]))
        ids += encode(tokenizer, text[start:begin])
        turn = encode(tokenizer, text[begin:end])
        spans.append((len(ids), len(ids) + len(turn)))
        ids, start = ids + turn, end
    ids += encode(tokenizer, text[start:])
    return ids, spans, encode(tokenizer, render_response(prompt, completion)) + [eos_token_id(tokenizer)], len(earlier)


def prompt_text_and_ids(tokenizer: Any, prompt: Text, setting: str) -> tuple[str, list[int]]:
    """A generation prompt as text and ids: templated with the generation prompt added, HH text, or the string."""
    if is_chat(prompt):
        template = chat_template(tokenizer, setting)
        if template is not None:
            text = tokenizer.apply_chat_template(prompt, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
            return text, template_ids(tokenizer, prompt, template, add_generation_prompt=True)
        prompt = render_prompt(prompt)
    return prompt, encode(tokenizer, prompt)


def document_ids(tokenizer: Any, text: Text, setting: str) -> list[int]:
    """A document for language modelling: a templated conversation, or the string (HH text) followed by EOS."""
    if is_chat(text):
        template = chat_template(tokenizer, setting)
        if template is not None:
            return template_ids(tokenizer, text, template)
        text = render(text)
    return encode(tokenizer, text) + [eos_token_id(tokenizer)]
