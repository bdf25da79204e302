"""End-to-end parity with TRL 1.16: the same sampled completions go through both libraries' REAL scoring, advantage
and loss code, and the advantages, the update's loss and every parameter's gradient agree.

The completions are sampled once by prefopt's engine (temperature 0.7, G = 3 per prompt, 4 chat prompts of different
lengths, so left padding) from the Llama chat fixture (two EOS ids), made EOS-prone so that some responses end early
and some are cut at max_new_tokens. TRL gets them through its own pipeline: ``_generate_and_score_completions`` with
its generation call replaced by one returning these token ids (TRL tokenizes the prompts itself, scores the rewards,
computes its advantages, reference log-probs and token counts); then ``compute_loss`` on each micro-batch as its
training step calls it (TRL's GRPO scales each micro-batch loss for gradient accumulation itself, its RLOO leaves
it to the HF Trainer, which divides by the accumulation). prefopt runs ``score``, ``advantages`` and ``update`` of
the algorithm, built by its own ``build``. Both sides split the update into the same contiguous micro-batches.

GPT-2 (absolute positions): TRL's training forward passes no position ids, so a left-padded row is numbered from 0
at its first pad while generation numbered it from its first real token; TRL then trains on log-probs that are not
the sampling policy's (off-policy by the padding). The GPT-2 test shows that, and checks prefopt against TRL with the
positions generation used (a forward pre-hook passing ``position_ids = cumsum(attention_mask) - 1``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.algorithms.grpo import GRPO
from prefopt.algorithms.rloo import RLOO
from prefopt.config import build_run_config
from prefopt.rl.engine import generate
from prefopt.rl.rewards import CompositeReward
from prefopt.scoring import position_ids
from prefopt.types import PromptBatch

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

G, MAX_NEW, TEMPERATURE, BETA = 3, 10, 0.7, 0.04
QUESTIONS = ["hi", "what is the weather like in the city today, and tomorrow?", "tell me a story about a cat",
             "how do I cook rice?"]
ROWS = G * len(QUESTIONS)


def score(text: str) -> float:
    """A reward with spread inside each group: the share of vowels in the response."""
    return sum(c in "aeiou" for c in text) / max(len(text), 1)


def trl_reward(completions, **kwargs):
    return [score(c[0]["content"] if isinstance(c, list) else c) for c in completions]


@dataclass
class World:
    model_dir: Path
    tokenizer: object
    prompts: list  # TRL's dataset prompts (conversations for a chat model)
    rollout: object  # prefopt's sampled rollout of those prompts

    @property
    def completions(self) -> list[list[int]]:
        """The sampled token ids of each row up to its first EOS (included), as TRL's generation returns them."""
        r = self.rollout
        return [row[m.bool()].tolist() for row, m in zip(r.response_ids, r.response_mask)]


def eos_prone(model: torch.nn.Module, eos: int, hidden: torch.Tensor) -> None:
    """Put the LM-head row of ``eos`` along the mean of the final hidden states ``hidden`` [N, H], scaled so that at
    the sampling temperature EOS takes ~8% of the probability there on average."""
    weight = model.get_output_embeddings().weight
    direction = hidden.mean(0)
    low, high = 0.0, 50.0
    for _ in range(30):  # bisect the scale of the EOS row
        weight[eos] = (low + high) / 2 * direction
        p_eos = (hidden @ weight.T / TEMPERATURE).softmax(-1)[:, eos].mean()
        low, high = ((low + high) / 2, high) if p_eos < 0.08 else (low, (low + high) / 2)


