"""Prefix sharing (prefopt.prefix) gives the same log-probs, losses, scores and gradients as the padded rows.

Both layouts are checked by hand on small examples; the model-level checks run the nano GPT-2, Llama and Qwen2 and
the realistic fixtures (dropout off: ``from_pretrained`` returns the model in eval mode, and training turns dropout
off, ``model.disable_dropout``; with it on, two layouts draw different masks) with SDPA and eager attention, in
every layout (packed, one segment per row, the prefix's KV cache reused by its branches), and compare with the
unshared rows: fp32 within 1e-6 (log-probs) and 1e-6 relative (gradients); under bf16 autocast each layout's
distance to the fp32 values within 1e-3 of the unshared bf16 path's own (tests/test_lm_head.py's rule).
"""

from __future__ import annotations

import peft
import pytest
import torch

import prefopt.prefix
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from prefopt.algorithms.orpo import ORPO, ORPOConfig
from prefopt.algorithms.pairwise import policy_logps, resolve_loss
from prefopt.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from prefopt.data import build_dataloader, load_rows
from prefopt.prefix import (CachedPrefixLayout, SharedPrefixLayout, cache_prefixes, choose_layout,
                            pair_groups, rank_groups, share_prefixes, supports)
from prefopt.scoring import RewardScorer, TokenScorer, grouped_token_logps
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


def test_cached_layout_by_hand():
    """[5 6 7 8], [5 6 9] and [4 3] (a prompt of its own, shorter: left-padded): the prefixes [5 6] and [4 3] run
    once, the branches [7 8] and [9] on the first one's cache with positions 2.. and its mask before their own."""
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, PAD], [4, 3, PAD, PAD], [1, 2, 3, PAD]])
    mask = (ids != PAD).long()
    layout = cache_prefixes(ids, mask, [[0, 1], [2], [3]])
    assert layout.prefix_ids.tolist() == [[0, 5, 6], [0, 4, 3], [1, 2, 3]]
    assert layout.prefix_mask.tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert layout.prefix_positions.tolist() == [[0, 0, 1], [0, 0, 1], [0, 1, 2]]
    assert layout.branch_ids.tolist() == [[7, 8], [9, PAD]]
    assert layout.branch_mask.tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert layout.branch_positions.tolist() == [[2, 3], [2, 2]]  # padding repeats the row's last position
    assert layout.prefix_of.tolist() == [0, 0]
    # flat index: 3 prefix rows of 3 (0..8), then 2 branch rows of 2 (9..12)
    assert layout.source[:, :3].tolist() == [[1, 2, 9], [1, 2, 11], [4, 5, 0], [6, 7, 8]]
    assert layout.source[0, 3] == 10
    assert layout.num_tokens == 9 + 4


def test_rows_that_share_nothing_are_their_own_prefixes():
    """A group whose rows differ at the first token: each row runs as a prefix of its own, no branch."""
    ids = torch.tensor([[1, 2, 3], [4, 5, PAD]])
    layout = cache_prefixes(ids, (ids != PAD).long(), [[0, 1]])
    assert layout.prefix_ids.tolist() == [[1, 2, 3], [0, 4, 5]] and layout.branch_ids.numel() == 0


@pytest.mark.parametrize("build", [share_prefixes, cache_prefixes])
def test_left_padding_is_refused(build):
    ids = torch.tensor([[PAD, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="right-padded"):
        build(ids, (ids != PAD).long(), [[0, 1]])


def test_rank_groups_from_pairs():
    """Rows compared in one prompt form a group; a row in no pair (a tie) is alone."""
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 4]])
    groups = rank_groups(6, pairs, torch.tensor([0, 0, 0, 1]))
    assert groups == [[0, 1, 2], [3, 4], [5]]


