"""GRPO's loss types (and GSPO's sequence ratio) and RLOO's loss equal TRL 1.16's GRPOTrainer / RLOOTrainer on the
same batch, to 1e-5, with off-policy ratios on both sides of the clip range (the end-to-end tests, through both
libraries' scoring and advantages, are in tests/test_parity_trl_online_e2e.py; their ratios are 1).

Both sides are computed here: TRL's own ``_compute_loss`` on an inputs dict built from one batch, and ours through
the online skeleton's ``update`` (prefopt.rl.algorithm) on the same tokens, advantages and old / reference
log-probs. The old log-probs are perturbed so the ratios leave the clip range, and the advantages have both signs,
so clipping binds on both sides. TRL is put in eval mode so it does not divide by its gradient-accumulation count.
TRL's training forward numbers positions from 0 even on left-padded prompts (it passes no position ids), while
generation numbers them from each row's first real token (as prefopt.scoring does); so the prompts here have one
length and both numberings agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.algorithms.grpo import GRPO, GRPOConfig
from prefopt.algorithms.rloo import RLOO, RLOOConfig
from prefopt.config import LogitsConfig, build_run_config
from prefopt.lm_head import chunking
from prefopt.registry import POLICY_LOSSES
from prefopt.rl.algorithm import Scored
from prefopt.rl.engine import GenerationConfig, SampledRollout
from prefopt.rl.losses import PolicyLossInputs
from prefopt.scoring import TokenScorer

pytestmark = pytest.mark.usefixtures("one_thread")

G, PROMPTS, PROMPT_LEN, RESPONSE_LEN = 4, 2, 6, 7


def constant_reward(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def batch(gpt2_real_dir):
    """One rollout-shaped batch: 8 rows (2 prompts x G = 4), responses of 3..7 tokens, perturbed old log-probs."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_real_dir)
    policy = AutoModelForCausalLM.from_pretrained(gpt2_real_dir)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rows = PROMPTS * G
    prompt_ids = torch.randint(5, 500, (PROMPTS, PROMPT_LEN)).repeat_interleave(G, 0)
    response_ids = torch.randint(5, 500, (rows, RESPONSE_LEN))
    lengths = torch.tensor([7, 3, 5, 7, 4, 7, 6, 2])
    response_mask = (torch.arange(RESPONSE_LEN) < lengths[:, None]).long()
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    rollout = SampledRollout(prompt_ids, torch.ones_like(prompt_ids), response_ids, response_mask,
                             torch.zeros(rows, RESPONSE_LEN), ended=lengths < RESPONSE_LEN,
                             group=torch.arange(PROMPTS).repeat_interleave(G))
    mask = response_mask.float()
    with torch.no_grad():
        scorer = TokenScorer(policy.eval())
        logps = scorer(rollout.sequences, rollout.attention_mask, torch.cat([0 * prompt_ids, response_mask], 1))[0]
        ref = TokenScorer(reference)(rollout.sequences, rollout.attention_mask,
                                     torch.cat([0 * prompt_ids, response_mask], 1))[0]
    old_logps = (logps[:, PROMPT_LEN:] + 0.3 * torch.randn(rows, RESPONSE_LEN)) * mask
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.2, 1.1, -0.8])
    return dict(tokenizer=tokenizer, policy=policy, reference=reference, rollout=rollout, mask=mask, old_logps=old_logps,
                ref_logps=ref[:, PROMPT_LEN:] * mask, advantages=advantages)


