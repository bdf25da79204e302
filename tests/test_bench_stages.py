"""prefopt.bench.stages: every stage lives under the key of what makes it (a world draw's labels and proxy RM under its
own seed), a built stage is not built again, and the labels stage writes the rankings, pairs and KTO rows of every
part, labelled by the world's maths from the start's replies."""

from __future__ import annotations

from pathlib import Path

from prefopt.bench.data import prepare_data
from prefopt.bench.files import read_json, read_jsonl
from prefopt.bench.recipes import load_bench
from prefopt.bench.stages import LABELLED_PARTS, build_stage, plan_start

WORLD_TINY = Path(__file__).resolve().parents[1] / "recipes" / "bench" / "world_tiny_test.yaml"


def test_stages_are_keyed_by_content_and_built_once(tiny_model_dir, tmp_path):
    overrides = [f"start.model={tiny_model_dir}", "start.pt=null", "start.sft=null", f"cache_dir={tmp_path / 'cache'}",
                 "world.num_prompts=30", "eval.batch_size=16"]
    cfg = load_bench(WORLD_TINY, overrides)
    data = prepare_data(cfg, tmp_path / "run")
    start = plan_start(cfg, data)
    assert start.shared == [] and start.policy == Path(str(tiny_model_dir))  # start.model: no init / pt / sft
    assert [(s.name, s.draw) for s in start.stages] == [("labels", 0), ("proxy_rm", 0), ("labels", 1), ("proxy_rm", 1)]
    assert len({s.key for s in start.stages}) == 4 and [d.seed for d in start.draws] == [1, 2]
    for draw in start.draws:
        proxy = draw.stages[1].spec
        assert proxy["train"]["seed"] == draw.seed and proxy["data"]["path"] == str(draw.proxy_data)
        assert draw.train_files["pairs"].name == "policy_train.pairs.jsonl" and draw.train_files["pairs"].parent == \
            draw.stages[0].directory
    again = plan_start(load_bench(WORLD_TINY, overrides), prepare_data(cfg, tmp_path / "elsewhere"))
    assert [s.key for s in again.stages] == [s.key for s in start.stages]  # the same inputs in another directory
    other = plan_start(load_bench(WORLD_TINY, overrides + ["world.label_temperature=0.5"]), data)
    assert [s.key for s in other.stages] != [s.key for s in start.stages]  # labels and proxy RMs follow the labels

    labels = start.draws[0].stages[0]
    cost = build_stage(labels)
    assert cost["built"] and labels.done and build_stage(labels) == {"key": labels.key, "built": False,
                                                                     "wall_s": 0.0, "cpu_s": 0.0}
    summary = read_json(labels.directory / "stage.json")["summary"]
    k = cfg.world.responses_per_prompt
    for part in LABELLED_PARTS:
        prompts = [r["prompt"] for r in read_jsonl(data.files[part])]
        ranks = read_jsonl(labels.directory / f"{part}.ranks.jsonl")
        pairs = read_jsonl(labels.directory / f"{part}.pairs.jsonl")
        kto = read_jsonl(labels.directory / f"{part}.kto.jsonl")
        assert summary[part]["prompts"] == len(prompts) and summary[part]["responses"] == k * len(prompts)
        assert summary[part]["pairs_used"] == len(pairs) and len(kto) == 2 * summary[part]["kto_rows"]["desirable"]
        assert {r["prompt"] for r in ranks} <= set(prompts) and all(p["chosen"] != p["rejected"] for p in pairs)


def test_the_world_start_learns_hh_text_then_the_demonstrations(tmp_path, hh_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_HH_DIR", str(hh_path.parents[1]))
    cfg = load_bench(WORLD_TINY, [f"cache_dir={tmp_path / 'cache'}"])
    data = prepare_data(cfg, tmp_path / "run")
    start = plan_start(cfg, data)
    init, pt, sft = start.shared
    assert (init.name, pt.name, sft.name) == ("init", "pt", "sft") and start.policy == sft.model
    assert pt.spec["data"]["path"] == cfg.start.pt["data"]["path"]
    assert sft.spec["data"]["path"] == str(data.files["demonstrations"])
    assert (pt.spec["model"]["name_or_path"], sft.spec["model"]["name_or_path"]) == (str(init.model), str(pt.model))
