"""The formats people bring, each parsed into the right prompt / response split, checked on the text decoded from
the token ids (ChatML fixture): UltraFeedback-binarized (user turn once; scores as ranking margins), raw
UltraFeedback (K-wise rankings), TRL conversational prompt-completion and KTO, LLaMA-Factory preference (alpaca
and sharegpt, with a system turn), OpenAI-style messages; wrong fields are skipped with the format named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from prefopt.config import DataConfig
from prefopt.data import build_dataloader, load_rows
from prefopt.data.kinds import PAIRS, RANKS, SFT, UNPAIRED

IM_USER = "<|im_start|>user\n"
IM_BOT = "<|im_start|>assistant\n"
END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(qwen2_window_dir):
    return AutoTokenizer.from_pretrained(qwen2_window_dir)


def rows_file(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(path: Path, kind: str):
    cfg = DataConfig(path=str(path), eval_fraction=0.0, max_length=1024, max_prompt_length=512)
    return load_rows(cfg, kind), cfg


def decoded(tokenizer, feature: dict, *keys: str) -> list[str]:
    return [tokenizer.decode(feature[key]) for key in keys]


def ufb_row(question: str, good: str, bad: str, score_good, score_bad) -> dict:
    conversation = [{"role": "user", "content": question}]
    return {"prompt": question, "prompt_id": "x", "score_chosen": score_good, "score_rejected": score_bad,
            "chosen": conversation + [{"role": "assistant", "content": good}],
            "rejected": conversation + [{"role": "assistant", "content": bad}],
            "messages": conversation + [{"role": "assistant", "content": good}]}


def test_ultrafeedback_binarized_user_turn_once_and_scores_as_margins(tmp_path, tokenizer):
    path = rows_file(tmp_path, [ufb_row("Name a prime.", "Seven.", "Eight.", 9.0, 3.5),
                                ufb_row("Say hi.", "Hi!", "No.", 5, 5),              # tied: no ranking
                                ufb_row("Add 2 and 2.", "4", "5", "high", 1.0)])     # score not a number
    pairs, cfg = load(path, "pairs")
    assert pairs.formats == {"ultrafeedback": 3} and len(pairs.train) == 2
    assert pairs.skipped == {"ultrafeedback: field 'score_chosen' is not a number": 1}
    record = next(r for r in pairs.train if r["prompt"][0]["content"] == "Name a prime.")
    assert set(record) == {"prompt", "chosen", "rejected"}
    prompt, chosen, rejected = decoded(tokenizer, PAIRS.tokenize(record, tokenizer, cfg),
                                       "prompt_ids", "chosen_ids", "rejected_ids")
    assert prompt == f"{IM_USER}Name a prime.{END}{IM_BOT}"  # the user turn once, not twice
    assert (chosen, rejected) == (f"Seven.{END}", f"Eight.{END}")
    ranks, _ = load(path, "ranks")
    assert [r["scores"] for r in ranks.train] == [[9.0, 3.5]]
    assert ranks.skipped == {"ultrafeedback: all scores tied": 1,
                             "ultrafeedback: field 'score_chosen' is not a number": 1}
    loader, _ = build_dataloader(ranks.train, "ranks", tokenizer, cfg, batch_size=1, shuffle=False, seed=0)
    batch = next(iter(loader))
    assert batch.pairs.tolist() == [[0, 1]] and batch.margins.tolist() == [5.5]


def test_raw_ultrafeedback_is_one_k_wise_ranking(tmp_path, tokenizer):
    completions = [{"model": f"m{i}", "response": text, "fine-grained_score": score, "overall_score": 1.0}
                   for i, (text, score) in enumerate([("Paris.", 4.75), ("Lyon.", 1.5), ("It is Paris, France.", 4.0),
                                                      ("I am not sure.", 2.25)])]
    path = rows_file(tmp_path, [
        {"source": "evol", "instruction": "What is the capital of France?", "models": ["m0"],
         "completions": completions, "correct_answers": [], "incorrect_answers": []},
        {"instruction": "Q?", "completions": [{"response": "a", "fine-grained_score": 1}, {"response": "b"}]}])
    loaded, cfg = load(path, "ranks")
    assert loaded.formats == {"ultrafeedback_raw": 2}
    assert loaded.skipped == {"ultrafeedback_raw: completion 2 has none of the score fields fine-grained_score, "
                              "overall_score, score": 1}
    (record,) = loaded.train
    assert record["scores"] == [4.75, 1.5, 4.0, 2.25]
    feature = RANKS.tokenize(record, tokenizer, cfg)
    assert tokenizer.decode(feature["prompt_ids"]) == f"{IM_USER}What is the capital of France?{END}{IM_BOT}"
    assert [tokenizer.decode(ids) for ids in feature["response_ids"]] == [
        f"Paris.{END}", f"Lyon.{END}", f"It is Paris, France.{END}", f"I am not sure.{END}"]
    loader, _ = build_dataloader(loaded.train, "ranks", tokenizer, cfg, batch_size=1, shuffle=False, seed=0)
    assert next(iter(loader)).pairs.shape == (6, 2)  # all C(4, 2) pairs of the one prompt


def test_trl_conversational_prompt_completion_and_kto(tmp_path, tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Color of the sky?"}]
    path = rows_file(tmp_path, [{"prompt": prompt, "completion": [{"role": "assistant", "content": "Blue."}]}])
    loaded, cfg = load(path, "sft")
    assert loaded.formats == {"sft": 1}
    feature = SFT.tokenize(loaded.train[0], tokenizer, cfg)
    n = feature["labels"].count(-100)
    assert tokenizer.decode(feature["input_ids"][:n]) == f"<|im_start|>system\nBe brief.{END}{IM_USER}Color of the sky?{END}{IM_BOT}"
    assert tokenizer.decode(feature["input_ids"][n:]) == f"Blue.{END}"
    kto = rows_file(tmp_path, [{"prompt": prompt, "completion": [{"role": "assistant", "content": c}], "label": ok}
                               for c, ok in (("Blue.", True), ("Green.", False), ("Red.", "no"))])
    loaded, cfg = load(kto, "unpaired")
    assert loaded.formats == {"unpaired": 3} and loaded.skipped == {"unpaired: field 'label' is not a boolean": 1}
    texts = {tokenizer.decode(UNPAIRED.tokenize(r, tokenizer, cfg)["completion_ids"]): r["label"] for r in loaded.train}
    assert texts == {f"Blue.{END}": True, f"Green.{END}": False}


def test_llama_factory_alpaca_and_sharegpt_preference_with_system(tmp_path, tokenizer):
    path = rows_file(tmp_path, [
        {"instruction": "Translate to French:", "input": "cat", "system": "You translate.",
         "history": [["Translate to French: dog", "chien"]], "chosen": "chat", "rejected": "gato"},
        {"conversations": [{"from": "human", "value": "Capital of Italy?"}], "system": "Be exact.",
         "chosen": {"from": "gpt", "value": "Rome."}, "rejected": {"from": "gpt", "value": "Milan."}},
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": [{"from": "gpt", "value": "a"},
         {"from": "gpt", "value": "b"}], "rejected": {"from": "gpt", "value": "c"}},
        {"messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Capital of Spain?"}],
         "chosen": {"role": "assistant", "content": "Madrid."}, "rejected": {"role": "assistant", "content": "Rome."}}])
    loaded, cfg = load(path, "pairs")
    assert loaded.formats == {"alpaca": 1, "conversations": 2, "messages": 1}
    assert loaded.skipped == {"conversations: field 'chosen' is not one assistant turn": 1}
    split = {}
    for record in loaded.train:
        prompt, chosen, rejected = decoded(tokenizer, PAIRS.tokenize(record, tokenizer, cfg),
                                           "prompt_ids", "chosen_ids", "rejected_ids")
        split[chosen] = (prompt, rejected)
    assert split[f"chat{END}"] == (
        f"<|im_start|>system\nYou translate.{END}{IM_USER}Translate to French: dog{END}{IM_BOT}chien{END}"
        f"{IM_USER}Translate to French:\n\ncat{END}{IM_BOT}", f"gato{END}")
    assert split[f"Rome.{END}"] == (f"<|im_start|>system\nBe exact.{END}{IM_USER}Capital of Italy?{END}{IM_BOT}",
                                    f"Milan.{END}")
    assert split[f"Madrid.{END}"] == (f"<|im_start|>system\nBe exact.{END}{IM_USER}Capital of Spain?{END}{IM_BOT}",
                                      f"Rome.{END}")


def test_openai_messages_with_system_turns(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "6"}]
    path = rows_file(tmp_path, [{"messages": messages}, {"messages": messages[:2]}])
    loaded, cfg = load(path, "sft")
    assert loaded.formats == {"messages": 2} and loaded.skipped == {"messages: no assistant turn": 1}
    feature = SFT.tokenize(loaded.train[0], tokenizer, cfg)  # data.assistant_turns: all (the default)
    n = feature["prompt_length"]
    assert tokenizer.decode(feature["input_ids"][:n]) == (
        f"<|im_start|>system\nYou are terse.{END}{IM_USER}2+2?{END}{IM_BOT}4{END}{IM_USER}3+3?{END}{IM_BOT}")
    assert tokenizer.decode(feature["input_ids"][n:]) == f"6{END}"
    assert tokenizer.decode([t for t in feature["labels"] if t != -100]) == f"4{END}6{END}"
    assert feature["turns"] == [2, 2]
    last = SFT.tokenize(loaded.train[0], tokenizer, dataclasses.replace(cfg, assistant_turns="last"))
    assert last["input_ids"] == feature["input_ids"] and last["turns"] == [1, 2]
    assert tokenizer.decode([t for t in last["labels"] if t != -100]) == f"6{END}"


def test_whole_conversations_that_do_not_start_with_the_prompt_are_skipped(tmp_path):
    row = ufb_row("Name a prime.", "Seven.", "Eight.", 9.0, 3.5)
    row["prompt"] = "Name an even number."
    loaded = load_rows(DataConfig(path=str(rows_file(tmp_path, [row, ufb_row("A?", "b", "c", 2, 1)])),
                                  eval_fraction=0.0), "pairs")
    assert len(loaded.train) == 1
    assert loaded.skipped == {
        "ultrafeedback: field 'chosen' is a whole conversation that does not start with the prompt": 1}
