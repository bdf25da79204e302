"""Tokenization and typed batches of every kind, with a tiny byte-level BPE tokenizer trained on HH rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prefopt.config import DataConfig
from prefopt.data import build_dataloader, load_rows, pack
from prefopt.data.chat import encode
from prefopt.errors import DataError
from prefopt.registry import KINDS
from prefopt.types import LMBatch, PairBatch, PromptBatch, RankBatch, UnpairedBatch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH = DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
EOS = "<|endoftext|>"
WIDE = DataConfig(max_length=1024, max_prompt_length=1024)

pytestmark = pytest.mark.skipif(not HH.is_file(), reason=f"shared data {DATA} is missing")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE, vocab 512, trained on 300 HH dialogues; eos = pad = <|endoftext|>."""
    with gzip.open(HH, "rt", encoding="utf-8") as lines:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(300), lines)]
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=[EOS], show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return load_rows(DataConfig(path=str(HH), eval_fraction=0.0), "pairs").train


def one_batch(records, kind, tokenizer, cfg=WIDE, batch_size=64):
    loader, skipped = build_dataloader(records, kind, tokenizer, cfg, batch_size=batch_size, shuffle=False, seed=0)
    return next(iter(loader)), skipped


def test_every_kind_is_registered():
    assert {"pairs", "sft", "text", "ranks", "prompts", "unpaired"} <= set(KINDS.available())


def test_pair_batch_marks_exactly_the_response_tokens(pairs, tokenizer):
    records = pairs[:4]
    batch, skipped = one_batch(records, "pairs", tokenizer)
    assert isinstance(batch, PairBatch) and skipped == {}
    lengths = batch.attention_mask.sum(1)
    assert batch.input_ids.shape == (8, int(lengths.max())) and batch.index.tolist() == [0, 1, 2, 3]
    for row in range(8):
        record, key = records[row % 4], ("chosen" if row < 4 else "rejected")
        ids = batch.input_ids[row, : lengths[row]]
        mask = batch.completion_mask[row, : lengths[row]].bool()
        assert tokenizer.decode(ids[mask]) == record[key] + EOS
        assert tokenizer.decode(ids[~mask]) == record["prompt"]
        assert batch.completion_mask[row, lengths[row]:].sum() == 0 and batch.attention_mask[row, : lengths[row]].all()
    assert torch.equal(batch.input_ids[:4][batch.completion_mask[:4] == 0][:10],
                       batch.input_ids[4:][batch.completion_mask[4:] == 0][:10])  # same prompt ids


def test_truncation_keeps_the_prompt_end_and_the_response_start(pairs, tokenizer):
    cfg = DataConfig(max_length=64, max_prompt_length=40)
    record = max(pairs[:20], key=lambda r: len(r["prompt"]))
    batch, _ = one_batch([record], "pairs", tokenizer, cfg)
    prompt_ids = encode(tokenizer, record["prompt"])
    assert len(prompt_ids) > 40 and batch.input_ids.shape[1] <= 64
    row = batch.input_ids[0, : int(batch.attention_mask[0].sum())]
    mask = batch.completion_mask[0, : len(row)].bool()
    assert row[~mask].tolist() == prompt_ids[-40:]
    chosen_ids = encode(tokenizer, record["chosen"]) + [tokenizer.eos_token_id]
    assert row[mask].tolist() == chosen_ids[: 64 - 40]


def test_prompt_longer_than_max_length_is_skipped_and_counted(tokenizer):
    cfg = DataConfig(max_length=8, max_prompt_length=8)
    records = [{"prompt": "Hi", "chosen": " Yes.", "rejected": " No."},
               {"prompt": "\n\nHuman: " + "tell me a long story " * 10 + "\n\nAssistant:", "chosen": " Yes.",
                "rejected": " No."}]
    loader, skipped = build_dataloader(records, "pairs", tokenizer, cfg, batch_size=2, shuffle=False, seed=0)
    assert skipped == {"prompt longer than max_length": 1}
    assert next(iter(loader)).index.tolist() == [0]