def update_losses(batch, algorithm_cls, config, accumulation: int = 1) -> list[torch.Tensor]:
    """The micro-batch losses our skeleton yields for the one update of this batch (old and reference log-probs
    given), each as the Trainer receives it (accelerate divides each by the accumulation count)."""
    run = build_run_config({"algorithm": algorithm_cls.registry_name,
                            "train": {"gradient_accumulation_steps": accumulation}})
    algorithm = algorithm_cls(config, run=run, tokenizer=batch["tokenizer"])
    algorithm.model = TokenScorer(batch["policy"])
    mask = batch["mask"]
    scored = Scored(batch["rollout"], mask, batch["old_logps"], batch["ref_logps"], torch.zeros(len(mask)), {},
                    torch.zeros_like(mask), torch.zeros_like(mask))
    return [out.loss for out in algorithm.update(scored, batch["advantages"][:, None] * mask, {})]


def ours(batch, algorithm_cls, config) -> float:
    with torch.no_grad():
        (loss,) = update_losses(batch, algorithm_cls, config)
    return float(loss)


def trl_inputs(batch) -> dict:
    rollout = batch["rollout"]
    return {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "completion_ids": rollout.response_ids, "completion_mask": rollout.response_mask,
            "advantages": batch["advantages"]}


def trl_grpo_loss(batch, tmp_path, **args) -> float:
    from trl import GRPOConfig as TRLGRPOConfig, GRPOTrainer

    config = TRLGRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                           per_device_train_batch_size=PROMPTS * G, num_generations=G,
                           max_completion_length=RESPONSE_LEN, **args)
    trainer = GRPOTrainer(model=copy.deepcopy(batch["policy"]), reward_funcs=constant_reward, args=config,
                          train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8),
                          processing_class=batch["tokenizer"])
    trainer.model.eval()  # eval: TRL does not divide by its gradient-accumulation count
    inputs = {**trl_inputs(batch), "old_per_token_logps": batch["old_logps"],
              "ref_per_token_logps": batch["ref_logps"], "num_items_in_batch": batch["mask"].sum()}
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta, epsilon_high, correction", [(0.0, None, True), (0.1, 0.28, True), (0.1, None, False)])
def test_grpo_loss_types_equal_trl(batch, tmp_path, loss_type, beta, epsilon_high, correction):
    config = GRPOConfig(loss_type=loss_type, kl_coef=beta, epsilon=0.2, epsilon_high=epsilon_high,
                        kl_ratio_correction=correction, generation=GenerationConfig(max_new_tokens=RESPONSE_LEN))
    mine = ours(batch, GRPO, config)
    theirs = trl_grpo_loss(batch, tmp_path, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
                           use_bias_correction_kl=correction)
    assert mine == pytest.approx(theirs, abs=1e-5), (loss_type, beta, mine, theirs)
    # the loss depends on the clip range and on beta (the comparison could not pass by accident)
    other = GRPOConfig(loss_type=loss_type, kl_coef=beta + 0.5, epsilon=0.05, epsilon_high=epsilon_high,
                       kl_ratio_correction=correction, generation=GenerationConfig(max_new_tokens=RESPONSE_LEN))
    assert ours(batch, GRPO, other) != pytest.approx(mine, abs=1e-4)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gspo_sequence_ratio_equals_trl(batch, tmp_path, loss_type):
    """``importance_sampling: sequence`` (GSPO, Zheng et al. 2025, eq. 7): each row's tokens share the ratio
    exp(mean_t log pi/pi_old), clipped; TRL's importance_sampling_level="sequence". The old log-probs are perturbed, so
    the sequence ratios leave the clip range and the loss differs from the token-level one."""
    config = GRPOConfig(loss_type=loss_type, kl_coef=0.1, importance_sampling="sequence",
                        generation=GenerationConfig(max_new_tokens=RESPONSE_LEN))
    mine = ours(batch, GRPO, config)
    theirs = trl_grpo_loss(batch, tmp_path, loss_type=loss_type, beta=0.1, importance_sampling_level="sequence")
    assert mine == pytest.approx(theirs, abs=1e-5), (mine, theirs)
    token = GRPOConfig(loss_type=loss_type, kl_coef=0.1, generation=GenerationConfig(max_new_tokens=RESPONSE_LEN))
    assert ours(batch, GRPO, token) != pytest.approx(mine, abs=1e-4)


