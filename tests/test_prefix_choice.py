"""Which prefix layout runs (prefopt.prefix.choice): the cost model by hand, its picks against the layouts measured
fastest on CPU, the grouped scoring path running the chosen one (and equal to the padded rows), and the branches'
query chunks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import prefopt.prefix
from prefopt.prefix import layout_costs
from prefopt.scoring import TokenScorer, grouped_token_logps


def group_rows(prompt: int, response: int, samples: int, prompts: int = 2) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``prompts`` x ``samples`` right-padded rows: each prompt's samples share ``prompt`` tokens, then ``response``."""
    torch.manual_seed(0)
    ids = torch.randint(2, 500, (prompts * samples, prompt + response))
    for p in range(prompts):
        ids[p * samples:(p + 1) * samples, :prompt] = ids[p * samples, :prompt]
    groups = [list(range(p * samples, (p + 1) * samples)) for p in range(prompts)]
    return ids, torch.ones_like(ids), groups


def test_layout_costs_by_hand():
    """Width 256 (a token slot 6 x 256 = 1536 units, a pair 0.5). G = 8 responses of 256 tokens to a 96-token prompt:
    padded 8 rows x 352 = 2816 slots and 8 x 352^2 = 991K pairs -> 4.33M + 0.50M = 4.82M; packed one row of
    96 + 8 x 256 = 2144 slots and 2144^2 = 4.60M pairs -> 3.29M + 2.30M = 5.59M; cached 96 + 2048 = 2144 slots and
    96^2 + 8 x (128 x 224 + 128 x 352) = 599K pairs (the 256-token branches in two 128-token chunks, each attending
    to the prompt and the chunks up to itself) and 8 x 96 x 2 copies of the prompt's keys and values at 64 ->
    3.29M + 0.30M + 0.10M = 3.69M."""
    costs = layout_costs(*group_rows(96, 256, 8, prompts=1), hidden_size=256)
    assert costs == pytest.approx({"padded": 2816 * 1536 + 0.5 * 8 * 352**2,
                                   "packed": 2144 * 1536 + 0.5 * 2144**2,
                                   "cached": 2144 * 1536 + 0.5 * (96**2 + 8 * (128 * 224 + 128 * 352))
                                   + 64 * 8 * 96 * 2})


# measured with benchmarks/prefix_layouts.py (forward + backward of the trunk, 1 thread, the layouts taking turns, 5
# repeats; 06:35-06:40, load 4.6-5.5; /work/team/notes/share.md): the fastest layout of each setting, which the cost
# model must pick (s: padded / packed / cached)
MEASURED = [  # (shape, prompts, branch lengths of each group, fastest)
    ("gpt2", [60, 96], [[16] * 8] * 2, "packed"),  # online, G = 8, 16-token responses: 1.473 / 0.330 / 0.404
    ("gpt2", [60, 96], [[32] * 8] * 2, "packed"),  # 32 tokens: 1.876 / 0.550 / 0.625
    ("gpt2", [60, 96], [[128] * 8] * 2, "cached"),  # 128 tokens: 3.033 / 2.200 / 1.670
    ("gpt2", [60, 96], [[256] * 8] * 2, "cached"),  # 256 tokens: 4.595 / 5.591 / 3.245
    ("qwen2", [60, 96], [[256] * 8] * 2, "cached"),  # 0.638 / 1.716 / 0.525
    ("gpt2", [512], [[512, 512]], "cached"),  # a 1,024-token pair: 2.213 / 2.616 / 1.919
    ("qwen2", [512], [[512, 512]], "cached"),  # 0.445 / 0.641 / 0.413
    ("qwen2", [64] * 4, [[64] * 4] * 4, "cached"),  # 4-wise rankings: 0.201 / 0.179 / 0.153
]


@pytest.mark.parametrize("shape,prompts,branches,fastest", MEASURED)
def test_the_cost_model_picks_the_measured_fastest(shape, prompts, branches, fastest):
    width = {"gpt2": 256, "qwen2": 64}[shape]
    torch.manual_seed(0)
    rows, groups = [], []
    for prompt, lengths in zip(prompts, branches):
        head = torch.randint(2, 500, (prompt,))
        groups.append(list(range(len(rows), len(rows) + len(lengths))))
        rows += [torch.cat([head, torch.randint(2, 500, (n,))]) for n in lengths]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    costs = layout_costs(ids, mask, groups, width)
    assert min(costs, key=costs.get) == fastest, costs


def test_grouped_scoring_runs_the_chosen_layout(tiny_model_dir, monkeypatch):
    """A rollout of G = 8 long responses to a short prompt runs the cached layout, short ones to a long prompt the
    packed one; the log-probs equal the padded rows' either way."""
    built = []
    for name in ("share_prefixes", "cache_prefixes"):
        original = getattr(prefopt.prefix.choice, name)
        monkeypatch.setattr(prefopt.prefix.choice, name,
                            lambda *a, _f=original, _n=name, **k: built.append(_n) or _f(*a, **k))
    scorer = TokenScorer(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    for prompt, response, layout in [(4, 60, "cache_prefixes"), (60, 2, "share_prefixes")]:
        ids, mask, groups = group_rows(prompt, response, 8)
        score_mask = torch.zeros_like(ids)
        score_mask[:, prompt:] = 1
        group = torch.arange(2).repeat_interleave(8)
        built.clear()
        with torch.no_grad():
            logps, _ = grouped_token_logps(scorer, ids, mask, score_mask, group)
            plain, _ = scorer(ids, mask, score_mask)
        assert built == [layout]
        torch.testing.assert_close(logps, plain, atol=1e-6, rtol=1e-6)


def test_branch_chunks():
    """Branches run in 128-token query chunks or more (one when shorter than two), in one under bf16 gradients."""
    assert prefopt.prefix.branch_chunks(100) == [(0, 100)]
    assert prefopt.prefix.branch_chunks(300) == [(0, 150), (150, 300)]
    assert prefopt.prefix.branch_chunks(512) == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert prefopt.prefix.branch_chunks(512, bf16_gradients=True) == [(0, 512)]
