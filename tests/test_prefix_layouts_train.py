"""One update through the real Trainer in the cached prefix layout equals the padded rows' update.

DPO (pairs), reward modelling (pairs as 2-wise rankings; K-wise rankings are checked at the model level in
tests/test_prefix_sharing.py), GRPO and RLOO (G = 3 samples of left-padded prompts of different lengths, responses
cut at 10 tokens, temperature 0.7) on gpt2-real (dropout 0.1 as saved, turned off by the loader as every training
run does: with dropout on, two layouts draw different masks), accumulation 2. The layout is forced (the cost model
would pick the packed one at these short lengths); the other run has ``prefix_sharing: false``. fp32: the loss within
1e-6 and every gradient within 2e-6 relative (fp32 rounding: the padded and the packed layouts differ by as much);
bf16 autocast: each gradient as close to the fp32 one as the padded bf16 run's, within 1e-3 (tests/test_lm_head.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import prefopt.prefix
from prefopt.prefix import CachedPrefixLayout
from test_conformance import recipe
from test_lm_head import first_update

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SETTINGS = {
    "grpo": {"num_samples": 3, "generation": {"max_new_tokens": 10, "temperature": 0.7}, "kl_coef": 0.05},
    "rloo": {"num_samples": 3, "generation": {"max_new_tokens": 10, "temperature": 0.7}, "kl_coef": 0.05},
}


@pytest.fixture(scope="module")
def rm_dir(gpt2_real_dir, tmp_path_factory):
    """gpt2-real with a saved score head, so both runs start from the same reward model."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gpt2_real_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_real_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    out = tmp_path_factory.mktemp("rm-gpt2-real")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp(min=1e-30))


def run(monkeypatch, algorithm, model_dir, data_path, precision, sharing, out):
    data = recipe(algorithm, model_dir, data_path, precision, "full", 2, out)
    data["algorithm"] = {"name": algorithm, "prefix_sharing": sharing, **SETTINGS.get(algorithm, {})}
    if algorithm in SETTINGS:
        data["algorithm"]["rewards"] = [{"name": "callable", "params": {"fn": "test_lm_head:characters"}}]
    built = []
    cache_prefixes = prefopt.prefix.cache_prefixes
    with monkeypatch.context() as patch:  # the cached layout wherever a layout is chosen
        patch.setattr(prefopt.prefix.choice, "layout_costs", lambda *a, **k: {"padded": 2, "packed": 1, "cached": 0})
        patch.setattr(prefopt.prefix.choice, "cache_prefixes", lambda *a: built.append(1) or cache_prefixes(*a))
        loss, grads = first_update(monkeypatch, data, out)
    assert bool(built) is sharing  # the layout under test really ran (or, unshared, did not)
    return loss, grads


@pytest.mark.parametrize("algorithm,precision,chunk", [("dpo", "fp32", 128), ("reward", "fp32", 128),
                                                       ("grpo", "fp32", 128), ("rloo", "fp32", 4), ("dpo", "bf16", 16),
                                                       ("grpo", "bf16", 128)])
def test_one_update_equals_the_padded_rows(algorithm, precision, chunk, gpt2_real_dir, rm_dir, hh_head, tmp_path,
                                           monkeypatch):
    """``chunk``: the branches' query chunk (``prefix.BRANCH_CHUNK``; 128 by default, smaller to run 2-3 chunks on
    these short rows)."""
    monkeypatch.setattr(prefopt.prefix.cached, "BRANCH_CHUNK", chunk)
    model_dir = rm_dir if algorithm == "reward" else gpt2_real_dir
    cached = run(monkeypatch, algorithm, model_dir, hh_head(16), precision, True, tmp_path / "cached")
    padded = run(monkeypatch, algorithm, model_dir, hh_head(16), precision, False, tmp_path / "padded")
    assert cached[1].keys() == padded[1].keys() and cached[1]
    if precision == "fp32":
        assert cached[0] == pytest.approx(padded[0], abs=1e-6)
        for name, grad in cached[1].items():
            assert relative(grad, padded[1][name]) < 2e-6, name
        return
    truth = run(monkeypatch, algorithm, model_dir, hh_head(16), "fp32", False, tmp_path / "fp32")
    assert cached[0] == pytest.approx(padded[0], abs=1e-3)
    for name, grad in cached[1].items():
        assert relative(grad, truth[1][name]) < relative(padded[1][name], truth[1][name]) + 1e-3, name


def test_gradient_checkpointing_runs_the_packed_layout(gpt2_real_dir):
    """transformers drops the cache in checkpointed layers while a gradient is recorded: there the choice falls to
    the packed layout, and the cached one refuses to run rather than return states without their prefix."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_real_dir).train()
    model.gradient_checkpointing_enable()
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 10]])
    mask = torch.ones_like(ids)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prefopt.prefix.choice, "layout_costs", lambda *a, **k: {"padded": 2, "packed": 1, "cached": 0})
        assert isinstance(prefopt.prefix.choose_layout(ids, mask, [[0, 1]], model), prefopt.prefix.SharedPrefixLayout)
        with torch.no_grad():  # no gradient recorded: the cache is kept, the cached layout runs
            assert isinstance(prefopt.prefix.choose_layout(ids, mask, [[0, 1]], model), CachedPrefixLayout)
    layout = prefopt.prefix.cache_prefixes(ids, mask, [[0, 1]])
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        layout.hidden(model.get_decoder())