def test_sft_labels_ignore_prompt_and_padding(pairs, tokenizer):
    records = load_rows(DataConfig(path=str(HH), eval_fraction=0.0, max_examples=3), "sft").train
    batch, _ = one_batch(records, "sft", tokenizer)
    assert isinstance(batch, LMBatch)
    for row, record in enumerate(records):
        n_prompt = len(encode(tokenizer, record["prompt"]))
        n = int(batch.attention_mask[row].sum())
        assert (batch.labels[row, :n_prompt] == -100).all() and (batch.labels[row, n:] == -100).all()
        assert torch.equal(batch.labels[row, n_prompt:n], batch.input_ids[row, n_prompt:n])
        assert tokenizer.decode(batch.labels[row, n_prompt:n]) == record["completion"] + EOS


def test_prompts_are_left_padded_without_eos(tokenizer):
    records = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "meta": {"ref": "a"}},
               {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:", "meta": {}}]
    batch, _ = one_batch(records, "prompts", tokenizer)
    assert isinstance(batch, PromptBatch)
    short = len(encode(tokenizer, records[0]["prompt"]))
    width = batch.input_ids.shape[1]
    assert width == len(encode(tokenizer, records[1]["prompt"])) > short
    assert batch.attention_mask[0].tolist() == [0] * (width - short) + [1] * short
    assert tokenizer.decode(batch.input_ids[0, width - short:]) == records[0]["prompt"]
    assert batch.input_ids[1, -1] != tokenizer.eos_token_id
    assert batch.prompts == [r["prompt"] for r in records] and batch.meta == [{"ref": "a"}, {}]


def test_pack_fills_chunks():
    docs = [[1] * 5, [2] * 3, [3] * 9, [4] * 2]
    chunks = pack(docs, 6)
    assert chunks == [{"input_ids": ids} for ids in ([1, 1, 1, 1, 1, 2], [2, 2, 3, 3, 3, 3], [3, 3, 3, 3, 3, 4], [4])]


def test_text_kind_packs_documents_into_max_length_chunks(tokenizer):
    records = load_rows(DataConfig(path=str(HH), eval_fraction=0.0, max_examples=40), "text").train
    cfg = DataConfig(max_length=128, max_prompt_length=64)
    loader, _ = build_dataloader(records, "text", tokenizer, cfg, batch_size=4, shuffle=False, seed=0)
    batches = list(loader)
    total = sum(len(encode(tokenizer, r["text"])) + 1 for r in records)
    assert sum(b.num_tokens for b in batches) == total  # no token lost, one EOS per document
    full = torch.cat([b.input_ids for b in batches[:-1]])
    assert full.shape[1] == 128 and (batches[-1].input_ids.shape[1] <= 128)
    for batch in batches[:-1]:
        assert torch.equal(batch.labels, batch.input_ids) and batch.attention_mask.all()
    assert int((full == tokenizer.eos_token_id).sum()) == 40 - sum(
        int((b.input_ids == tokenizer.eos_token_id).sum()) for b in batches[-1:])


def test_ranks_give_every_ordered_pair_per_prompt(tokenizer):
    records = [{"prompt": "P", "responses": [" a", " b", " c"], "scores": [1.0, 0.0, 2.0]},
               {"prompt": "Q", "responses": [" x", " y", " z"], "scores": [1.0, 1.0, 0.0]}]
    batch, _ = one_batch(records, "ranks", tokenizer)
    assert isinstance(batch, RankBatch) and batch.input_ids.shape[0] == 6
    assert batch.pairs.tolist() == [[2, 0], [2, 1], [0, 1], [3, 5], [4, 5]]  # better first; the tie 3-4 skipped
    assert batch.pair_group.tolist() == [0, 0, 0, 1, 1]
    assert batch.margins.tolist() == [1.0, 2.0, 1.0, 1.0, 1.0]
    assert tokenizer.decode(batch.input_ids[2, : int(batch.attention_mask[2].sum())]) == "P c" + EOS


def test_unpaired_batch(pairs, tokenizer):
    records = load_rows(DataConfig(path=str(HH), eval_fraction=0.0, max_examples=4), "unpaired").train
    batch, _ = one_batch(records, "unpaired", tokenizer)
    assert isinstance(batch, UnpairedBatch) and batch.desirable.tolist() == [True, False, True, False]
    for row, record in enumerate(records):
        ids = batch.input_ids[row][batch.completion_mask[row].bool()]
        assert tokenizer.decode(ids) == record["completion"] + EOS


def test_missing_pad_token_is_a_clear_error(pairs, tokenizer):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=EOS)
    with pytest.raises(DataError, match="tokenizer has no pad token; set one"):
        build_dataloader(pairs[:2], "pairs", bare, WIDE, batch_size=2, shuffle=False, seed=0)


