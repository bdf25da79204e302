"""Tensors from token features: padding, sequence packing, the typed batches of each kind, and the DataLoader.

Features are plain dicts of token id lists made by the kinds in prefopt.data.kinds. Rows are right-padded
with the tokenizer's pad token (prompts for generation are left-padded); ``labels`` are -100 where no loss is
taken. ``build_dataloader`` tokenizes records, counts the rows a kind skips, and batches them, optionally in
length buckets (rows of similar length together, so less padding) with a seeded, reproducible order.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from prefopt.config import DataConfig
from prefopt.data.readers import SkipLog, SkipRow
from prefopt.errors import DataError
from prefopt.registry import KINDS
from prefopt.types import LMBatch, PairBatch, PromptBatch, RankBatch, UnpairedBatch

IGNORE_INDEX = -100
TOO_LONG = "prompt longer than max_length"  # the SkipRow reason of a row whose response gets no token
MEGA_BATCHES = 50
log = logging.getLogger("prefopt.data")

Feature = dict[str, Any]


def pad_token_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is None:
        raise DataError("tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token; "
                        "prefopt's model loader sets pad = eos when the tokenizer has none)")
    return tokenizer.pad_token_id


def pad(rows: list[list[int]], value: int, left: bool = False) -> Tensor:
    """``[len(rows), longest]`` long tensor, each row padded with ``value`` on the right (or the left)."""
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        values = torch.tensor(row, dtype=torch.long)
        if left:
            out[i, width - len(row):] = values
        else:
            out[i, :len(row)] = values
    return out


def pack(docs: list[list[int]], max_length: int) -> list[Feature]:
    """Concatenate token documents (each ending with EOS) into chunks of exactly ``max_length`` tokens.

    Only the last chunk may be shorter. A chunk is scored as one sequence (positions 0..T-1, attention across the
    documents in it), as transformers' run_clm trains on packed text.
    """
    chunks: list[Feature] = []
    ids: list[int] = []
    for doc in docs:
        offset = 0
        while offset < len(doc):
            take = min(max_length - len(ids), len(doc) - offset)
            ids += doc[offset:offset + take]
            offset += take
            if len(ids) == max_length:
                chunks.append({"input_ids": ids})
                ids = []
    if ids:
        chunks.append({"input_ids": ids})
    return chunks


def pack_examples(features: list[Feature], max_length: int) -> list[Feature]:
    """SFT examples packed into sequences of at most ``max_length`` tokens, best-fit decreasing (TRL's
    ``packing_strategy="bfd"``): longest first, each into the fullest sequence it still fits.

    A packed feature keeps every example whole, with ``position_ids`` counting from 0 in each (where the next example
    starts) and the label of each example's first token -100 (it would be predicted from the example before it);
    the SFT forward gives each example a causal mask of its own (prefopt.algorithms.lm), so every token sees only
    its example, as unpacked."""
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"])):
        size = len(features[i]["input_ids"])
        at = bisect.bisect_left(rooms, (size, -1))
        if at == len(rooms):
            bins.append([])
            room, where = max_length, len(bins) - 1
        else:
            room, where = rooms.pop(at)
        bins[where].append(i)
        bisect.insort(rooms, (room - size, where))
    packed = []
    for members in bins:
        parts = [features[i] for i in sorted(members)]
        packed.append({"input_ids": [t for f in parts for t in f["input_ids"]],
                       "labels": [t for f in parts for t in [IGNORE_INDEX] + f["labels"][1:]],
                       "position_ids": [t for f in parts for t in range(len(f["input_ids"]))],
                       "turns": [sum(f["turns"][k] for f in parts) for k in (0, 1)], "examples": len(parts)})
    return packed


def _ones(rows: list[list[int]]) -> list[list[int]]:
    return [[1] * len(row) for row in rows]


def lm_batch(features: list[Feature], pad_id: int) -> LMBatch:
    """Causal-LM rows; ``labels`` from the feature (sft) or the input ids (packed text); the position ids of packed
    SFT examples (``pack_examples``)."""
    rows = [f["input_ids"] for f in features]
    positions = pad([f["position_ids"] for f in features], 0) if "position_ids" in features[0] else None
    return LMBatch(input_ids=pad(rows, pad_id), attention_mask=pad(_ones(rows), 0),
                   labels=pad([f.get("labels", f["input_ids"]) for f in features], IGNORE_INDEX),
                   position_ids=positions)


def pair_batch(features: list[Feature], pad_id: int) -> PairBatch:
    """Prompt + chosen rows first, then prompt + rejected rows; ``completion_mask`` 1 on the responses."""
    rows, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            rows.append(f["prompt_ids"] + f[key])
            masks.append([0] * len(f["prompt_ids"]) + [1] * len(f[key]))
    return PairBatch(input_ids=pad(rows, pad_id), attention_mask=pad(_ones(rows), 0), completion_mask=pad(masks, 0),
                     index=torch.tensor([f["index"] for f in features], dtype=torch.long))


def rank_batch(features: list[Feature], pad_id: int) -> RankBatch:
    """One row per completion; every (better, worse) pair of a prompt, best-ranked first, ties skipped."""
    rows: list[list[int]] = []
    pairs: list[tuple[int, int]] = []
    groups: list[int] = []
    margins: list[float] = []
    for group, f in enumerate(features):
        base, scores = len(rows), f["scores"]
        rows += [f["prompt_ids"] + response for response in f["response_ids"]]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        for place, better in enumerate(order):
            for worse in order[place + 1:]:
                if scores[better] > scores[worse]:
                    pairs.append((base + better, base + worse))
                    groups.append(group)
                    margins.append(scores[better] - scores[worse])
    return RankBatch(input_ids=pad(rows, pad_id), attention_mask=pad(_ones(rows), 0),
                     pairs=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
                     pair_group=torch.tensor(groups, dtype=torch.long), margins=torch.tensor(margins))


def prompt_batch(features: list[Feature], pad_id: int) -> PromptBatch:
    """Prompts LEFT-padded for generation, with their texts and meta."""
    rows = [f["prompt_ids"] for f in features]
    return PromptBatch(input_ids=pad(rows, pad_id, left=True), attention_mask=pad(_ones(rows), 0, left=True),
                       prompts=[f["prompt"] for f in features], meta=[f["meta"] for f in features],
                       raw_prompts=[f.get("raw_prompt", f["prompt"]) for f in features])


def unpaired_batch(features: list[Feature], pad_id: int) -> UnpairedBatch:
    """Prompt + completion rows with their desirable / undesirable labels."""
    rows = [f["prompt_ids"] + f["completion_ids"] for f in features]
    masks = [[0] * len(f["prompt_ids"]) + [1] * len(f["completion_ids"]) for f in features]
    return UnpairedBatch(input_ids=pad(rows, pad_id), attention_mask=pad(_ones(rows), 0), completion_mask=pad(masks, 0),
                         desirable=torch.tensor([f["label"] for f in features], dtype=torch.bool),
                         index=torch.tensor([f["index"] for f in features], dtype=torch.long))


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of rows of similar length: rows are shuffled, cut into mega-batches of ``MEGA_BATCHES`` batches,
    sorted by length inside each, cut into batches, and the batch order is shuffled (all with ``generator``).
    ``drop_last``: the one short batch (of the last mega-batch) is left out."""

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, generator: torch.Generator,
                 drop_last: bool = False):
        self.lengths = lengths
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        order = torch.randperm(n, generator=self.generator).tolist() if self.shuffle else list(range(n))
        size = self.batch_size * MEGA_BATCHES
        batches = []
        for start in range(0, n, size):
            mega = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches += [mega[i:i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
        return iter(batches)

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.lengths) // self.batch_size
        return math.ceil(len(self.lengths) / self.batch_size)


def too_long_hint(skipped: dict[str, int], cfg: DataConfig) -> str:
    """What to change when rows were skipped for a prompt that leaves no room in ``max_length``."""
    if not skipped.get(TOO_LONG):
        return ""
    return (f" (a prompt keeps up to data.max_prompt_length={cfg.max_prompt_length} of data.max_length="
            f"{cfg.max_length} tokens, leaving no room for its response: raise data.max_length or lower "
            "data.max_prompt_length)")


def build_dataloader(records: list[dict[str, Any]], kind: str, tokenizer: Any, cfg: DataConfig, batch_size: int,
                     shuffle: bool, seed: int, length_bucketing: bool = False, skips: SkipLog | None = None,
                     places: list[str] | None = None, drop_last: bool = False,
                     split: str = "") -> tuple[DataLoader, dict[str, int]]:
    """Tokenize ``records`` as ``kind`` and batch them into that kind's typed container.

    Returns the DataLoader and the counts of rows skipped at tokenization per reason; with ``skips``, each
    skipped row is also added there with its place (``places[i]`` of record i, else "record i"). Each feature
    keeps its record's position in ``records`` as ``"index"``. The order is drawn from a ``torch.Generator``
    seeded with ``seed``, so two runs with the same seed see the same batches. ``drop_last``: no short batch.
    ``split`` (train, eval) names the rows in the warning about skipped rows.
    """
    handler = KINDS.get(kind)
    pad_token_id(tokenizer)
    skipped: Counter[str] = Counter()
    features = []
    for index, record in enumerate(records):
        try:
            feature = handler.tokenize(record, tokenizer, cfg)
        except SkipRow as exc:
            skipped[exc.reason] += 1
            if skips is not None:
                skips.add(exc.reason, places[index] if places is not None else f"record {index}")
            continue
        feature["index"] = index
        features.append(feature)
    features = handler.prepare(features, cfg)
    if skipped:
        log.warning("%s%s rows skipped at tokenization: %s of %d%s", kind, f" {split}" if split else "",
                    ", ".join(f"{n} {r}" for r, n in skipped.items()), len(records), too_long_hint(skipped, cfg))
    if not features:
        raise DataError(f"no {kind} rows left after tokenization of {len(records)} records "
                        f"(skipped: {dict(skipped)}){too_long_hint(skipped, cfg)}")
    generator = torch.Generator().manual_seed(seed)
    if length_bucketing:
        batches: Sampler = LengthBucketSampler([handler.length(f) for f in features], batch_size, shuffle, generator,
                                               drop_last)
    else:
        order = RandomSampler(features, generator=generator) if shuffle else SequentialSampler(features)
        batches = BatchSampler(order, batch_size, drop_last=drop_last)
    loader = DataLoader(features, batch_sampler=batches, collate_fn=partial(handler.collate, tokenizer=tokenizer))
    return loader, dict(skipped)
