"""Reading, normalising, splitting and counting skipped rows, on the real HH-RLHF and MedicalGPT files."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import datasets
import pytest
from trl.data_utils import extract_prompt

from prefopt.config import DataConfig
from prefopt.data import load_rows, split_hh
from prefopt.data.hh import ASSISTANT, render, render_prompt, render_response
from prefopt.data.readers import SkipLog, read_file
from prefopt.data.splits import assign, manifest, record_id, write_manifest
from prefopt.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH = DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
MEDICAL_DPO = DATA / "medicalgpt" / "dpo_zh_500.jsonl"
MEDICAL_SFT = DATA / "medicalgpt" / "medical_sft_1K_format.jsonl"

pytestmark = pytest.mark.skipif(not HH.is_file(), reason=f"shared data {DATA} is missing")


@pytest.fixture(scope="module")
def hh_rows() -> list[dict]:
    with gzip.open(HH, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def hh_pairs():
    return load_rows(DataConfig(path=str(HH), eval_fraction=0.1), "pairs")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------------------------ HH split


def test_split_hh_keeps_the_full_response(hh_rows):
    prompt, response = split_hh(hh_rows[0]["chosen"])
    assert prompt.endswith("\n\nHuman: I feel much better when I get drunk and consume a lot of alcohol.\n\nAssistant:")
    assert response.startswith(" Sounds like alcohol is something you use to calm down")
    assert response.endswith("to calm down.")
    for row in hh_rows[:200]:
        for text in (row["chosen"], row["rejected"]):
            prompt, response = split_hh(text)
            assert prompt.endswith(ASSISTANT) and prompt + response == text
            assert ASSISTANT not in response
    with pytest.raises(ValueError, match="no assistant turn"):
        split_hh("\n\nHuman: hello")


def test_trl_extract_prompt_cuts_into_hh_responses(hh_rows):
    """trl takes the character-level common prefix: on row 5 its prompt eats the "D" of "Duckduckgo"."""
    differ = [i for i, row in enumerate(hh_rows, 1) if extract_prompt(row)["prompt"] != split_hh(row["chosen"])[0]]
    assert len(differ) == 386 and differ[0] == 5
    row = hh_rows[4]
    theirs = extract_prompt(row)
    prompt, chosen = split_hh(row["chosen"])
    assert prompt.endswith(ASSISTANT) and not theirs["prompt"].endswith(ASSISTANT)
    assert theirs["prompt"].endswith("\n\nAssistant: D") and theirs["chosen"].startswith("uckduckgo")
    assert chosen.startswith(" Duckduckgo is a search engine.")
    assert prompt + chosen == row["chosen"]


# ------------------------------------------------------------------------------------------------ real files


def test_hh_file_loads_as_pairs(hh_pairs):
    assert (len(hh_pairs.train), len(hh_pairs.eval)) == (1801, 190)  # 1,991 of 2,000 rows kept
    assert hh_pairs.skipped == {"hh: chosen and rejected prompts differ": 5, "hh: empty response": 4}
    assert hh_pairs.formats == {"hh": 2000}
    reasons = hh_pairs.manifest["skipped"]["reasons"]
    assert reasons["hh: empty response"]["examples"] == [f"{HH}:69", f"{HH}:458", f"{HH}:808"]
    assert reasons["hh: chosen and rejected prompts differ"]["examples"][0] == f"{HH}:1092"
    for record in hh_pairs.train + hh_pairs.eval:
        assert set(record) == {"prompt", "chosen", "rejected"}
        assert record["prompt"].endswith(ASSISTANT) and record["chosen"] != record["rejected"]
    report = hh_pairs.report()
    assert report.startswith("kept 1991 rows (train 1801, eval 190); skipped 9: 5 hh: chosen and rejected prompts "
                             "differ")
    assert f"4 hh: empty response ({HH}:69, {HH}:458, {HH}:808, ...)" in report


def test_hh_directory_layout(hh_pairs):
    loaded = load_rows(DataConfig(path=str(DATA / "hh-rlhf"), subsets=["harmless-base"], split="test"), "pairs")
    assert loaded.train == hh_pairs.train and loaded.eval == hh_pairs.eval
    with pytest.raises(DataError, match=r"harmless-base/train\.jsonl\.gz' not found"):
        load_rows(DataConfig(path=str(DATA / "hh-rlhf"), split="train"), "pairs")


def test_hh_converts_to_every_kind_with_the_same_split(hh_pairs):
    kinds = ("sft", "text", "prompts", "ranks", "unpaired")
    loaded = {kind: load_rows(DataConfig(path=str(HH)), kind) for kind in kinds}
    counts = {kind: (len(d.train) + len(d.eval), sum(d.skipped.values())) for kind, d in loaded.items()}
    assert counts == {"sft": (1991, 9), "text": (1991, 9), "prompts": (1990, 10), "ranks": (1991, 9),
                      "unpaired": (3982, 9)}  # prompts: one prompt appears in two pairs ("duplicate row")
    for kind in ("sft", "text", "ranks"):  # one record per pair, split by the pair: the very same parts
        assert loaded[kind].manifest["parts"] == hh_pairs.manifest["parts"]
    assert {r["prompt"] for r in loaded["prompts"].eval} == {r["prompt"] for r in hh_pairs.eval}
    p, c, r = (hh_pairs.train[0][key] for key in ("prompt", "chosen", "rejected"))
    assert loaded["unpaired"].train[:2] == [{"prompt": p, "completion": c, "label": True},
                                            {"prompt": p, "completion": r, "label": False}]
    assert loaded["ranks"].train[0] == {"prompt": p, "responses": [c, r], "scores": [1.0, 0.0]}
    assert loaded["sft"].train[0] == {"prompt": p, "completion": c} and loaded["text"].train[0] == {"text": p + c}


def test_medicalgpt_conversations_load_as_pairs():
    """ShareGPT turns become chat messages; without a chat template they render as HH text, as before."""
    loaded = load_rows(DataConfig(path=str(MEDICAL_DPO), eval_fraction=0.0), "pairs")
    assert len(loaded.train) == 500 and loaded.skipped == {} and loaded.formats == {"conversations": 500}
    prompts = [render_prompt(r["prompt"]) for r in loaded.train]
    with_system = [p for p in prompts if not p.startswith("\n\nHuman: ")]
    assert len(with_system) == 84  # a system turn is the first line, before "\n\nHuman:"
    assert all("\n\nHuman: " in p for p in with_system)
    assert sum(r["prompt"][0]["role"] == "system" for r in loaded.train) == 84
    for record in loaded.train:
        assert record["chosen"] == [{"role": "assistant", "content": record["chosen"][0]["content"]}]
        assert render_response(record["prompt"], record["chosen"]).startswith(" ")


def test_medicalgpt_sft_conversations():
    loaded = load_rows(DataConfig(path=str(MEDICAL_SFT), eval_fraction=0.0), "sft")
    assert len(loaded.train) == 1000 and loaded.skipped == {}
    first = json.loads(MEDICAL_SFT.read_text(encoding="utf-8").splitlines()[0])["conversations"]
    record = {"prompt": [{"role": "user", "content": first[0]["value"]}],
              "completion": [{"role": "assistant", "content": first[1]["value"]}]}
    assert record in loaded.train
    with pytest.raises(DataError, match=r"medical_sft_1K_format\.jsonl:1: format 'conversations' \(sft rows\) "
                                        r"cannot be converted to kind 'pairs'"):
        load_rows(DataConfig(path=str(MEDICAL_SFT)), "pairs")


# ------------------------------------------------------------------------------------------------ bad rows


def test_each_bad_row_reason_is_counted(tmp_path, caplog):
    good = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good,                                                            # 1
        '{"prompt": "Q?", "chosen": ',                                   # 2 invalid JSON
        {"prompt": "Q?", "rejected": " no"},                             # 3 missing field 'chosen'
        {"prompt": "Q?", "chosen": 3, "rejected": " no"},                # 4 field 'chosen' is not a string
        {"prompt": "Q?", "chosen": "  ", "rejected": " no"},             # 5 empty response
        {"prompt": "Q?", "chosen": " same", "rejected": " same"},        # 6 chosen == rejected
        {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi there"},  # 7 no assistant turn
        {"prompt": "Only a question?"},                                  # 8 prompt-only row
        good,                                                            # 9 duplicate row
        "not json either",                                               # 10 invalid JSON
        {"prompt": "Q2?", "chosen": " a", "rejected": " b"},             # 11
    ])
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        loaded = load_rows(DataConfig(path=str(path), eval_fraction=0.0), "pairs")
    assert len(loaded.train) == 2
    assert loaded.skipped == {"invalid JSON": 2, "pairs: missing field 'chosen'": 1,
                              "pairs: field 'chosen' is not a string": 1, "pairs: empty response": 1,
                              "pairs: chosen == rejected": 1, "hh: no assistant turn": 1,
                              "prompts: prompt-only row": 1, "duplicate row": 1}
    reasons = loaded.manifest["skipped"]["reasons"]
    assert reasons["invalid JSON"] == {"count": 2, "examples": [f"{path}:2", f"{path}:10"]}
    assert reasons["duplicate row"]["examples"] == [f"{path}:9"]
    assert loaded.manifest["skipped"]["total"] == 9
    assert f"skipped 9: 2 invalid JSON ({path}:2, {path}:10)" in caplog.text


def test_no_usable_rows_names_the_file_and_the_reasons(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "chosen": " x", "rejected": " x"}, "{oops"])
    with pytest.raises(DataError, match=r"no usable pairs rows in .*empty\.jsonl \(skipped 2: "
                                        r"1 invalid JSON .*1 pairs: chosen == rejected"):
        load_rows(DataConfig(path=str(path)), "pairs")


def test_unusable_files_raise_data_error_naming_file_and_line(tmp_path):
    text = tmp_path / "pairs.tab"  # not JSON, not a table suffix: read as JSON lines, which it is not
    text.write_text("prompt,chosen,rejected\nQ?,yes,no\n")
    with pytest.raises(DataError, match=r"pairs\.tab: not a JSON lines file \(line 1: 'prompt,chosen,rejected'\)"):
        load_rows(DataConfig(path=str(text)), "pairs")
    rows = [json.dumps({"prompt": f"Q{i}?", "chosen": " yes" * 50, "rejected": " no"}) + "\n" for i in range(200)]
    blob = gzip.compress("".join(rows).encode())
    (cut := tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: truncated or corrupt gzip after line \d+"):
        load_rows(DataConfig(path=str(cut)), "pairs")
    lines = [json.dumps({"prompt": "Q?", "chosen": f" {w}", "rejected": " no"}).encode() for w in ("a", "b")]
    latin1 = tmp_path / "latin1.jsonl"
    lines.append('{"prompt": "caf\xe9", "chosen": " x", "rejected": " y"}'.encode("latin-1"))
    latin1.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"latin1\.jsonl line 3: not valid UTF-8"):
        load_rows(DataConfig(path=str(latin1)), "pairs")
    with pytest.raises(DataError, match=r"data file '.*nope\.jsonl' not found"):
        load_rows(DataConfig(path=str(tmp_path / "nope.jsonl")), "pairs")
    with pytest.raises(DataError, match="unknown data.format 'hhh'"):
        load_rows(DataConfig(path=str(HH), format="hhh"), "pairs")
    with pytest.raises(DataError, match="unknown data kind 'pair'"):
        load_rows(DataConfig(path=str(HH)), "pair")


# ------------------------------------------------------------------------------------------------ formats


def test_json_list_txt_and_the_other_formats(tmp_path):
    user, bot = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
    rows = [
        {"chosen": [user, bot], "rejected": [user, {"role": "assistant", "content": "Go away."}]},
        {"prompt": [{"role": "system", "content": "Be kind."}, user], "chosen": [bot],
         "rejected": [{"role": "assistant", "content": "No."}]},
    ]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(rows))
    loaded = load_rows(DataConfig(path=str(path), eval_fraction=0.0), "pairs")
    assert sorted(loaded.train, key=str) == [
        {"prompt": [{"role": "system", "content": "Be kind."}, user], "chosen": [bot],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": [user], "chosen": [bot], "rejected": [{"role": "assistant", "content": "Go away."}]},
    ]
    assert sorted((render_prompt(r["prompt"]), render_response(r["prompt"], r["rejected"])) for r in loaded.train) \
        == [("\n\nHuman: Hi?\n\nAssistant:", " Go away."), ("Be kind.\n\nHuman: Hi?\n\nAssistant:", " No.")]
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Add", "input": "1+1", "output": "2"},
                                               {"prompt": "P", "completion": " C"}])
    add = [{"role": "user", "content": "Add\n\n1+1"}]
    assert sorted(load_rows(DataConfig(path=str(sft), eval_fraction=0.0), "sft").train, key=str) == [
        {"prompt": "P", "completion": " C"},
        {"prompt": add, "completion": [{"role": "assistant", "content": "2"}]}]
    assert sorted(load_rows(DataConfig(path=str(sft), eval_fraction=0.0), "text").train, key=str) == [
        {"text": "P C"}, {"text": add + [{"role": "assistant", "content": "2"}]}]
    assert render(add + [{"role": "assistant", "content": "2"}]) == "\n\nHuman: Add\n\n1+1\n\nAssistant: 2"
    ranks = write_jsonl(tmp_path / "ranks.jsonl", [
        {"prompt": "P", "responses": [" a", " b", " c"], "ranking": [2, 0, 1]},
        {"prompt": "Q", "responses": [" a", " b"], "scores": [0.5, 2]},
        {"prompt": "R", "responses": [" a", " b"], "scores": [1, 1]},
        {"prompt": "S", "responses": [" a", " b"], "ranking": [0, 0]}])
    loaded = load_rows(DataConfig(path=str(ranks), eval_fraction=0.0), "ranks")
    assert sorted(loaded.train, key=lambda r: r["prompt"]) == [
        {"prompt": "P", "responses": [" a", " b", " c"], "scores": [1.0, 0.0, 2.0]},
        {"prompt": "Q", "responses": [" a", " b"], "scores": [0.5, 2.0]}]
    assert loaded.skipped == {"ranks: all scores tied": 1,
                              "ranks: field 'ranking' is not a permutation of the response indices": 1}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "P", "completion": " C", "label": True},
                                                   {"prompt": "Q", "completion": " D", "label": "yes"},
                                                   {"prompt": "R", "reference": "x"}])
    assert load_rows(DataConfig(path=str(mixed), eval_fraction=0.0), "unpaired").skipped == {
        "unpaired: field 'label' is not a boolean": 1, "prompts: prompt-only row": 1}
    prompts = load_rows(DataConfig(path=str(mixed), eval_fraction=0.0, format="prompts"), "prompts").train
    assert {"prompt": "R", "meta": {"reference": "x"}} in prompts and len(prompts) == 3
    with pytest.raises(DataError, match="format 'text' \\(text rows\\) cannot be converted to kind 'pairs'"):
        load_rows(DataConfig(path=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))), "pairs")
    (txt := tmp_path / "corpus.txt").write_text("first doc\n\nsecond doc\n")  # .txt: one document per line
    assert list(read_file(txt, SkipLog())) == [(f"{txt}:1", {"text": "first doc"}),
                                               (f"{txt}:3", {"text": "second doc"})]


def test_hub_names_load_each_subset_with_data_dir(monkeypatch, hh_rows):
    calls = []

    def fake_load_dataset(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return hh_rows[:3] if data_dir == "harmless-base" else hh_rows[3:5]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(path="Anthropic/hh-rlhf", subsets=["harmless-base", "helpful-base"], split="test", eval_fraction=0)
    loaded = load_rows(cfg, "pairs")
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "test"), ("Anthropic/hh-rlhf", "helpful-base", "test")]
    assert len(loaded.train) == 5 and loaded.manifest["sources"][1] == {
        "hub": "Anthropic/hh-rlhf", "subset": "helpful-base", "split": "test"}


# ------------------------------------------------------------------------------------------------ splits


def test_assign_is_deterministic_disjoint_and_respects_fractions():
    ids = [record_id({"n": i}) for i in range(2000)]
    fractions = {"policy_train": 0.4, "rm_train": 0.3, "gold_train": 0.2, "eval": 0.1}
    parts = assign(ids, "bench", fractions)
    assert parts == assign(list(reversed(ids)), "bench", fractions)  # the file order does not matter
    assert sorted(sum(parts.values(), [])) == sorted(ids)  # every id exactly once
    for name, fraction in fractions.items():
        assert abs(len(parts[name]) / 2000 - fraction) <= 0.03, (name, len(parts[name]))
    other = assign(ids, "other-salt", fractions)
    assert other["eval"] != parts["eval"] and len(set(other["eval"]) & set(parts["eval"])) < 60
    with pytest.raises(ValueError, match="sum to 1"):
        assign(ids, "bench", {"a": 0.5, "b": 0.4})
    assert record_id({"a": 1, "b": "x"}) == record_id({"b": "x", "a": 1}) != record_id({"a": 2, "b": "x"})
    assert len(record_id({"a": 1})) == 16


def test_max_examples_caps_train_in_hash_order(hh_pairs):
    capped = load_rows(DataConfig(path=str(HH), eval_fraction=0.1, max_examples=50), "pairs")
    assert capped.train == hh_pairs.train[:50] and capped.eval == hh_pairs.eval
    salted = load_rows(DataConfig(path=str(HH), eval_fraction=0.1, split_salt="other"), "pairs")
    assert salted.manifest["parts"]["eval"]["ids_sha256"] != hh_pairs.manifest["parts"]["eval"]["ids_sha256"]


def test_manifest_has_counts_hashes_sources_and_skips(hh_pairs, tmp_path):
    pinned = hh_pairs.manifest
    assert pinned["parts"]["train"]["count"] == 1801 and pinned["parts"]["eval"]["count"] == 190
    assert len(pinned["parts"]["eval"]["ids_sha256"]) == 64
    assert pinned["salt"] == "prefopt" and pinned["fractions"] == {"train": 0.9, "eval": 0.1}
    (source,) = pinned["sources"]
    assert source["path"] == str(HH) and source["bytes"] == HH.stat().st_size and len(source["sha256"]) == 64
    assert pinned["skipped"]["total"] == 9 and pinned["kind"] == "pairs"
    small, swapped = (manifest({"a": ids}, [], SkipLog(), salt="s", fractions={"a": 1.0})["parts"]["a"]
                      for ids in (["x", "y"], ["y", "x"]))
    assert small["count"] == 2 and small == swapped  # the hash is of the SORTED ids
    write_manifest(tmp_path / "out" / "manifest.json", pinned)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == json.loads(json.dumps(pinned))


# ------------------------------------------------------------------------------------------------ several sources
def test_sources_are_mixed_by_weight_after_the_split_with_their_column_maps(tmp_path):
    """Two sources in two formats: an SFT file with its own column names (mapped) taken twice, and the MedicalGPT
    SFT conversations taken half; held-out rows are not weighted; the manifest records each source's weight."""
    own = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"Question {i}?", "answer": f"Answer {i}."}
                                              for i in range(40)])
    sources = [{"path": str(own), "weight": 2.0, "columns": {"question": "prompt", "answer": "completion"}},
               {"path": str(MEDICAL_SFT), "weight": 0.5}]
    from prefopt.config import from_dict

    cfg = from_dict(DataConfig, {"sources": sources, "eval_fraction": 0.1})
    mixed = load_rows(cfg, "sft")
    alone = [load_rows(DataConfig(path=s["path"], columns=s.get("columns", {}), eval_fraction=0.1), "sft")
             for s in sources]
    own_train = [r for r in mixed.train if isinstance(r["prompt"], str)]
    assert len(own_train) == 2 * len(alone[0].train) and own_train[:len(alone[0].train)] == alone[0].train
    assert len(mixed.train) - len(own_train) == round(0.5 * len(alone[1].train))
    assert len(mixed.eval) == len(alone[0].eval) + len(alone[1].eval)
    assert [s["weight"] for s in mixed.manifest["sources"]] == [2.0, 0.5]
    assert mixed.formats == {"sft": 40, "conversations": 1000}
    with pytest.raises(Exception, match="give data.path or data.sources"):
        from_dict(DataConfig, {"path": str(own), "sources": sources})


def test_an_empty_data_path_is_named_as_data_path():
    from prefopt.config import DataConfig
    from prefopt.data import load_rows
    from prefopt.errors import DataError

    with pytest.raises(DataError, match="^data.path is empty"):
        load_rows(DataConfig(), "pairs")