def padding_fraction(loader) -> float:
    pad = total = 0
    for batch in loader:
        pad += int((batch.attention_mask == 0).sum())
        total += batch.attention_mask.numel()
    return pad / total


def test_length_bucketing_cuts_padding_and_is_reproducible(pairs, tokenizer):
    cfg = DataConfig(max_length=512, max_prompt_length=256)
    random_loader, _ = build_dataloader(pairs, "pairs", tokenizer, cfg, batch_size=8, shuffle=True, seed=1)
    bucket_loader, _ = build_dataloader(pairs, "pairs", tokenizer, cfg, batch_size=8, shuffle=True, seed=1,
                                        length_bucketing=True)
    random_pad, bucket_pad = padding_fraction(random_loader), padding_fraction(bucket_loader)
    # measured: 48.6% of the tokens are padding in random batches, 12.9% in length buckets
    assert random_pad > 0.45 and bucket_pad < 0.14 and bucket_pad / random_pad < 0.3, (random_pad, bucket_pad)
    seen = sorted(i for batch in bucket_loader for i in batch.index.tolist())
    assert seen == list(range(len(pairs))) and len(bucket_loader) == 249  # every pair once per epoch

    def order(seed: int, epochs: int = 2) -> list[list[list[int]]]:
        loader, _ = build_dataloader(pairs[:200], "pairs", tokenizer, cfg, batch_size=8, shuffle=True, seed=seed,
                                     length_bucketing=True)
        return [[batch.index.tolist() for batch in loader] for _ in range(epochs)]

    first = order(seed=1)
    assert first == order(seed=1) and first != order(seed=2)
    assert first[0] != first[1]  # each epoch draws a new order from the seeded generator


# ------------------------------------------------------------------------------------------------ SFT packing
def test_packed_sft_examples_score_as_they_do_alone(llama_chat_dir, tmp_path):
    """data.packing: examples packed best-fit into max_length sequences; with their own positions and a causal mask
    of their own, every token's log-prob equals the unpacked one (exact attention boundaries)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.algorithms.lm import lm_nll
    from prefopt.data.collate import lm_batch, pack_examples
    from prefopt.scoring import TokenScorer

    tokenizer = AutoTokenizer.from_pretrained(llama_chat_dir)
    rows = [{"messages": [{"role": "user", "content": f"Question number {i}?" * (1 + i % 3)},
                          {"role": "assistant", "content": "An answer." * (1 + i % 4)}]} for i in range(9)]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(path=str(path), eval_fraction=0.0, max_length=96, max_prompt_length=64)
    features = [KINDS.get("sft").tokenize(r, tokenizer, cfg) for r in load_rows(cfg, "sft").train]
    packed = pack_examples(features, cfg.max_length)
    assert len(packed) < len(features) and all(len(f["input_ids"]) <= 96 for f in packed)
    assert sum(f["examples"] for f in packed) == len(features)
    scorer = TokenScorer(AutoModelForCausalLM.from_pretrained(llama_chat_dir, dtype=torch.float32).eval())

    def logps(*args, **kwargs):
        return scorer(*args, **kwargs)[0]

    with torch.no_grad():
        alone = lm_nll(logps, lm_batch(features, tokenizer.pad_token_id))
        together = lm_nll(logps, lm_batch(packed, tokenizer.pad_token_id))
    assert together[1] == alone[1] > 0  # the same loss tokens
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-4)