def layout_of(kind: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: list) -> object:
    """The layout ``kind`` of right-padded rows: packed, one segment per row, or the prefix's KV cache (its branches
    in one forward, or in 16-token chunks: ``chunked``)."""
    if kind.startswith("cached"):
        return cache_prefixes(input_ids, attention_mask, groups)
    return share_prefixes(input_ids, attention_mask, groups, pack=kind == "packed")


KINDS = ["packed", "one-per-row", "cached", "cached-chunks"]


@pytest.fixture
def chunked(monkeypatch):
    """``chunked(kind, size)``: the cached layout's branches in ``size``-token chunks for kind "cached-chunks" (the
    rows here are shorter than the 128 tokens a chunk takes by default): 2-4 chunks, as 256-512-token branches."""
    def set_kind(kind: str, size: int = 32) -> None:
        if kind == "cached-chunks":
            monkeypatch.setattr(prefopt.prefix.cached, "BRANCH_CHUNK", size)
    return set_kind


@pytest.fixture(scope="module")
def pair_batch(tiny_model_dir, hh_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(path=str(hh_path), eval_fraction=0.0, max_examples=6, max_length=160, max_prompt_length=96)
    loader, _ = build_dataloader(load_rows(cfg, "pairs").train, "pairs", tokenizer, cfg, batch_size=6,
                                 shuffle=False, seed=0, length_bucketing=False)
    return next(iter(loader))


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp(min=1e-30))


def load_lm(request, arch: str, attention: str = "sdpa") -> torch.nn.Module:
    """The nano models by architecture (qwen2: the qwen2-window fixture with its window off), or a realistic fixture
    by name (tests/realistic.py); fp32, eval mode (no dropout)."""
    extra = {}
    if arch in ("gpt2", "llama"):
        model_dir = request.getfixturevalue("tiny_model_dir" if arch == "gpt2" else "tiny_llama_dir")
    elif arch == "qwen2":
        model_dir = request.getfixturevalue("qwen2_window_dir")
        extra = {"use_sliding_window": False, "sliding_window": None, "layer_types": ["full_attention"] * 2}
    else:
        model_dir = request.getfixturevalue("realistic_model_dirs")[arch]
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, dtype=torch.float32,
                                                **extra)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights of a useful scale: nano models start close to uniform."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def scored(scorer, batch, layout, bf16: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-token log-probs of the completions and the gradients of a weighted sum of them."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logps, _ = scorer(batch.input_ids, batch.attention_mask, batch.completion_mask,
                          **({} if layout is None else {"layout": layout}))
    (logps.sum(-1) * torch.linspace(1, 2, logps.shape[0])).sum().backward()
    return logps.detach(), grads(scorer)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt2-real", "llama-chat"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_token_logps_and_gradients_equal_unshared(request, pair_batch, arch, attention, kind, chunked):
    chunked(kind)
    model = perturbed(load_lm(request, arch, attention))
    assert supports(model)
    scorer, batch = TokenScorer(model), pair_batch
    layout = layout_of(kind, batch.input_ids, batch.attention_mask, pair_groups(batch.num_pairs))
    assert layout.num_tokens < batch.input_ids.numel()  # the prompts really are written once
    if kind == "cached-chunks":
        assert len(prefopt.prefix.branch_chunks(layout.branch_ids.shape[1])) >= 2
    plain, expected = scored(scorer, batch, None)
    shared, got = scored(scorer, batch, layout)
    torch.testing.assert_close(shared, plain, atol=1e-6, rtol=1e-6)
    assert max(relative(g, e) for g, e in zip(got, expected)) < 2e-6


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_adds_no_error(request, pair_batch, kind, chunked):
    """Under bf16 autocast (llama-chat, bf16 weights loaded in fp32) each layout is as close to the fp32 values as
    the unshared bf16 rows are, within 1e-3 (log-probs in nats, gradients relative)."""
    chunked(kind)
    scorer, batch = TokenScorer(perturbed(load_lm(request, "llama-chat"))), pair_batch
    layout = layout_of(kind, batch.input_ids, batch.attention_mask, pair_groups(batch.num_pairs))
    truth, truth_grads = scored(scorer, batch, None)
    plain, plain_grads = scored(scorer, batch, None, bf16=True)
    shared, got = scored(scorer, batch, layout, bf16=True)
    assert float((shared - truth).abs().max()) < float((plain - truth).abs().max()) + 1e-3
    for g, p, t in zip(got, plain_grads, truth_grads):
        assert relative(g, t) < relative(p, t) + 1e-3


