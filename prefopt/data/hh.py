"""HH-RLHF dialogue text: split a dialogue into prompt and response, and render chat messages in the same style.

An HH dialogue is ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` with one or more turns. The prompt is everything
up to and including the LAST ``"\\n\\nAssistant:"``; the response is what follows, its leading space kept, so
``prompt + response == dialogue``. (``trl.data_utils.extract_prompt`` takes the character-level common
prefix of chosen and rejected instead, which cuts into responses that begin alike.)

Chat messages (``{role, content}``, prefopt.data.chat) are rendered as HH text when the tokenizer has no chat
template (or ``data.chat_template: none``): ``"\\n\\nHuman: {user}\\n\\nAssistant: {assistant}"``; a system
message is its own first line.
"""

from __future__ import annotations

from typing import Any

from prefopt.data.readers import SkipRow

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

Message = dict[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}


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


def render(messages: list[Message]) -> str:
    """HH text of the messages: ``"{system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}..."``."""
    out = ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            out += content if not out else f"\n\n{content}"
        else:
            out += f"{ASSISTANT if role == 'assistant' else HUMAN} {content}"
    return out


def render_prompt(messages: list[Message]) -> str:
    """The messages as an HH prompt that ends with "\\n\\nAssistant:"."""
    return render(messages) + ASSISTANT


def render_response(prompt: list[Message], response: list[Message]) -> str:
    """The HH text that ``response`` adds after ``render_prompt(prompt)`` (" {assistant}" for one assistant turn)."""
    return render(prompt + response)[len(render_prompt(prompt)):]