def test_gspo_gradient_is_the_papers(batch):
    """GSPO's gradient (Zheng et al. 2025, eq. 10): the rows whose clip does not bind contribute
    -A_i s_i (1/|y_i|) sum_t grad log pi(y_it), s_i = exp(mean_t log pi/pi_old) held fixed (the stop-gradient form);
    the clipped rows nothing. Checked against autograd of that surrogate, on a copy of the policy (a loss-value
    parity cannot see a ratio whose gradient is cut)."""
    batch = {**batch, "policy": copy.deepcopy(batch["policy"])}
    config = GRPOConfig(loss_type="grpo", importance_sampling="sequence", epsilon=0.05,  # GSPO's ranges are small
                        generation=GenerationConfig(max_new_tokens=RESPONSE_LEN))
    (loss,) = update_losses(batch, GRPO, config)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in batch["policy"].named_parameters()}
    batch["policy"].zero_grad()

    rollout, mask, advantages = batch["rollout"], batch["mask"], batch["advantages"]
    logps = TokenScorer(batch["policy"])(rollout.sequences, rollout.attention_mask,
                                         torch.cat([0 * rollout.prompt_mask, rollout.response_mask], 1))[0]
    mean_logps = (logps[:, PROMPT_LEN:] * mask).sum(-1) / mask.sum(-1)
    ratio = torch.exp(mean_logps.detach() - (batch["old_logps"] * mask).sum(-1) / mask.sum(-1))
    clipped = ((ratio > 1.05) & (advantages > 0)) | ((ratio < 0.95) & (advantages < 0))
    assert 0 < clipped.sum() < len(ratio)  # both kinds of rows are in this batch
    (-(~clipped * advantages * ratio * mean_logps).sum() / len(ratio)).backward()
    for name, p in batch["policy"].named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-7, rtol=1e-5, msg=name)
    assert max(float(g.abs().max()) for g in ours.values()) > 1e-3


def test_grpo_loss_types_differ_on_this_batch(batch):
    """The aggregations really differ here (unequal lengths), so each parity test checks its own normaliser."""
    losses = {t: ours(batch, GRPO, GRPOConfig(loss_type=t, generation=GenerationConfig(max_new_tokens=RESPONSE_LEN)))
              for t in ("grpo", "bnpo", "dr_grpo")}
    assert len({round(v, 5) for v in losses.values()}) == 3, losses


@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_rloo_loss_equals_trl(batch, tmp_path, epsilon_high):
    from trl import RLOOConfig as TRLRLOOConfig, RLOOTrainer

    config = TRLRLOOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                           per_device_train_batch_size=PROMPTS * G, num_generations=G,
                           max_completion_length=RESPONSE_LEN, epsilon=0.2, epsilon_high=epsilon_high)
    trainer = RLOOTrainer(model=copy.deepcopy(batch["policy"]), reward_funcs=constant_reward, args=config,
                          train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8),
                          processing_class=batch["tokenizer"])
    trainer.model.eval()
    # sequence ratios of this size: perturb the old sequence log-probs by a little per row only
    with torch.no_grad():
        logps, _ = TokenScorer(batch["policy"])(batch["rollout"].sequences, batch["rollout"].attention_mask,
                                                torch.cat([0 * batch["rollout"].prompt_mask,
                                                           batch["rollout"].response_mask], 1))
    shift = torch.tensor([0.3, -0.3, 0.1, -0.05, 0.25, 0.4, -0.2, 0.02])
    old_logps = logps[:, PROMPT_LEN:] * batch["mask"]
    old_logps[:, 0] += shift  # log rho_i = -shift_i: some rows clipped high, some low
    inputs = {**trl_inputs(batch), "old_logps": old_logps.sum(-1)}
    with torch.no_grad():
        theirs = float(trainer._compute_loss(trainer.model, inputs))
    mine = ours({**batch, "old_logps": old_logps}, RLOO,
                RLOOConfig(epsilon=0.2, epsilon_high=epsilon_high, kl_coef=0.05,
                           generation=GenerationConfig(max_new_tokens=RESPONSE_LEN)))
    assert mine == pytest.approx(theirs, abs=1e-5), (mine, theirs)
    unclipped = ours({**batch, "old_logps": old_logps}, RLOO, RLOOConfig(epsilon=10.0))
    assert unclipped != pytest.approx(mine, abs=1e-4)  # clipping binds on this batch


