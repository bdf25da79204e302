"""Prefix sharing (prefopt.prefix) gives the same log-probs, losses, scores and gradients as the padded rows.

The layout itself is checked by hand on a two-row example; the model-level checks run the nano GPT-2 and Llama
with SDPA and eager attention, packed and unpacked, and compare to the unshared path to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from prefopt.algorithms.orpo import ORPO, ORPOConfig
from prefopt.algorithms.pairwise import pair_layout, policy_logps, resolve_loss
from prefopt.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from prefopt.data import build_dataloader, load_rows
from prefopt.prefix import rank_groups, share_prefixes, sharing_pays, supports
from prefopt.scoring import RewardScorer, TokenScorer
from prefopt.types import PairLogps

PAD = 0


def test_layout_by_hand():
    """[5 6 7 8] and [5 6 9]: the prefix 5 6 once, then 7 8 and 9; 9 sees 5 6 and itself, not 7 8."""
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, PAD]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    layout = share_prefixes(ids, mask, [[0, 1]])
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert layout.source[0].tolist() == [0, 1, 2, 3]
    assert layout.source[1, :3].tolist() == [0, 1, 4]
    attend = layout.attention_mask[0, 0].int().tolist()
    assert attend == [[1, 0, 0, 0, 0],
                      [1, 1, 0, 0, 0],
                      [1, 1, 1, 0, 0],
                      [1, 1, 1, 1, 0],
                      [1, 1, 0, 0, 1]]
    assert layout.lengths.tolist() == [4, 3]


def test_packing_is_first_fit_and_segments_stay_apart():
    """Segments of 5, 3 and 2 tokens: width 5, the 3 and the 2 share the second row and never see each other."""
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, PAD, PAD], [9, 10, PAD, PAD, PAD]])
    mask = (ids != PAD).long()
    layout = share_prefixes(ids, mask, [[0], [1], [2]])
    assert layout.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    second = layout.attention_mask[1, 0]
    assert not second[3:, :3].any() and not second[:3, 3:].any()
    unpacked = share_prefixes(ids, mask, [[0], [1], [2]], pack=False)
    assert unpacked.input_ids.shape == (3, 5)
    assert unpacked.attention_mask[2, 0, 4].tolist() == [False, False, False, False, True]  # padding: itself only


def test_whole_row_is_a_prefix_of_the_other():
    """A row that ends inside the other's prefix has an empty branch; its tokens read the shared positions."""
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, PAD, PAD]])
    layout = share_prefixes(ids, (ids != PAD).long(), [[0, 1]])
    assert layout.input_ids.tolist() == [[1, 2, 3, 4]]
    assert layout.source[1, :2].tolist() == [0, 1]


def test_left_padding_is_refused():
    ids = torch.tensor([[PAD, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="right-padded"):
        share_prefixes(ids, (ids != PAD).long(), [[0, 1]])


def test_rank_groups_from_pairs():
    """Rows compared in one prompt form a group; a row in no pair (a tie) is alone."""
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 4]])
    groups = rank_groups(6, pairs, torch.tensor([0, 0, 0, 1]))
    assert groups == [[0, 1, 2], [3, 4], [5]]


@pytest.fixture(scope="module")
def pair_batch(tiny_model_dir, hh_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(path=str(hh_path), eval_fraction=0.0, max_examples=6, max_length=160, max_prompt_length=96)
    loader, _ = build_dataloader(load_rows(cfg, "pairs").train, "pairs", tokenizer, cfg, batch_size=6,
                                 shuffle=False, seed=0, length_bucketing=False)
    return next(iter(loader))


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def model_dir_of(request, arch: str):
    """The kind nano models by architecture, or a realistic fixture by name (tests/realistic.py)."""
    if arch in ("gpt2", "llama"):
        return request.getfixturevalue("tiny_model_dir" if arch == "gpt2" else "tiny_llama_dir")
    return request.getfixturevalue("realistic_model_dirs")[arch]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt2-real", "llama-chat"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [True, False])
def test_token_logps_and_gradients_equal_unshared(request, pair_batch, arch, attention, pack):
    model_dir = model_dir_of(request, arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, dtype=torch.float32)
    with torch.no_grad():  # random weights of a useful scale: nano models start close to uniform
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert supports(model)
    scorer, batch = TokenScorer(model), pair_batch
    layout = pair_layout(batch, pack=pack)
    assert layout.num_tokens < batch.input_ids.numel()  # the prompts really are written once

    plain, _ = scorer(batch.input_ids, batch.attention_mask, batch.completion_mask)
    (plain.sum(-1) * torch.linspace(1, 2, plain.shape[0])).sum().backward()
    expected = grads(model)
    shared, _ = scorer(batch.input_ids, batch.attention_mask, batch.completion_mask, layout=layout)
    (shared.sum(-1) * torch.linspace(1, 2, shared.shape[0])).sum().backward()
    got = grads(model)

    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_dpo_loss_equal_unshared(tiny_model_dir, pair_batch):
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.005 * torch.randn_like(p))
    losses = []
    for layout in (None, pair_layout(pair_batch)):
        with torch.no_grad():
            c, r, cl, rl = policy_logps(TokenScorer(policy), pair_batch, layout)
            rc, rr, _, _ = policy_logps(TokenScorer(reference), pair_batch, layout)
        losses.append(float(resolve_loss("sigmoid", {})(PairLogps(c, r, rc, rr, cl, rl), 0.1).mean()))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.parametrize("nll_on", ["response", "full"])
