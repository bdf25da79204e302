"""The online family at its edges, through the real Trainer where the defect lived there: a short last batch, bf16
evaluation, the learning-rate schedule, the reference nobody reads, greedy groups; and the knobs TRL's GRPO users
expect, each against its definition (by hand here; GSPO, top-entropy and truncation masking also against TRL in
tests/test_parity_trl_online.py and tests/test_parity_trl_online_e2e.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from prefopt.algorithms.a2c import A2C
from prefopt.algorithms.grpo import GRPO
from prefopt.algorithms.ppo import PPO
from prefopt.config import ModelConfig, build_run_config
from prefopt.errors import ConfigError
from prefopt.models import load_tokenizer
from prefopt.registry import ADVANTAGES
from prefopt.rl.advantages import AdvantageInputs
from prefopt.rl.algorithm import OnlineAlgorithm, Scored
from prefopt.rl.engine import generate
from prefopt.rl.rewards import CompositeReward
from prefopt.tasks import TASK_REWARD, write_task_prompts
from prefopt.trainer import Trainer
from prefopt.types import PromptBatch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each run picks its own mixed precision; accelerate keeps one per process unless its state is reset."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def recipe(name: str, model_dir: Path, prompts: Path, out: Path, train: dict | None = None, **algorithm) -> dict:
    return {"algorithm": {"name": name, "rewards": [TASK_REWARD], "generation": {"max_new_tokens": 4}, **algorithm},
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(prompts), "format": "prompts", "eval_fraction": 0.0},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "log_every": 1,
                      "progress": False, "mixed_precision": "no", "save_model": False, **(train or {})}}


# ------------------------------------------------------------------------------------------ defects


@pytest.mark.slow
def test_a_short_last_batch_never_reaches_an_update(gpt2_real_dir, tmp_path, monkeypatch):
    """61 prompts in batches of 4 with length bucketing: the loader's short batch (1 prompt) used to land mid-epoch and
    crash REINFORCE++'s update with an empty minibatch (2 minibatches x 2 micro-batches of 1 row). Now each epoch
    leaves one prompt out and every update of 16 steps (an epoch and one step) gets full micro-batches."""
    prompts = tmp_path / "prompts.jsonl"  # 61 distinct prompts (the task's draw repeats some)
    prompts.write_text("".join(json.dumps({"prompt": f"\n\nHuman: question {i}?\n\nAssistant:"}) + "\n"
                               for i in range(61)))
    rows: list[int] = []
    loss = OnlineAlgorithm.loss
    monkeypatch.setattr(OnlineAlgorithm, "loss", lambda self, scored, advantages, micro: (
        rows.append(len(micro.rows)), loss(self, scored, advantages, micro))[1])
    config = recipe("reinforce_pp", gpt2_real_dir, prompts, tmp_path / "run",
                    train={"max_steps": 16, "gradient_accumulation_steps": 2})
    assert config["algorithm"].get("num_minibatches") is None  # REINFORCE++'s defaults: 2 minibatches, G = 1
    trainer = Trainer(build_run_config(config))
    trainer.fit()
    assert trainer.data_report["rows"]["train"] == 61 and trainer.data_report["rows_left_out_per_epoch"] == 1
    assert rows == [1] * (16 * 2 * 2)  # 16 steps x 2 minibatches x 2 micro-batches, each of one of its 4 prompts


@pytest.mark.slow
def test_bf16_eval_kl_is_zero_when_the_policy_is_its_reference(gpt2_real_dir, tmp_path):
    """Under bf16 mixed precision at learning rate 0: eval/kl compared the sampler's log-probs (no autocast) with the
    reference's (autocast), 2.4e-4 per response of pure precision bias; both now come from the same forward."""
    prompts = write_task_prompts(tmp_path / "prompts.jsonl", 16)
    config = recipe("grpo", gpt2_real_dir, prompts, tmp_path / "run", num_samples=2, kl_coef=0.05,
                    train={"max_steps": 1, "learning_rate": 0.0, "mixed_precision": "bf16"})
    config["data"]["eval_fraction"] = 0.25
    final = Trainer(build_run_config(config)).fit()
    assert final["eval/kl"] == 0.0


