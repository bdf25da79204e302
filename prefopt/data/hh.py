"""HH-RLHF dialogue text: split a dialogue into prompt and response, and render chat turns in the same style.

An HH dialogue is ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` with one or more turns. The prompt is everything
up to and including the LAST ``"\\n\\nAssistant:"``; the response is what follows, its leading space kept, so
``prompt + response == dialogue``. (``trl.data_utils.extract_prompt`` takes the character-level common
prefix of chosen and rejected instead, which cuts into responses that begin alike.)

Chat message lists (``{role, content}``) and ShareGPT turns (``{from, value}``) are rendered as HH text:
``"\\n\\nHuman: {user}\\n\\nAssistant: {assistant}"``; a system message is its own first line.
"""

from __future__ import annotations

from typing import Any

from prefopt.data.readers import SkipRow

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = {"user": "human", "human": "human", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system"}

Turn = tuple[str, str]  # (role: "system" | "human" | "assistant", content)


def split_hh(text: str) -> tuple[str, str]:
    """``(prompt, response)``: the prompt ends with the last "\\n\\nAssistant:"; SkipRow (a ValueError) if none."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise SkipRow("no assistant turn")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of two HH dialogues that share their prompt."""
    prompt, chosen_response = split_hh(chosen)
    rejected_prompt, rejected_response = split_hh(rejected)
    if rejected_prompt != prompt:
        raise SkipRow("chosen and rejected prompts differ")
    return prompt, chosen_response, rejected_response


def as_turns(value: Any, field: str, role: str) -> list[Turn]:
    """A chat list (``{role, content}`` or ``{from, value}`` items) as turns; a plain string is one ``role`` turn."""
    if isinstance(value, str):
        return [(role, value)]
    if not isinstance(value, list):
        raise SkipRow(f"field {field!r} is not a string or a message list")
    turns = []
    for item in value:
        if not isinstance(item, dict):
            raise SkipRow(f"field {field!r} is not a string or a message list")
        name = item.get("role", item.get("from"))
        content = item.get("content", item.get("value"))
        if not isinstance(name, str) or not isinstance(content, str):
            raise SkipRow(f"field {field!r} has a message without a string role and content")
        if name.lower() not in ROLES:
            raise SkipRow(f"unknown role {name!r}")
        turns.append((ROLES[name.lower()], content))
    return turns


def render(turns: list[Turn]) -> str:
    """HH text of the turns: ``"{system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}..."``."""
    out = ""
    for role, content in turns:
        if role == "system":
            out += content if not out else f"\n\n{content}"
        else:
            out += f"{HUMAN if role == 'human' else ASSISTANT} {content}"
    return out


def render_prompt(turns: list[Turn]) -> str:
    """The turns as an HH prompt that ends with "\\n\\nAssistant:"."""
    return render(turns) + ASSISTANT


def split_turns(turns: list[Turn]) -> tuple[str, str]:
    """``(prompt, response)``: the turns before the last assistant turn, and that turn (with a leading space)."""
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    if last < 0:
        raise SkipRow("no assistant turn")
    return render_prompt(turns[:last]), f" {turns[last][1]}"