def test_orpo_loss_equal_unshared(tiny_model_dir, pair_batch, nll_on):
    """ORPO scores the chosen prompt tokens too with nll_on=full: they are read once from the shared prefix."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    losses = []
    for sharing in (False, True):
        cfg = ORPOConfig(beta=0.25, nll_on=nll_on, prefix_sharing=sharing)
        algorithm = ORPO(cfg, RunConfig(algorithm=cfg, model=ModelConfig(), train=TrainConfig()), tokenizer)
        algorithm.model = TokenScorer(policy)
        with torch.no_grad():
            loss, _ = algorithm.losses(pair_batch)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_reward_scores_equal_unshared_k3(offline_model):
    """Three ranked completions of one prompt share it; a second prompt has two. Scores and gradients match (on
    gpt2-real, pad = eos: both read the token before each completion's eos)."""
    model_dir = offline_model[1]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tokenizer.pad_token_id
    records = [
        {"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:",
         "responses": [" Mix flour, water and yeast, then bake.", " Buy some.", " I cannot help with that."],
         "scores": [2.0, 1.0, 0.0]},
        {"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "responses": [" Hi!", " No."], "scores": [1.0, 0.0]},
    ]
    cfg = DataConfig(max_length=64, max_prompt_length=32)
    loader, _ = build_dataloader(records, "ranks", tokenizer, cfg, batch_size=2, shuffle=False, seed=0,
                                 length_bucketing=False)
    batch = next(iter(loader))
    groups = rank_groups(batch.input_ids.shape[0], batch.pairs, batch.pair_group)
    assert groups == [[0, 1, 2], [3, 4]]
    layout = share_prefixes(batch.input_ids, batch.attention_mask, groups)
    scorer = RewardScorer(rm)
    plain = scorer(batch.input_ids, batch.attention_mask)
    plain.sum().backward()
    expected = grads(rm)
    shared = scorer(batch.input_ids, batch.attention_mask, layout=layout)
    shared.sum().backward()
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    for g, e in zip(grads(rm), expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_supports(tiny_model_dir, tiny_llama_dir, qwen2_window_dir):
    """SDPA / eager models take a layout, a LoRA-wrapped one too; a sliding window or flash attention does not."""
    import peft

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert supports(model)
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                               peft.LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert supports(lora)
    model.config._attn_implementation = "flash_attention_2"
    assert not supports(model)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    llama.config.sliding_window = 16
    assert not supports(llama)
    assert not supports(AutoModelForCausalLM.from_pretrained(qwen2_window_dir))  # Qwen2 with use_sliding_window


def group_rows(prompt: int, response: int, samples: int, prompts: int = 2) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``prompts`` x ``samples`` right-padded rows: each prompt's samples share ``prompt`` tokens, then ``response``."""
    torch.manual_seed(0)
    ids = torch.randint(2, 500, (prompts * samples, prompt + response))
    for p in range(prompts):
        ids[p * samples:(p + 1) * samples, :prompt] = ids[p * samples, :prompt]
    groups = [list(range(p * samples, (p + 1) * samples)) for p in range(prompts)]
    return ids, torch.ones_like(ids), groups


def test_sharing_pays_by_hand():
    """width 256 (6 d = 1536 per token slot, pairs at 0.5): G = 8 responses of 256 tokens to a 96-token prompt pack
    into a row of 96 + 8 x 256 = 2144 slots and 2144^2 / 2 = 2.30M pair units, against 8 rows of 352 slots and
    8 x 352^2 / 2 = 0.50M: 2144 x 1536 + 2.30M = 5.59M > 2816 x 1536 + 0.50M = 4.82M, so the padded rows run. With
    32-token responses the packed row costs 352 x 1536 + 62K = 0.60M against 1024 x 1536 + 66K = 1.64M: shared."""
    assert not sharing_pays(*group_rows(96, 256, 8, prompts=1), hidden_size=256)
    assert sharing_pays(*group_rows(96, 32, 8, prompts=1), hidden_size=256)
    assert sharing_pays(*group_rows(300, 64, 2), hidden_size=256)  # a preference pair's long prompt


def test_grouped_scoring_shares_only_where_it_pays(tiny_model_dir, monkeypatch):
    """A rollout of G = 8 long responses to a short prompt is scored as padded rows (no layout is built); short ones
    share their prompt; the log-probs are the same either way."""
    import prefopt.scoring

    built = []
    share = prefopt.scoring.share_prefixes
    monkeypatch.setattr(prefopt.scoring, "share_prefixes", lambda *a, **k: built.append(1) or share(*a, **k))
    scorer = TokenScorer(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    for prompt, response, shared in [(4, 40, False), (40, 4, True)]:
        ids, mask, groups = group_rows(prompt, response, 8)
        score_mask = torch.zeros_like(ids)
        score_mask[:, prompt:] = 1
        group = torch.arange(2).repeat_interleave(8)
        built.clear()
        with torch.no_grad():
            logps, _ = prefopt.scoring.grouped_token_logps(scorer, ids, mask, score_mask, group)
            plain, _ = scorer(ids, mask, score_mask)
        assert bool(built) is shared
        torch.testing.assert_close(logps, plain, atol=1e-5, rtol=0)