@pytest.mark.slow
def test_the_learning_rate_moves_once_per_optimizer_update(gpt2_real_dir, tmp_path):
    """GRPO with 2 epochs x 2 minibatches makes 4 updates a step: a linear schedule with warm-up over 2 steps x 4
    updates sets update i's rate to lr * i/4 (i < 4), then lr * (8 - i)/4 (it used to move once per step)."""
    prompts = write_task_prompts(tmp_path / "prompts.jsonl", 16)
    config = recipe("grpo", gpt2_real_dir, prompts, tmp_path / "run", num_samples=2, epochs=2, num_minibatches=2,
                    train={"lr_scheduler": "linear", "warmup_steps": 1})
    rates: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: rates.append(optimizer.param_groups[0]["lr"]))
    try:
        Trainer(build_run_config(config)).fit()
    finally:
        hook.remove()
    expected = [1e-3 * (i / 4 if i < 4 else (8 - i) / 4) for i in range(8)]
    assert rates == pytest.approx(expected, abs=1e-12)


def test_no_reference_copy_is_loaded_when_nothing_reads_it(gpt2_real_dir, tmp_path):
    """GRPO at beta 0 (its default) with full weights reads no reference in training: none is loaded (its
    docstring said so; a full copy was loaded for the eval KL), and evaluation reports no eval/kl."""
    prompts = write_task_prompts(tmp_path / "prompts.jsonl", 8)
    built = {}
    for beta in (0.0, 0.05):
        run = build_run_config(recipe("grpo", gpt2_real_dir, prompts, tmp_path / "run", kl_coef=beta))
        grpo = GRPO(run.algorithm, run, load_tokenizer(run.model))
        grpo.build()
        built[beta] = grpo
    assert built[0.0].reference is None and not built[0.0].has_reference
    assert built[0.05].reference is not None


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp", "ppo"])
def test_lora_dropout_is_refused_for_online_algorithms(name):
    """The model's dropout was turned off before the adapter was added, so ``model.lora.dropout: 0.05`` (the
    repository's LoRA recipes) stayed on: the first update's ratio was 0.883-1.170 instead of exactly 1."""
    data = {"algorithm": {"name": name}, "model": {"lora": {"r": 4, "dropout": 0.05}}}
    with pytest.raises(ConfigError) as error:
        build_run_config(data)
    assert str(error.value) == (f"model.lora.dropout=0.05: {name} compares the policy with its old self and its "
                                "reference token by token; dropout must be off")
    data["model"]["lora"]["dropout"] = 0.0
    build_run_config(data)


def test_greedy_sampling_of_a_group_is_refused():
    """do_sample: false with G > 1 gives every sample of a prompt the same response: all group advantages are 0."""
    for name in ("grpo", "rloo"):
        with pytest.raises(ConfigError, match=r"algorithm.generation.do_sample=False: greedy decoding gives the"):
            build_run_config({"algorithm": {"name": name, "generation": {"do_sample": False}}})
    build_run_config({"algorithm": {"name": "reinforce_pp", "generation": {"do_sample": False}}})  # G = 1: fine


# ------------------------------------------------------------------------------------------ knobs