@torch.no_grad()
def make_world(model_dir: Path, out: Path, chat: bool) -> World:
    """The fixture made EOS-prone (on the hidden states of its own samples of these prompts), saved in float32 to
    ``out``, and its rollout of G samples per prompt: some end early, some are cut at max_new_tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat:
        prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
        ids = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]  # as TRL's _tokenize_prompts
    else:
        prompts = [f"\n\nHuman: {q}\n\nAssistant:" for q in QUESTIONS]
        ids = tokenizer(text=prompts)["input_ids"]
    width = max(map(len, ids))
    batch = PromptBatch(torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids]),
                        torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
                        [str(p) for p in prompts], [{}] * len(ids))
    gen = build_run_config({"algorithm": {"name": "grpo", "generation": {
        "max_new_tokens": MAX_NEW, "temperature": TEMPERATURE}}}).algorithm.generation
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    first = generate(policy, tokenizer, batch, gen, G, seed=1)
    hidden = policy.base_model(input_ids=first.sequences, attention_mask=first.attention_mask,
                               position_ids=position_ids(first.attention_mask)).last_hidden_state[:, width:]
    eos_prone(policy, tokenizer.convert_tokens_to_ids("<|eot_id|>") if chat else tokenizer.eos_token_id,
              hidden[first.response_mask.bool()])
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rollout = generate(policy, tokenizer, batch, gen, G, seed=0)
    lengths = rollout.response_mask.sum(-1)
    assert (rollout.ended & (lengths < MAX_NEW)).sum() >= 2, "some responses end early with an EOS"
    assert (~rollout.ended).sum() >= 2, "some responses are cut at max_new_tokens"
    assert (batch.attention_mask == 0).any(), "the prompts are left-padded"
    return World(out, tokenizer, prompts, rollout)


@pytest.fixture(scope="module")
def chat_world(llama_chat_dir, tmp_path_factory) -> World:
    return make_world(llama_chat_dir, tmp_path_factory.mktemp("eos-prone-llama"), chat=True)


@pytest.fixture(scope="module")
def gpt2_world(gpt2_real_dir, tmp_path_factory) -> World:
    return make_world(gpt2_real_dir, tmp_path_factory.mktemp("eos-prone-gpt2"), chat=False)


# ------------------------------------------------------------------------------------------ both sides


def prefopt_update(world: World, algorithm_cls, accumulation: int, **algorithm) -> dict:
    """The algorithm's own build, score, advantages and update on the sampled rollout; the summed micro-batch losses
    / accumulation (what accelerate accumulates) backpropagated."""
    run = build_run_config({"algorithm": {"name": algorithm_cls.registry_name, "num_samples": G,
                                          "generation": {"max_new_tokens": MAX_NEW, "temperature": TEMPERATURE},
                                          **algorithm},
                            "model": {"name_or_path": str(world.model_dir)},
                            "train": {"batch_size": len(QUESTIONS), "gradient_accumulation_steps": accumulation}})
    algo = algorithm_cls(run.algorithm, run, world.tokenizer)
    algo.build()
    algo.reward = CompositeReward([{"name": "callable", "params": {"fn": trl_reward}}], world.tokenizer, "cpu")
    scored = algo.score(world.rollout)
    advantages = algo.advantages(scored)
    losses = [out.loss for out in algo.update(scored, advantages, {})]
    assert len(losses) == accumulation
    loss = torch.stack(losses).sum() / accumulation
    loss.backward()
    rows = (advantages * scored.mask).sum(-1) / scored.mask.sum(-1)
    return {"advantages": rows.detach(), "loss": float(loss.detach()), "grads": grads(algo.policy)}


def trl_update(world: World, trainer_name: str, accumulation: int, fix_positions: bool = False, **args) -> dict:
    """TRL's ``_generate_and_score_completions`` on the same completions, then ``compute_loss`` per micro-batch."""
    import trl

    config = getattr(trl, f"{trainer_name}Config")(
        output_dir=str(world.model_dir / "trl"), report_to="none", use_cpu=True, bf16=False, disable_dropout=True,
        per_device_train_batch_size=ROWS // accumulation, gradient_accumulation_steps=accumulation,
        num_generations=G, max_completion_length=MAX_NEW, temperature=TEMPERATURE, **args)
    model = AutoModelForCausalLM.from_pretrained(world.model_dir, dtype=torch.float32)
    trainer = getattr(trl, f"{trainer_name}Trainer")(
        model=model, reward_funcs=trl_reward, args=config, processing_class=world.tokenizer,
        train_dataset=Dataset.from_list([{"prompt": p} for p in world.prompts]))
    completions = world.completions
    if trainer_name == "GRPO":
        trainer._generate_single_turn = lambda *args, **kwargs: (copy.deepcopy(completions), None)
    else:
        trainer._generate_single_turn = lambda *args, **kwargs: copy.deepcopy(completions)
    if fix_positions:
        for module in (trainer.model, getattr(trainer, "ref_model", None)):
            if module is not None:
                module.register_forward_pre_hook(numbered_from_the_first_token, with_kwargs=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    out = trainer._generate_and_score_completions([{"prompt": p} for p in world.prompts for _ in range(G)])
    loss = 0.0
    for rows in torch.arange(ROWS).tensor_split(accumulation):
        micro = {k: v[rows] if torch.is_tensor(v) and v.dim() and len(v) == ROWS else v for k, v in out.items()}
        loss = loss + trainer.compute_loss(trainer.model, micro)
    if not trainer.loss_is_scaled_for_ga:  # the HF Trainer's training_step divides it
        loss = loss / accumulation
    loss.backward()
    return {"advantages": out["advantages"].detach(), "loss": float(loss.detach()), "grads": grads(trainer.model),
            "trainer": trainer, "inputs": out}


def numbered_from_the_first_token(module, args, kwargs):
    """Position ids as generation numbers a left-padded row (and as prefopt.scoring does)."""
    kwargs["position_ids"] = position_ids(kwargs["attention_mask"])
    return args, kwargs


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_update(ours: dict, theirs: dict) -> dict[str, float]:
    """Advantages (1e-6), the update's loss (1e-6) and every gradient (1e-6 + 1e-5 relative); the max differences."""
    torch.testing.assert_close(ours["advantages"].float(), theirs["advantages"].float(), atol=1e-6, rtol=0)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
    assert ours["grads"].keys() == theirs["grads"].keys() and ours["grads"]
    for name, grad in ours["grads"].items():
        torch.testing.assert_close(grad, theirs["grads"][name], atol=1e-6, rtol=1e-5, msg=name)
    assert max(float(g.abs().max()) for g in ours["grads"].values()) > 1e-4  # a real update, not a zero one
    diffs = {"advantages": float((ours["advantages"] - theirs["advantages"]).abs().max()),
             "loss": abs(ours["loss"] - theirs["loss"]),
             "grads": max(float((g - theirs["grads"][n]).abs().max()) for n, g in ours["grads"].items())}
    print(f"max |prefopt - TRL|: {diffs}")
    return diffs


# ------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("loss_type, accumulation, knobs", [
    ("grpo", 2, {}), ("dapo", 2, {}), ("dr_grpo", 2, {}),
    ("bnpo", 1, {}), ("bnpo", 2, {}), ("bnpo", 4, {}),  # TRL's bnpo: each micro-batch's own token mean
    ("dapo", 2, {"mask_truncated_completions": True}),
    ("grpo", 2, {"top_entropy_quantile": 0.5}),
    ("dr_grpo", 2, {"scale_rewards": "batch"}),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={x}" for k, x in v.items()) or "defaults")
def test_grpo_end_to_end_equals_trl(chat_world, loss_type, accumulation, knobs):
    ours = prefopt_update(chat_world, GRPO, accumulation, loss_type=loss_type, kl_coef=BETA, kl_in="loss",
                          kl_ratio_correction=True, **knobs)
    theirs = trl_update(chat_world, "GRPO", accumulation, loss_type=loss_type, beta=BETA,
                        use_bias_correction_kl=True, scale_rewards=knobs.get("scale_rewards", "group"),
                        **{k: v for k, v in knobs.items() if k != "scale_rewards"})
    assert_same_update(ours, theirs)
    if knobs.get("mask_truncated_completions"):  # the cut responses are out of the loss, still in the baselines
        assert (theirs["inputs"]["completion_mask"].sum(-1) == 0).sum() == (~chat_world.rollout.ended).sum()


def test_rloo_end_to_end_equals_trl(chat_world):
    """TRL's RLOO: k1 sequence KL in the reward (beta 0.05), leave-one-out baseline, one ratio per sequence."""
    ours = prefopt_update(chat_world, RLOO, 2, kl_coef=0.05)
    theirs = trl_update(chat_world, "RLOO", 2, beta=0.05)
    assert_same_update(ours, theirs)


def test_on_gpt2_trl_trains_off_policy_on_left_padded_rows_and_prefopt_does_not(gpt2_world):
    """TRL numbers a left-padded GPT-2 row's positions from its first pad, generation from its first real token: TRL's
    training log-probs differ from the sampling log-probs on the padded rows (so its ratio-1 update is not the
    gradient of the policy that sampled); prefopt's equal them. With generation's positions given to TRL's forward,
    the two libraries make the same update."""
    rollout = gpt2_world.rollout
    padded = rollout.prompt_mask[:, 0] == 0
    plain = trl_update(gpt2_world, "GRPO", 2, loss_type="grpo", beta=0.0)
    trainer, inputs = plain["trainer"], plain["inputs"]
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, MAX_NEW)
    response = rollout.response_mask.bool()
    gap = (trl_logps - rollout.logprobs).abs() * response
    assert float(gap[padded].max()) > 1e-2  # TRL: off-policy on the left-padded rows
    assert float(gap[~padded].max()) < 1e-4  # and right where nothing is padded

    algo_run = build_run_config({"algorithm": {"name": "grpo", "num_samples": G, "generation": {
        "max_new_tokens": MAX_NEW, "temperature": TEMPERATURE}}, "model": {"name_or_path": str(gpt2_world.model_dir)}})
    algo = GRPO(algo_run.algorithm, algo_run, gpt2_world.tokenizer)
    algo.build()
    with torch.no_grad():
        ours_logps = algo.response_logps(algo.model, rollout)[0]
    assert float(((ours_logps - rollout.logprobs).abs() * response).max()) < 1e-5  # prefopt: the sampler's

    ours = prefopt_update(gpt2_world, GRPO, 2, loss_type="grpo")
    fixed = trl_update(gpt2_world, "GRPO", 2, fix_positions=True, loss_type="grpo", beta=0.0)
    assert_same_update(ours, fixed)
    assert abs(plain["loss"] - ours["loss"]) + max(float((g - plain["grads"][n]).abs().max())
                                                   for n, g in ours["grads"].items()) > 1e-5  # TRL as shipped differs
