"""prefopt.bench.evaluate on the evaluation core: a checkpoint loaded into the draw's kept model is the model
from_pretrained loads (the same replies and numbers), the start scores KL 0, the replies are common random numbers,
the implicit margin is the core's, and a judge's pair accuracy is counted by hand."""

from __future__ import annotations

import torch

from prefopt.bench.evaluate import Evaluation, pair_accuracy, text_rollout
from prefopt.bench.world import world_prompts
from prefopt.rl.engine import GenerationConfig


def _evaluation(model_dir, pairs=()):
    prompts = {"eval": [{"prompt": p, "meta": {}} for p in world_prompts(6, seed=1)]}
    gold = {"name": "world_gold", "params": {"budget": 6}}
    return Evaluation(str(model_dir), gold, None, GenerationConfig(max_new_tokens=6), prompts, list(pairs), (64, 40),
                      4, 1234)


def test_a_checkpoint_in_the_kept_model_gives_the_same_numbers_as_from_pretrained(tiny_model_dir, tmp_path):
    pairs = [{"prompt": p, "chosen": " the and of", "rejected": " cat"} for p in world_prompts(3, seed=2)]
    evaluation = _evaluation(tiny_model_dir, pairs)
    start_rows = evaluation.samples(evaluation.reference, "eval")
    assert [r["i"] for r in start_rows] == list(range(6)) and all(r["kl"] == 0.0 for r in start_rows)
    assert all(r["cond_acc"] is None or 0 <= r["cond_acc"] <= 1 for r in start_rows) and "proxy" in start_rows[0]
    assert evaluation.samples(evaluation.reference, "eval") == start_rows  # the same seeds: the same replies
    trained = evaluation.load(tiny_model_dir)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained.save_pretrained(tmp_path / "step-3")
    kept = evaluation.checkpoint(tmp_path / "step-3")
    assert kept is evaluation.shell and kept is not evaluation.reference
    fresh = evaluation.load(tmp_path / "step-3")
    assert evaluation.samples(kept, "eval") == evaluation.samples(fresh, "eval")
    moved = evaluation.samples(kept, "eval")
    assert any(r["kl"] != 0.0 for r in moved)
    assert evaluation.preference(kept) == evaluation.preference(fresh)
    row = evaluation.preference(kept)[0]
    start = evaluation.start_pairs()[0]
    margin = (row["chosen"] - start["ref_chosen"]) - (row["rejected"] - start["ref_rejected"])
    assert abs(row["implicit_margin"] - margin) < 1e-4 and row["implicit_acc"] == float(margin > 0)
    assert evaluation.preference(evaluation.reference)[0]["implicit_acc"] == 0.5  # the start: margin 0, a tie
    config = tmp_path / "step-3" / "config.json"
    config.write_text(config.read_text().replace('"n_positions"', '"n_ctx_unused": 1, "n_positions"'))
    assert evaluation.checkpoint(tmp_path / "step-3") is not evaluation.shell  # another config: from_pretrained


def test_pair_accuracy_counts_ties_as_half(tiny_model_dir):
    from prefopt.config import ModelConfig
    from prefopt.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))

    def longer(rollout):  # a judge: the longer reply wins
        return rollout.response_mask.sum(-1).float()

    pairs = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": c, "rejected": r}
             for c, r in ((" a b c", " a"), (" a", " a b c"), (" a b", " b a"), (" x y z w", " x"))]
    result = pair_accuracy(longer, tokenizer, pairs, batch_size=3)
    assert result["n_pairs"] == 4 and result["accuracy"] == (1 + 0 + 0.5 + 1) / 4
    assert result["ci95"][0] < result["accuracy"] < result["ci95"][1]
    rollout = text_rollout(tokenizer, ["x", "y"], [" a b", " a"])
    assert rollout.response_mask.sum(-1).tolist() == [len(tokenizer(" a b")["input_ids"]) + 1, 2]
    assert rollout.ended.all() and rollout.response_ids[1, 1] == tokenizer.eos_token_id