def test_reinforce_pp_with_a_group_baseline_by_hand():
    """2 prompts x 2 samples, beta-shaped rewards -0.1 per token, scores 1, 3 | 0, 2 (group means 2 and 1): the
    centred scores -1, +1 | -1, +1 go at the last tokens, then returns to go, then the batch mean and std."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    scores = torch.tensor([1.0, 3.0, 0.0, 2.0])
    last = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    rewards = -0.1 * mask + last * scores[:, None]
    inputs = AdvantageInputs(rewards, mask, torch.tensor([0, 0, 1, 1]), scores=scores)
    config = build_run_config({"algorithm": {"name": "reinforce_pp", "num_samples": 2,
                                             "advantage": "reinforce_pp_baseline"}}).algorithm
    advantages, returns = ADVANTAGES.get("reinforce_pp_baseline")(inputs, config)
    expected_returns = torch.tensor([[-1.2, -1.1], [0.9, 0.0], [-1.2, -1.1], [0.9, 0.0]])
    torch.testing.assert_close(returns, expected_returns)
    values = torch.tensor([-1.2, -1.1, 0.9, -1.2, -1.1, 0.9])
    expected = (expected_returns - values.mean()) / values.std() * mask
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    plain, _ = ADVANTAGES.get("reinforce_pp")(inputs, config)
    assert not torch.allclose(plain, advantages, atol=1e-3)  # the baseline changes them
    with pytest.raises(ConfigError, match="algorithm.num_samples=1: advantage=reinforce_pp_baseline"):
        build_run_config({"algorithm": {"name": "reinforce_pp", "advantage": "reinforce_pp_baseline"}})


def test_zero_std_groups_and_truncated_responses_are_logged():
    """Scores 1, 1 | 0, 2: one group of two gives no signal (frac_reward_zero_std 0.5); one response of four was cut
    at max_new_tokens (truncated_fraction 0.25)."""
    run = build_run_config({"algorithm": {"name": "grpo", "num_samples": 2}})
    grpo = GRPO(run.algorithm, run, None)
    mask = torch.ones(4, 3)
    rollout = SimpleNamespace(group=torch.tensor([0, 0, 1, 1]), ended=torch.tensor([True, False, True, True]),
                              seconds=1.0, tokens_per_s=1.0)
    scored = Scored(rollout, mask, None, None, torch.tensor([1.0, 1.0, 0.0, 2.0]), {}, torch.zeros_like(mask),
                    torch.zeros_like(mask))
    metrics = grpo.rollout_metrics(scored)
    assert metrics["frac_reward_zero_std"] == 0.5
    assert metrics["truncated_fraction"] == 0.25


def test_mask_truncated_completions_leaves_cut_responses_out_of_the_loss_only():
    run = build_run_config({"algorithm": {"name": "grpo", "mask_truncated_completions": True}})
    grpo = GRPO(run.algorithm, run, None)
    rollout = SimpleNamespace(ended=torch.tensor([True, False]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert grpo.loss_mask(rollout, mask).tolist() == [[1.0, 1.0], [0.0, 0.0]]
    run = build_run_config({"algorithm": {"name": "grpo"}})
    assert GRPO(run.algorithm, run, None).loss_mask(rollout, mask).tolist() == mask.tolist()


def test_pass_at_k_and_mean_at_k_at_evaluation(gpt2_real_dir):
    """k = 3 seeded samples per held-out prompt: reward/mean@3 is the mean over prompts of their samples' mean score,
    reward/pass@3 the share of prompts with a sample scoring >= eval_pass_threshold (sums here, per prompt)."""
    run = build_run_config({"algorithm": {"name": "grpo", "eval_num_samples": 3, "eval_pass_threshold": 1.0,
                                          "generation": {"max_new_tokens": 6}},
                            "model": {"name_or_path": str(gpt2_real_dir)}})
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(gpt2_real_dir)))
    grpo = GRPO(run.algorithm, run, tokenizer)
    grpo.build()
    score = lambda prompts, completions, **kw: [float(len(r) % 3 == 0) for r in completions]  # noqa: E731
    grpo.reward = CompositeReward([{"name": "callable", "params": {"fn": score}}], tokenizer, "cpu")
    texts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(6)]
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    batch = PromptBatch(encoded["input_ids"], encoded["attention_mask"], texts, [{}] * 6)
    out = grpo.evaluate(batch)
    rollout = generate(grpo.policy, tokenizer, batch, run.algorithm.generation, 3, seed=run.train.seed)
    scores = torch.tensor(score(None, rollout.responses)).view(6, 3)
    assert out["count"] == 6 and "kl" not in out  # beta 0, full weights: no reference
    assert out["reward/mean@3"] == pytest.approx(float(scores.mean(-1).sum()))
    assert out["reward/pass@3"] == float(scores.max(-1).values.sum())
    assert 0 < out["reward/pass@3"] < 6 and out["reward/pass@3"] > out["reward/mean@3"]  # the draw separates them


@pytest.mark.parametrize("algorithm_cls, name", [(PPO, "ppo"), (A2C, "a2c")])
def test_the_critic_learns_at_its_own_rate(algorithm_cls, name, gpt2_real_dir):
    """``critic_learning_rate``: the critic's parameters form their own optimizer group at that rate; without it one
    group holds everything at train.learning_rate."""
    algorithm = {"name": name, "rewards": [TASK_REWARD]}
    if name == "a2c":
        algorithm.update({"preference_weight": 0.0, "rules": {}, "trainable_layers": 1})
    for critic_lr in (None, 3e-4):
        run = build_run_config({"algorithm": {**algorithm, "critic_learning_rate": critic_lr},
                                "model": {"name_or_path": str(gpt2_real_dir)}})
        built = algorithm_cls(run.algorithm, run, load_tokenizer(run.model))
        built.build()
        groups = built.parameter_groups()
        trained = {id(p) for p in built.model.parameters() if p.requires_grad}
        assert {id(p) for g in groups for p in g["params"]} == trained
        if critic_lr is None:
            assert len(groups) == 1
            continue
        policy, critic = groups
        assert critic["lr"] == critic_lr and "lr" not in policy
        assert {id(p) for p in critic["params"]} == {id(p) for p in built.critic.parameters()}
        assert policy["params"] and critic["params"]


@pytest.mark.parametrize("name", ["ppo", "a2c"])
def test_the_trainer_moves_the_critic_at_its_own_rate(name, gpt2_real_dir, tmp_path):
    """Through the Trainer: Adam's first update moves each parameter by its group's learning rate (g / |g|), so the
    policy moves by at most train.learning_rate and the critic by critic_learning_rate."""
    prompts = write_task_prompts(tmp_path / "prompts.jsonl", 8)
    algorithm = {"critic_learning_rate": 1e-2, "generation": {"max_new_tokens": 8}}  # some responses score > 0
    if name == "a2c":
        algorithm.update({"preference_weight": 0.0, "rules": {}, "trainable_layers": 1})
    config = recipe(name, gpt2_real_dir, prompts, tmp_path / "run", **algorithm,
                    train={"max_steps": 1, "batch_size": 8, "learning_rate": 1e-4})
    moved: list[list[float]] = []
    before: dict[int, torch.Tensor] = {}

    def snapshot(optimizer, args, kwargs):
        before.update({id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]})

    def measure(optimizer, args, kwargs):
        moved.append([max(float((p.detach() - before[id(p)]).abs().max()) for p in g["params"])
                      for g in optimizer.param_groups])

    hooks = [register_optimizer_step_pre_hook(snapshot), register_optimizer_step_post_hook(measure)]
    try:
        Trainer(build_run_config(config)).fit()
    finally:
        for hook in hooks:
            hook.remove()
    assert moved[0] == pytest.approx([1e-4, 1e-2], rel=1e-3)


def test_every_online_knob_is_documented_and_listed(capsys):
    """Every field an online algorithm's recipe may set has a docstring, and ``prefopt list`` shows the new ones."""
    from prefopt.cli import main
    from prefopt.config import describe_fields
    from prefopt.registry import ALGORITHMS

    online = [cls for _, cls in ALGORITHMS.items() if cls.kind == "prompts"]
    assert {cls.registry_name for cls in online} >= {"grpo", "rloo", "reinforce_pp", "ppo", "a2c"}
    for cls in online:
        assert all(doc for _, _, _, doc in describe_fields(cls.Config)), cls.registry_name
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for knob in ("importance_sampling", "top_entropy_quantile", "mask_truncated_completions", "eval_num_samples",
                 "eval_pass_threshold", "critic_learning_rate", "reinforce_pp_baseline", "token_mean"):
        assert knob in listed, knob
