"""The data kinds in prefopt.registry.KINDS: how a canonical record becomes token features, and how a list of
features becomes the kind's typed batch (prefopt.types).

Tokenization rules, the same for every kind (prefopt.data.chat):

* plain strings: the prompt and each response are tokenized SEPARATELY with ``add_special_tokens=False`` and
  the ids concatenated, so the prompt / response boundary is exact; every response (sft completion, chosen,
  rejected, ranked responses, unpaired completion) ends with ``tokenizer.eos_token_id``;
* chat messages: rendered with the chat template ``data.chat_template`` selects, the prompt with the generation
  prompt added and each response as the assistant turn, as TRL 1.16 does (no EOS appended: the template ends the
  turn); as HH text when there is no template; prompts of the ``prompts`` kind get no EOS either way;
* the prompt is cut from the LEFT to ``max_prompt_length`` tokens, then each response from the right so that
  prompt + response <= ``max_length``; a response left with no token skips the row (SkipRow
  "prompt longer than max_length");
* ``text`` documents end with EOS and are packed into ``max_length`` chunks (prefopt.data.collate.pack).

A kind offers ``tokenize(record, tokenizer, cfg) -> feature`` (raises SkipRow to skip a row),
``prepare(features, cfg)`` (a pass over all features: packing for text), ``length(feature)`` (tokens, for
length bucketing) and ``collate(features, tokenizer) -> batch``.
"""

from __future__ import annotations

from typing import Any

from prefopt.config import DataConfig
from prefopt.data.chat import document_ids, prompt_and_response_ids, prompt_text_and_ids, sft_ids
from prefopt.data.collate import (IGNORE_INDEX, TOO_LONG, Feature, lm_batch, pack, pack_examples, pad_token_id,
                                  pair_batch, prompt_batch, rank_batch, unpaired_batch)
from prefopt.data.readers import SkipRow
from prefopt.registry import KINDS
from prefopt.types import LMBatch, PairBatch, PromptBatch, RankBatch, UnpairedBatch


def prompt_and_responses(tokenizer: Any, prompt: Any, responses: list[Any],
                         cfg: DataConfig) -> tuple[list[int], list[list[int]]]:
    """Prompt ids (left-truncated) and each response's ids (right-truncated to fit ``max_length``)."""
    return fit(*prompt_and_response_ids(tokenizer, prompt, responses, cfg.chat_template), cfg)


def fit(prompt_ids: list[int], response_ids: list[list[int]], cfg: DataConfig) -> tuple[list[int], list[list[int]]]:
    """The prompt cut from the left to ``max_prompt_length``, then each response from the right to ``max_length``;
    SkipRow when a response keeps no token."""
    prompt_ids = prompt_ids[-cfg.max_prompt_length:]
    room = cfg.max_length - len(prompt_ids)
    out = []
    for ids in response_ids:
        ids = ids[:room]
        if not ids:
            raise SkipRow(TOO_LONG)
        out.append(ids)
    return prompt_ids, out


class Kind:
    """Shared defaults: no dataset-level pass; length = all tokens of the feature's ``input_ids``."""

    def prepare(self, features: list[Feature], cfg: DataConfig) -> list[Feature]:
        return features

    def length(self, feature: Feature) -> int:
        return len(feature["input_ids"])


class PairsKind(Kind):
    """{prompt, chosen, rejected} -> PairBatch (chosen rows first, then rejected)."""

    def tokenize(self, record: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Feature:
        prompt_ids, (chosen, rejected) = prompt_and_responses(
            tokenizer, record["prompt"], [record["chosen"], record["rejected"]], cfg)
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected}

    def collate(self, features: list[Feature], tokenizer: Any) -> PairBatch:
        return pair_batch(features, pad_token_id(tokenizer))

    def length(self, feature: Feature) -> int:
        return len(feature["prompt_ids"]) + max(len(feature["chosen_ids"]), len(feature["rejected_ids"]))


