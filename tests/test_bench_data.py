"""prefopt.bench.data: the parts are disjoint, pinned by hash (the same whatever the row order) and recorded; the prompt
sets every policy is sampled on are written once (prompts.jsonl) with the group each world prompt names."""

from __future__ import annotations

from pathlib import Path

from prefopt.bench.data import prepare_data
from prefopt.bench.files import read_jsonl
from prefopt.bench.recipes import load_bench
from prefopt.bench.world import GROUPS, prompt_group

BENCH = Path(__file__).resolve().parents[1] / "recipes" / "bench"


def test_world_parts_are_disjoint_pinned_and_the_prompt_sets_written(tmp_path, hh_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    cfg = load_bench(BENCH / "world_tiny_test.yaml", ["eval.num_prompts=5"])
    data = prepare_data(cfg, tmp_path)
    prompts = {name: {r["prompt"] for r in rows} for name, rows in data.parts.items()}
    assert set(prompts) == {"policy_train", "val", "eval"}
    assert all(not prompts[a] & prompts[b] for a in prompts for b in prompts if a != b)
    assert sum(map(len, prompts.values())) == data.manifest["sources"][0]["distinct"]
    assert {name: part["count"] for name, part in data.manifest["parts"].items()} == {
        name: len(rows) for name, rows in data.parts.items()}
    rows = read_jsonl(tmp_path / "prompts.jsonl")
    assert [(r["set"], r["i"]) for r in rows] == [(s, i) for s in ("val", "eval") for i in range(5)]
    assert all(r["prompt"] in prompts[r["set"]] and r["group"] == prompt_group(r["prompt"]) for r in rows)
    again = prepare_data(load_bench(BENCH / "world_tiny_test.yaml", ["eval.num_prompts=5"]), tmp_path / "again")
    assert again.manifest["parts"] == data.manifest["parts"]
    # the start's demonstrations: on prompts no part holds, each reply with words of its prompt's group
    demos = read_jsonl(data.files["demonstrations"])
    assert len(demos) == cfg.world.demonstrations == data.manifest["demonstrations"]["rows"]
    assert not {d["prompt"] for d in demos} & set().union(*prompts.values())
    for demo in demos:
        group = GROUPS[prompt_group(demo["prompt"])]
        assert sum(f" {word}" in group for word in demo["completion"].split()) >= cfg.world.demonstration_words
    assert (tmp_path / "again" / "data" / "demonstrations.jsonl").read_bytes() == \
        data.files["demonstrations"].read_bytes()


def test_hh_parts_are_disjoint_and_kto_rows_label_each_response_once(tmp_path, hh_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    cfg = load_bench(BENCH / "hh_tiny_test.yaml")
    data = prepare_data(cfg, tmp_path)
    keys = {name: {(r["prompt"], r["chosen"], r["rejected"]) for r in rows} for name, rows in data.parts.items()}
    assert set(keys) == {"policy_train", "proxy_rm_train", "gold_rm_train", "val", "eval"}
    assert all(not keys[a] & keys[b] for a in keys for b in keys if a != b)
    assert len(keys["eval"]) > 200 and data.held_out_pairs == data.parts["eval"][:cfg.eval.num_pairs]
    kto = read_jsonl(data.files["policy_train.kto"])
    assert len(kto) == 2 * len(data.parts["policy_train"])
    assert [row["label"] for row in kto[:2]] == [True, False]
    assert kto[0]["completion"] == data.parts["policy_train"][0]["chosen"]
    assert all(r["group"] is None for r in read_jsonl(tmp_path / "prompts.jsonl"))