def test_lora_gradients_equal_unshared(request, pair_batch):
    """A LoRA-wrapped llama-chat (peft): the adapter's gradients through the cached layout equal the padded rows'."""
    lm = peft.get_peft_model(load_lm(request, "llama-chat"), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                              init_lora_weights=False))
    scorer, batch = TokenScorer(lm), pair_batch
    assert supports(lm)
    layout = cache_prefixes(batch.input_ids, batch.attention_mask, pair_groups(batch.num_pairs))
    plain, expected = scored(scorer, batch, None)
    shared, got = scored(scorer, batch, layout)
    assert len(got) == len(expected) > 0 and all("lora" in n for n, p in lm.named_parameters() if p.requires_grad)
    torch.testing.assert_close(shared, plain, atol=1e-6, rtol=1e-6)
    assert max(relative(g, e) for g, e in zip(got, expected)) < 2e-6


@pytest.mark.parametrize("kind", [None, *KINDS])
def test_dpo_loss_equal_unshared(tiny_model_dir, pair_batch, kind):
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = perturbed(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    layout = None if kind is None else layout_of(kind, pair_batch.input_ids, pair_batch.attention_mask,
                                                 pair_groups(pair_batch.num_pairs))
    losses = []
    for lay in (None, layout):
        with torch.no_grad():
            c, r, cl, rl = policy_logps(TokenScorer(policy), pair_batch, lay)
            rc, rr, _, _ = policy_logps(TokenScorer(reference), pair_batch, lay)
        losses.append(float(resolve_loss("sigmoid", {})(PairLogps(c, r, rc, rr, cl, rl), 0.1).mean()))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.parametrize("nll_on", ["response", "full"])
def test_orpo_loss_equal_unshared(tiny_model_dir, pair_batch, nll_on, monkeypatch):
    """ORPO scores the chosen prompt tokens too with nll_on=full: they are read once from the shared prefix (every
    layout forced in turn)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    losses = []
    for sharing, kind in [(False, None), (True, "packed"), (True, "cached")]:
        monkeypatch.setattr(prefopt.prefix.choice, "layout_costs", lambda *a, **k: {"padded": 2, "packed": 1, kind: 0})
        cfg = ORPOConfig(beta=0.25, nll_on=nll_on, prefix_sharing=sharing)
        algorithm = ORPO(cfg, RunConfig(algorithm=cfg, model=ModelConfig(), train=TrainConfig()), tokenizer)
        algorithm.model = TokenScorer(policy)
        assert sharing is False or isinstance(algorithm.layout(pair_batch),
                                              CachedPrefixLayout if kind == "cached" else SharedPrefixLayout)
        with torch.no_grad():
            loss, _ = algorithm.losses(pair_batch)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0] == pytest.approx(losses[2], abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_reward_scores_equal_unshared_k3(offline_model, kind, chunked):
    """Three ranked completions of one prompt share it; a second prompt has two. Scores and gradients match (on
    gpt2-real, pad = eos: both read the token before each completion's eos; the score head on the last real token
    of each branch)."""
    chunked(kind)
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
    layout = layout_of(kind, batch.input_ids, batch.attention_mask, groups)
    scorer = RewardScorer(rm)
    plain = scorer(batch.input_ids, batch.attention_mask)
    (plain * torch.linspace(1, 2, 5)).sum().backward()
    expected = grads(rm)
    shared = scorer(batch.input_ids, batch.attention_mask, layout=layout)
    (shared * torch.linspace(1, 2, 5)).sum().backward()
    torch.testing.assert_close(shared, plain, atol=1e-6, rtol=1e-6)
    assert max(relative(g, e) for g, e in zip(grads(rm), expected)) < 2e-6


def test_supports(tiny_model_dir, tiny_llama_dir, qwen2_window_dir):
    """SDPA / eager models take a layout, a LoRA-wrapped one too; a sliding window or flash attention does not."""
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
    ids = torch.tensor([[1, 2, 3], [1, 2, 4]])
    assert choose_layout(ids, torch.ones_like(ids), [[0, 1]], llama) is None


# ---------------------------------------------------------------------------------------- online groups
def rollout_rows(tokenizer_eos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two prompts of 11 and 4 tokens (left-padded to 11), G = 4 responses each of up to 9 tokens: some end early at
    EOS (1 on EOS, 0 after), some are truncated at 9 (no EOS), as a rollout lays them out."""
    torch.manual_seed(1)
    prompts = torch.randint(3, 400, (2, 11))
    prompt_mask = torch.ones(2, 11, dtype=torch.long)
    prompt_mask[1, :7] = 0
    prompts[1, :7] = tokenizer_eos  # pad = eos, as gpt2-real
    responses = torch.randint(3, 400, (8, 9))
    response_mask = torch.ones(8, 9, dtype=torch.long)
    for row, end in {0: 2, 3: 5, 5: 0, 6: 7}.items():  # EOS at column `end`, padding after
        responses[row, end] = tokenizer_eos
        responses[row, end + 1:] = tokenizer_eos
        response_mask[row, end + 1:] = 0
    ids = torch.cat([prompts.repeat_interleave(4, 0), responses], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(4, 0), response_mask], 1)
    score = torch.cat([torch.zeros_like(prompt_mask.repeat_interleave(4, 0)), response_mask], 1)
    return ids, mask, score, torch.arange(2).repeat_interleave(4)