class SFTKind(Kind):
    """{prompt, completion} -> LMBatch with labels -100 on the prompt tokens and the padding, except the prompt's own
    assistant turns of a conversation under ``data.assistant_turns: all`` (prefopt.data.chat.sft_ids).

    A feature's ``turns`` is ``[assistant turns carrying loss, assistant turns]`` of its row and ``prompt_length``
    where its last turn starts (``prefopt data`` shows both)."""

    def tokenize(self, record: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Feature:
        prompt_ids, spans, completion, earlier = sft_ids(tokenizer, record["prompt"], record["completion"],
                                                         cfg.chat_template, cfg.assistant_turns == "all")
        cut = max(len(prompt_ids) - cfg.max_prompt_length, 0)  # from the left, as every kind cuts its prompts
        completion = completion[:cfg.max_length - len(prompt_ids) + cut]
        if not completion:
            raise SkipRow(TOO_LONG)
        labels = [IGNORE_INDEX] * len(prompt_ids)
        kept = [(max(start, cut), end) for start, end in spans if end > cut]
        for start, end in kept:
            labels[start:end] = prompt_ids[start:end]
        return {"input_ids": prompt_ids[cut:] + completion, "labels": labels[cut:] + completion,
                "prompt_length": len(prompt_ids) - cut, "turns": [len(kept) + 1, earlier + 1]}

    def prepare(self, features: list[Feature], cfg: DataConfig) -> list[Feature]:
        """``data.packing``: examples packed into data.max_length sequences, each with its own positions and mask."""
        return pack_examples(features, cfg.max_length) if cfg.packing else features

    def collate(self, features: list[Feature], tokenizer: Any) -> LMBatch:
        return lm_batch(features, pad_token_id(tokenizer))


class TextKind(Kind):
    """{text} -> packed LMBatch: documents joined by EOS in max_length chunks (scored as one sequence each)."""

    def tokenize(self, record: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Feature:
        return {"input_ids": document_ids(tokenizer, record["text"], cfg.chat_template)}

    def prepare(self, features: list[Feature], cfg: DataConfig) -> list[Feature]:
        return pack([f["input_ids"] for f in features], cfg.max_length)

    def collate(self, features: list[Feature], tokenizer: Any) -> LMBatch:
        return lm_batch(features, pad_token_id(tokenizer))


class RanksKind(Kind):
    """{prompt, responses, scores} -> RankBatch with every (better, worse) pair of each prompt."""

    def tokenize(self, record: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Feature:
        prompt_ids, responses = prompt_and_responses(tokenizer, record["prompt"], record["responses"], cfg)
        return {"prompt_ids": prompt_ids, "response_ids": responses, "scores": list(record["scores"])}

    def collate(self, features: list[Feature], tokenizer: Any) -> RankBatch:
        return rank_batch(features, pad_token_id(tokenizer))

    def length(self, feature: Feature) -> int:
        return len(feature["prompt_ids"]) + max(len(r) for r in feature["response_ids"])


class PromptsKind(Kind):
    """{prompt, meta} -> PromptBatch, left-padded, no EOS after the prompt."""

    def tokenize(self, record: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Feature:
        text, prompt_ids = prompt_text_and_ids(tokenizer, record["prompt"], cfg.chat_template)
        return {"prompt_ids": prompt_ids[-cfg.max_prompt_length:], "prompt": text, "raw_prompt": record["prompt"],
                "meta": dict(record.get("meta", {}))}

    def collate(self, features: list[Feature], tokenizer: Any) -> PromptBatch:
        return prompt_batch(features, pad_token_id(tokenizer))

    def length(self, feature: Feature) -> int:
        return len(feature["prompt_ids"])


class UnpairedKind(Kind):
    """{prompt, completion, label} -> UnpairedBatch."""

    def tokenize(self, record: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> Feature:
        prompt_ids, (completion,) = prompt_and_responses(tokenizer, record["prompt"], [record["completion"]], cfg)
        return {"prompt_ids": prompt_ids, "completion_ids": completion, "label": bool(record["label"])}

    def collate(self, features: list[Feature], tokenizer: Any) -> UnpairedBatch:
        return unpaired_batch(features, pad_token_id(tokenizer))

    def length(self, feature: Feature) -> int:
        return len(feature["prompt_ids"]) + len(feature["completion_ids"])


PAIRS = KINDS.register("pairs")(PairsKind())
SFT = KINDS.register("sft")(SFTKind())
TEXT = KINDS.register("text")(TextKind())
RANKS = KINDS.register("ranks")(RanksKind())
PROMPTS = KINDS.register("prompts")(PromptsKind())
UNPAIRED = KINDS.register("unpaired")(UnpairedKind())