@pytest.mark.parametrize("algorithm_cls, config_cls, loss_type", [
    (GRPO, GRPOConfig, "grpo"), (GRPO, GRPOConfig, "token_mean"), (GRPO, GRPOConfig, "dapo"),
    (GRPO, GRPOConfig, "dr_grpo"), (RLOO, RLOOConfig, "sequence")])
def test_an_update_split_into_micro_batches_has_the_same_loss_and_gradient(batch, algorithm_cls, config_cls,
                                                                           loss_type):
    """train.gradient_accumulation_steps changes memory, not the update: G = 1, 2, 4 micro-batches of the same
    minibatch give the same loss (mean of the micro-batch losses) and the same gradient."""
    kl_in = "reward" if loss_type == "sequence" else "loss"  # the sequence loss has no k3 term (refused)
    config = config_cls(loss_type=loss_type, kl_coef=0.1, kl_in=kl_in, entropy_coef=0.01,
                        generation=GenerationConfig(max_new_tokens=RESPONSE_LEN))
    weight = batch["policy"].get_output_embeddings().weight
    results = []
    for accumulation in (1, 2, 4):
        losses = update_losses(batch, algorithm_cls, config, accumulation)
        assert len(losses) == accumulation
        total = torch.stack(losses).sum() / accumulation  # what accelerate accumulates
        (grad,) = torch.autograd.grad(total, weight)
        results.append((total.detach(), grad))
    for total, grad in results[1:]:
        torch.testing.assert_close(total, results[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_the_entropy_keeps_its_graph_only_when_its_bonus_is_on(batch, entropy_coef):
    """The update's loss and gradient equal a hand-built policy loss - entropy_coef * mean entropy (bnpo, all rows
    of the batch); with the LM head in chunks, the bonus saves no [tokens, vocab] tensor for the backward."""
    rollout, mask = batch["rollout"], batch["mask"]
    weight = batch["policy"].get_output_embeddings().weight
    saved: dict[float, int] = {}

    def update(coef: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
        config = GRPOConfig(loss_type="bnpo", entropy_coef=coef,
                            generation=GenerationConfig(max_new_tokens=RESPONSE_LEN))
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            run = build_run_config({"algorithm": "grpo"})
            algorithm = GRPO(config, run=run, tokenizer=batch["tokenizer"])
            algorithm.model = TokenScorer(batch["policy"])
            scored = Scored(rollout, mask, batch["old_logps"], None, torch.zeros(len(mask)), {},
                            torch.zeros_like(mask), torch.zeros_like(mask))
            (out,) = algorithm.update(scored, batch["advantages"][:, None] * mask, {})
        saved[coef] = sum(sizes)
        return out.loss, torch.autograd.grad(out.loss, weight)[0], out.metrics

    loss, grad, metrics = update(entropy_coef)
    score_mask = torch.cat([0 * rollout.prompt_ids, rollout.response_mask], 1)
    logps, entropy = TokenScorer(batch["policy"])(rollout.sequences, rollout.attention_mask, score_mask, 1.0, True)
    logps, entropy = logps[:, PROMPT_LEN:], entropy[:, PROMPT_LEN:]
    inputs = PolicyLossInputs(logps, batch["old_logps"], batch["advantages"][:, None] * mask, mask)
    expected = POLICY_LOSSES.get("bnpo")(inputs, GRPOConfig())[0] - entropy_coef * (entropy * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, weight)[0], atol=1e-6, rtol=1e-4)
    assert metrics["entropy"] == pytest.approx(float((entropy.detach() * mask).sum() / mask.sum()), rel=1e-5)
    if entropy_coef == 0:
        with chunking(LogitsConfig(keep_mb=0)):  # the LM head in chunks, none kept (prefopt.lm_head)
            update(0.0), update(0.05)
        tokens, vocab = int(mask.sum()), weight.shape[0]
        assert abs(saved[0.05] - saved[0.0]) < tokens * vocab  # the bonus saves no [tokens, vocab] tensor either


def scored_by_the_skeleton(batch, **config) -> tuple[GRPO, Scored, list[int]]:
    """GRPO's own ``score`` of the batch (zero rewards), and the number of policy forwards it ran."""
    algorithm = GRPO(GRPOConfig(generation=GenerationConfig(max_new_tokens=RESPONSE_LEN), **config),
                     run=build_run_config({"algorithm": "grpo"}), tokenizer=batch["tokenizer"])
    algorithm.model, algorithm.reference = TokenScorer(batch["policy"]), TokenScorer(batch["reference"])
    algorithm.reward = lambda rollout: (torch.zeros(len(rollout.response_ids)), {})
    forwards: list[int] = []
    algorithm.model.register_forward_hook(lambda *args: forwards.append(1))
    scored = algorithm.score(batch["rollout"])
    return algorithm, scored, forwards


def test_with_the_kl_a_loss_term_scoring_runs_no_policy_forward_and_the_update_logs_the_kl(batch):
    """kl_in=loss, beta > 0, one update: ``score`` runs only the reference; the ``kl`` metric (the sampling policy's
    KL per response) comes from the update's own log-probs and equals the one logged when score computes it."""
    algorithm, scored, forwards = scored_by_the_skeleton(batch, kl_coef=0.1, kl_in="loss")
    assert forwards == [] and scored.ref_logps is not None
    assert "kl" not in algorithm.rollout_metrics(scored)
    advantages = algorithm.advantages(scored)
    (out,) = algorithm.update(scored, advantages, {})
    shaped, scored_kl, forwards = scored_by_the_skeleton(batch, kl_coef=0.1, kl_in="reward")
    assert forwards == [1]  # the KL is a reward: score needs the policy's log-probs
    expected = shaped.rollout_metrics(scored_kl)["kl"]
    assert out.metrics["kl"] == pytest.approx(expected, abs=1e-5) and abs(expected) > 1e-3


def test_without_a_reference_no_kl_is_logged_in_training(batch):
    """beta = 0 (GRPO's default): no reference forward, so no ``kl`` metric (it was logged as a constant 0)."""
    algorithm, scored, forwards = scored_by_the_skeleton(batch)
    assert forwards == [] and scored.ref_logps is None
    (out,) = algorithm.update(scored, algorithm.advantages(scored), algorithm.rollout_metrics(scored))
    assert "kl" not in out.metrics and "reward/score" in out.metrics


def test_the_minibatches_of_a_rollout_hold_whole_prompts(batch):
    """num_minibatches = 2 over 2 prompts x G = 4: each update gets the 4 samples of one prompt (shuffled rows used
    to mix the groups, so no minibatch could score a prompt once for its samples)."""
    algorithm, scored, _ = scored_by_the_skeleton(batch, num_minibatches=2, epochs=3)
    rows: list[torch.Tensor] = []
    loss = algorithm.loss
    algorithm.loss = lambda scored, advantages, micro: (rows.append(micro.rows), loss(scored, advantages, micro))[1]
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = list(algorithm.update(scored, algorithm.advantages(scored), {}))
    assert len(outputs) == 6 and all(len(r) == G for r in rows)
    assert all(len(batch["rollout"].group[r].unique()) == 1 for r in rows)