@pytest.mark.parametrize("arch", ["gpt2-real", "llama-chat", "qwen2"])
@pytest.mark.parametrize("kind", [*KINDS, "chosen"])
def test_grouped_scoring_equal_unshared(request, arch, kind, monkeypatch, chunked):
    """GRPO / RLOO groups: left-padded prompts of different lengths, early EOS, truncation, temperature 0.7 and
    entropies: log-probs, entropies and gradients of each layout (forced, or as chosen by cost) equal the padded
    rows'. The first response token's log-prob comes from the prompt's last hidden state."""
    chunked(kind, 4)  # 9-token branches: 2 chunks
    model = perturbed(load_lm(request, arch))
    if kind != "chosen":
        costs = {"padded": 2, "packed": 1, "one-per-row": 1, "cached": 1}
        monkeypatch.setattr(prefopt.prefix.choice, "layout_costs",
                            lambda *a, **k: {**costs, kind.replace("-chunks", ""): 0})
        if kind == "one-per-row":
            monkeypatch.setattr(prefopt.prefix.choice, "share_prefixes", lambda *a: share_prefixes(*a, pack=False))
    scorer = TokenScorer(model)
    eos = model.generation_config.eos_token_id
    ids, mask, score, group = rollout_rows(eos[0] if isinstance(eos, list) else eos)
    out = {}
    for name, g in [("plain", None), ("grouped", group)]:
        logps, entropy = grouped_token_logps(scorer, ids, mask, score, g, 0.7, True)
        (logps.sum(-1) * torch.linspace(1, 2, 8) + entropy.sum(-1)).sum().backward()
        out[name] = logps.detach(), entropy.detach(), grads(model)
    torch.testing.assert_close(out["grouped"][0], out["plain"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["grouped"][1], out["plain"][1], atol=1e-5, rtol=0)  # ~6 nats
    assert max(relative(g, e) for g, e in zip(out["grouped"][2], out["plain"][2])) < 2e-6
    assert (out["plain"][0][:, 11] != 0).all()  # the first response token is scored
