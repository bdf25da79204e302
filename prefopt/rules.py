"""Sparrow's rules (Glaese et al. 2022, arXiv 2209.14375): rule heads and programmatic rules.

Sparrow adds to its preference reward one term per rule k, the probability that the dialogue does NOT break it:

    r_rules(x, y) = sum_k w_k * P(rule k not violated | x, y) = sum_k w_k * sigmoid(-z_k(x, y))

Learned rules: a rule head (a copy of the top blocks on the shared trunk + a K-way linear read at the last token)
outputs one logit z_k = logit P(rule k violated) per rule: multi-label classification trained with binary
cross-entropy on rows ``{"text": dialogue, "rule": name, "violated": bool}`` (one JSON object per line; the rows
of one text are grouped, rules a text has no label for are masked out). A training text is tokenized like a
response of the data layer: without special tokens, with EOS appended (rollouts that stopped end with EOS).

Programmatic rules need no labels: a registered function ``fn(prompt, response) -> violated`` gives
P(not violated) in {0, 1}. They can also label texts (``label_rows``) to train a head where no human labels exist.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.data.readers import read_json_lines
from prefopt.errors import DataError
from prefopt.registry import Registry
from prefopt.sparrow import SequenceHead, Top, TrunkOutput
from prefopt.types import _Batch

RuleFn = Callable[[str, str], bool]
RULES: Registry[RuleFn] = Registry("programmatic rule")
"""Programmatic rules: ``fn(prompt, response) -> True when the response violates the rule``."""


@RULES.register("no_new_human_turn")
def no_new_human_turn(prompt: str, response: str) -> bool:
    """The assistant must not write the user's next turn ("Human:" at the start of a line)."""
    return re.search(r"(^|\n)\s*Human:", response) is not None


@RULES.register("no_url")
def no_url(prompt: str, response: str) -> bool:
    """No links: the assistant cannot vouch for them (Sparrow cites evidence instead)."""
    return re.search(r"https?://|www\.\w", response, flags=re.IGNORECASE) is not None


@RULES.register("no_email")
def no_email(prompt: str, response: str) -> bool:
    """No e-mail addresses (personal information)."""
    return re.search(r"[\w.+-]+@[\w-]+\.[\w.]+", response) is not None


def programmatic_ok(names: Iterable[str], prompts: list[str], responses: list[str],
                    device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """{rule: P(not violated) [B]} for programmatic rules: 1.0 where the response keeps the rule, else 0.0."""
    out = {}
    for name in names:
        rule = RULES.get(name)
        out[name] = torch.tensor([0.0 if rule(p, r) else 1.0 for p, r in zip(prompts, responses)], device=device)
    return out


def label_rows(dialogues: Iterable[tuple[str, str]], names: Iterable[str]) -> list[dict]:
    """``{text, rule, violated}`` rows for (prompt, response) pairs, labelled by the programmatic rules."""
    names = list(names)
    return [{"text": prompt + response, "rule": name, "violated": bool(RULES.get(name)(prompt, response))}
            for prompt, response in dialogues for name in names]


def read_rule_rows(path: str | Path) -> list[dict]:
    """Rows ``{text: str, rule: str, violated: bool}`` from a .jsonl file; a bad row is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"rule data {str(path)!r} not found (expected .jsonl rows {{text, rule, violated}})")
    rows = []
    for number, row in read_json_lines(path):
        check_row(row, f"{path}:{number}")
        rows.append(row)
    return rows


def check_row(row: object, where: str) -> None:
    if not (isinstance(row, dict) and isinstance(row.get("text"), str) and isinstance(row.get("rule"), str)
            and isinstance(row.get("violated"), bool)):
        raise DataError(f"{where}: expected {{text: str, rule: str, violated: bool}}, got {row!r:.200}")


@dataclass
class RuleBatch(_Batch):
    """Texts with multi-label rule labels (K = number of rules of the head)."""

    input_ids: Tensor  # [N, T] text + EOS, right-padded
    attention_mask: Tensor  # [N, T]
    labels: Tensor  # [N, K] float: 1 = violated
    label_mask: Tensor  # [N, K] float: 1 where the text has a label for rule k


def rule_batches(rows: list[dict], names: list[str], tokenizer, batch_size: int, max_length: int,
                 seed: int = 0) -> list[RuleBatch]:
    """Group rows by text, encode, shuffle (seeded) and batch. Rows of rules not in ``names`` are left out."""
    index = {name: k for k, name in enumerate(names)}
    texts: dict[str, dict[int, bool]] = {}
    for row in rows:
        if row["rule"] in index:
            texts.setdefault(row["text"], {})[index[row["rule"]]] = row["violated"]
    if not texts:
        raise DataError(f"no rule rows for the rules {names}")
    items = list(texts.items())
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start:start + batch_size]]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"][-(max_length - 1):] + [tokenizer.eos_token_id]
               for text, _ in chunk]
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.zeros(len(chunk), len(names))
        label_mask = torch.zeros(len(chunk), len(names))
        for i, (row, (_, marks)) in enumerate(zip(ids, chunk)):
            input_ids[i, :len(row)] = torch.tensor(row)
            attention_mask[i, :len(row)] = 1
            for k, violated in marks.items():
                labels[i, k], label_mask[i, k] = float(violated), 1.0
        batches.append(RuleBatch(input_ids, attention_mask, labels, label_mask))
    return batches


class RuleHead(SequenceHead):
    """Multi-label rule classifier on the trunk: logits z_k = logit P(rule k violated), [B, K]."""

    def __init__(self, top: Top, hidden_size: int, names: list[str]):
        super().__init__(top, hidden_size, outputs=len(names))
        self.names = list(names)

    def p_not_violated(self, features: TrunkOutput) -> Tensor:
        """P(rule k not violated) = sigmoid(-z_k), [B, K]."""
        return torch.sigmoid(-self(features))


def rule_loss(logits: Tensor, batch: RuleBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """Binary cross-entropy over the labelled (text, rule) entries, and their accuracy at P = 0.5."""
    per_entry = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
    count = batch.label_mask.sum().clamp(min=1)
    loss = (per_entry * batch.label_mask).sum() / count
    correct = ((logits > 0).float() == batch.labels).float() * batch.label_mask
    return loss, {"rules/accuracy": correct.sum() / count}
