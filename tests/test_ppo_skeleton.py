"""PPO on the online skeleton (prefopt.rl.algorithm): the skeleton's update loop, micro-batch by micro-batch, gives
PPO's loss over the WHOLE minibatch -- the clipped surrogate plus vf_coef times the clipped value loss, computed here
another way: one forward of the policy/critic module on the full rollout and prefopt.algorithms.ppo's loss
functions (checked by hand in tests/test_ppo.py). And PPO's knobs carry the skeleton's names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from prefopt.algorithms.ppo import PPOConfig, value_loss
from prefopt.config import build_run_config
from prefopt.data import build_dataloader, load_rows
from prefopt.errors import ConfigError
from prefopt.registry import POLICY_LOSSES
from prefopt.rl.engine import rollout_inputs
from prefopt.rl.losses import PolicyLossInputs
from prefopt.tasks import TASK_REWARD, write_task_prompts
from prefopt.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
VF_COEF = 0.5


@pytest.fixture(scope="module")
def prompts_path(tmp_path_factory) -> Path:
    return write_task_prompts(tmp_path_factory.mktemp("task") / "prompts.jsonl", 64, seed=0)


def built_ppo(model_dir: Path, prompts: Path, out: Path, accumulation: int):
    recipe = {"algorithm": {"name": "ppo", "rewards": [TASK_REWARD], "generation": {"max_new_tokens": 6},
                            "epochs": 2, "num_minibatches": 1, "vf_coef": VF_COEF, "value_head_std": 0.1,
                            "kl_coef": 0.1},
              "model": {"name_or_path": str(model_dir)},
              "data": {"path": str(prompts), "format": "prompts", "eval_fraction": 0.0},
              "train": {"output_dir": str(out), "batch_size": 5, "gradient_accumulation_steps": accumulation,
                        "progress": False}}
    ppo = Trainer(build_run_config(recipe)).algorithm
    ppo.build()
    ppo.setup(Accelerator(cpu=True), {})
    return ppo


def first_prompts(ppo, rows: int):
    data = ppo.run.data
    loader, _ = build_dataloader(load_rows(data, "prompts").train[:rows], "prompts", ppo.tokenizer, data, rows,
                                 shuffle=False, seed=0)
    return next(iter(loader))


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_ppo_update_is_the_clipped_losses_of_the_whole_minibatch(gpt2_real_dir, prompts_path, tmp_path,
                                                                 accumulation):
    ppo = built_ppo(gpt2_real_dir, prompts_path, tmp_path, accumulation)
    torch.manual_seed(0)
    rollout = ppo.collect(first_prompts(ppo, 5))  # 5 rows: micro-batches of unequal size
    scored = ppo.score(rollout)
    advantages = ppo.advantages(scored)  # GAE on the critic's values, whitened; scored.returns are the targets
    mask = scored.mask
    noise = torch.Generator().manual_seed(1)
    scored.old_logps = scored.old_logps + 0.3 * torch.randn(mask.shape, generator=noise) * mask  # clipping binds
    scored.values = scored.values + 0.3 * torch.randn(mask.shape, generator=noise) * mask  # the value clip too
    outputs = list(ppo.update(scored, advantages, {}))[:accumulation]  # the first update's micro-batches
    total = torch.stack([out.loss for out in outputs]).sum() / accumulation  # what accelerate accumulates

    sequences, attention_mask, score_mask = rollout_inputs(rollout)
    width = rollout.prompt_ids.shape[1]
    logps, _, values = (out[:, width:] for out in ppo.model(sequences, attention_mask, score_mask,
                                                             ppo.config.generation.logprob_temperature))
    surrogate, metrics = POLICY_LOSSES.get("token_mean")(PolicyLossInputs(logps, scored.old_logps, advantages,
                                                                          mask), PPOConfig(epsilon=0.2))
    clip_fraction = metrics["clip_fraction"]
    critic, value_clip_fraction = value_loss(values, scored.values, scored.returns, mask, 0.2)
    torch.testing.assert_close(total, surrogate + VF_COEF * critic, atol=1e-6, rtol=0)
    assert 0 < float(clip_fraction) < 1 and 0 < float(value_clip_fraction) < 1  # both clips bind on this batch
    for key in ("loss/policy", "loss/value", "clip_fraction", "value_clip_fraction", "approx_kl", "entropy"):
        assert key in outputs[0].metrics, key


@pytest.mark.parametrize("old, new", [("ppo_epochs", "epochs"), ("cliprange", "epsilon")])
def test_renamed_keys_say_their_new_name(old, new):
    """One name per knob: PPO's epochs and clip range are the skeleton's ``epochs`` and ``epsilon``; an old recipe
    gets one line naming the new key. Knobs PPO fixes (the KL is a reward term) are not settable."""
    with pytest.raises(ConfigError, match=f"^algorithm.{old} was renamed algorithm.{new}: write {new}: 2 instead$"):
        build_run_config({"algorithm": {"name": "ppo", old: 2}})
    assert getattr(build_run_config({"algorithm": {"name": "ppo", new: 2}}).algorithm, new) == 2
    assert (PPOConfig().epochs, PPOConfig().epsilon) == (4, 0.2)
    with pytest.raises(ConfigError, match="unknown config key 'algorithm.kl_in'"):
        build_run_config({"algorithm": {"name": "ppo", "kl_in": "loss"}})
