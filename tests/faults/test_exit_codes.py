"""Exit codes and advice that tell the truth (``prefopt.cli.main``: the code and the one ``prefopt:`` line).

* every input fault is exit 2 with one line naming the key or the function: a seed out of range, ``ptx_batch_size``
  -1 or 0, ``preference_steps`` -5, ``beta`` 1e30 (refused when read, not trained until it overflows), a reward
  function returning the wrong count, strings or raising, a Sparrow heads file that is a pickle of code;
* divergence is the exit-3 stop, online sampling included ("probability tensor contains inf/nan" was exit 1), and
  the advice names a checkpoint whose weights and optimizer state are finite, or says there is none;
* NaN evaluation metrics are reported as NaN in metrics.jsonl and summary.json (they vanished before);
* exit 1 "unexpected error" stays for prefopt's own defects.

Online runs use the known-reward prompts on the realistic GPT-2 fixture (dropout off, as online algorithms need).
"""

from __future__ import annotations

import json
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch

from cli_runs import short_dpo
from prefopt.algorithms.losses.sigmoid import sigmoid
from prefopt.cli import main
from prefopt.registry import LOSSES
from prefopt.tasks import write_task_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
ONLINE = {"grpo": ["algorithm.entropy_coef=0.01"],  # constant rewards: the entropy bonus moves it
          "a2c": ["algorithm.preference_weight=0", "algorithm.rules={}", "algorithm.trainable_layers=1"]}


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["train", "", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("prefopt:")]
    assert len(lines) <= 1 and "Traceback" not in err, err
    return code, lines[0] if lines else ""


def online(model: Path, prompts: Path, out: Path, algorithm: str, *extra: str) -> list[str]:
    return [f"algorithm.name={algorithm}", f"model.name_or_path={model}", f"data.path={prompts}", "data.format=prompts",
            "data.eval_fraction=0.25", "algorithm.rewards=[{name: length_penalty, params: {target: 2}}]",
            "algorithm.generation.max_new_tokens=6", f"train.output_dir={out}", "train.max_steps=4",
            "train.batch_size=4", "train.eval_batch_size=4", "train.max_eval_batches=1", "train.log_every=1",
            "train.progress=false", "train.mixed_precision=no", *ONLINE[algorithm], *extra]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_task_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", 32, seed=0)


@pytest.mark.parametrize("override, said", [
    ("train.seed=-1", "train.seed=-1: must be in [0, 2**32)"),
    ("train.seed=4294967296", "train.seed=4294967296: must be in [0, 2**32)"),
    ("algorithm.beta=1e30", "algorithm.beta=1e+30: must be <= 1000"),
    ("algorithm.name=ppo algorithm.ptx_batch_size=-1", "algorithm.ptx_batch_size=-1: must be > 0"),
    ("algorithm.name=ppo algorithm.ptx_batch_size=0", "algorithm.ptx_batch_size=0: must be > 0"),
    ("algorithm.name=a2c algorithm.preference_steps=-5", "algorithm.preference_steps=-5: must be >= 0"),
    ("algorithm.name=grpo algorithm.kl_coef=1e30", "algorithm.kl_coef=1e+30: must be <= 1000"),
])
def test_bad_settings_are_exit_2_when_read(override, said, gpt2_real_dir, hh_small, tmp_path, capsys):
    code, line = run(capsys, *short_dpo(gpt2_real_dir, hh_small, tmp_path / "run", *override.split()))
    assert code == 2 and line.startswith(f"prefopt: error: {said}"), line
    assert not (tmp_path / "run").exists()


REWARDS = '''
def wrong_count(completions, **kwargs):
    return [1.0]

def strings(completions, **kwargs):
    return ["0.5"] * len(completions)

def raises(completions, **kwargs):
    return {}["missing"]
'''


@pytest.mark.parametrize("function, said", [
    ("wrong_count", "returned (1,) values for 16 responses (expected one float or None per response)"),
    ("strings", "returned '0.5' (str) among its values (expected one float or None per response)"),
    ("raises", "raised KeyError: 'missing'"),
])
def test_a_faulty_reward_function_is_exit_2_naming_it(function, said, gpt2_real_dir, prompts, tmp_path, capsys,
                                                       monkeypatch):
    (tmp_path / "faulty_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("faulty_rewards", None)
    try:
        code, line = run(capsys, *online(gpt2_real_dir, prompts, tmp_path / "run", "grpo", "algorithm.rewards=[{name: "
                                         f"callable, params: {{fn: 'faulty_rewards:{function}'}}}}]"))
    finally:
        sys.modules.pop("faulty_rewards", None)
    assert code == 2
    assert line == f"prefopt: error: reward function faulty_rewards:{function} {said}"


class Exploit:
    def __reduce__(self):
        return print, ("this pickle runs code when loaded",)


def test_a_heads_file_that_is_a_pickle_of_code_is_exit_2(gpt2_real_dir, prompts, tmp_path, capsys):
    heads = tmp_path / "sparrow_heads.pt"
    heads.write_bytes(pickle.dumps(Exploit()))
    code, line = run(capsys, *online(gpt2_real_dir, prompts, tmp_path / "run", "a2c",
                                     f"algorithm.reward_heads={heads}", "algorithm.preference_weight=1"))
    assert code == 2
    assert line.startswith(f"prefopt: error: algorithm.reward_heads={str(heads)!r}: not a heads file saved by a2c "
                           "(UnpicklingError: ")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing left behind


@pytest.mark.parametrize("algorithm", list(ONLINE))
def test_a_diverged_online_run_is_the_exit_3_stop_naming_a_finite_checkpoint(algorithm, gpt2_real_dir, prompts,
                                                                             tmp_path, capsys):
    out = tmp_path / "run"
    code, line = run(capsys, *online(gpt2_real_dir, prompts, out, algorithm, "train.learning_rate=1e30"))
    assert code == 3, line  # was exit 1, "probability tensor contains either inf, nan or element < 0"
    assert line.startswith("prefopt: error: the policy's sampling probabilities are NaN/inf at step "), line
    assert line.endswith("No checkpoint with finite weights and optimizer state was written, so there is nothing to "
                         "resume from: start over with a lower train.learning_rate"), line


def test_the_advice_after_a_nan_names_a_finite_checkpoint_and_says_resuming_repeats_it(
        gpt2_real_dir, hh_small, tmp_path, capsys):
    calls = {"n": 0}

    def nan_from_step_3(logps, beta):  # sigmoid, NaN from the third training call on
        losses = sigmoid(logps, beta)
        if torch.is_grad_enabled():
            calls["n"] += 1
            return losses * float("nan") if calls["n"] >= 3 else losses
        return losses

    LOSSES.register("nan_from_step_3")(nan_from_step_3)
    try:
        out = tmp_path / "run"
        code, line = run(capsys, *short_dpo(gpt2_real_dir, hh_small, out, "algorithm.loss=nan_from_step_3",
                                            "train.max_steps=4", "train.save_every=2"))
    finally:
        LOSSES.unregister("nan_from_step_3")
    checkpoint = out / "checkpoints" / "step-00000002"
    assert code == 3
    assert line == ("prefopt: error: non-finite loss at step 3; stopped. The newest checkpoint with finite weights and "
                    f"optimizer state is {checkpoint}; resumed as it is, it repeats the same steps exactly (and meets "
                    f"the same NaN): resume with train.resume={checkpoint} train.on_nonfinite=skip to skip such "
                    f"updates, or start a new run from {checkpoint / 'model'} with a lower train.learning_rate")


def test_nan_evaluation_metrics_are_reported_as_nan(gpt2_real_dir, hh_small, tmp_path, capsys):
    def nan_in_evaluation(logps, beta):
        losses = sigmoid(logps, beta)
        return losses if torch.is_grad_enabled() else losses * float("nan")

    LOSSES.register("nan_in_evaluation")(nan_in_evaluation)
    try:
        out = tmp_path / "run"
        code, line = run(capsys, *short_dpo(gpt2_real_dir, hh_small, out, "algorithm.loss=nan_in_evaluation"))
    finally:
        LOSSES.unregister("nan_in_evaluation")
    assert code == 0, line
    summary = json.loads((out / "summary.json").read_text())
    assert math.isnan(summary["eval/loss"])  # it was missing from summary.json
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isnan(last["eval/loss"])


def test_a_defect_of_prefopt_itself_stays_exit_1(gpt2_real_dir, hh_small, tmp_path, capsys, monkeypatch):
    def defect(self, *args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'logits'")

    monkeypatch.setattr("prefopt.trainer.Trainer._train_step", defect)
    code, line = run(capsys, *short_dpo(gpt2_real_dir, hh_small, tmp_path / "run"))
    assert code == 1
    assert line.startswith("prefopt: unexpected error: AttributeError: 'NoneType' object has no attribute 'logits'")


def test_a_short_last_batch_makes_no_empty_minibatch():
    """Found by the fault matrix: PPO with num_minibatches=2 met a 1-row rollout (the last batch of an epoch) and
    crashed in the forward of an empty minibatch (exit 1)."""
    from prefopt.rl.algorithm import minibatches

    for group in (None, torch.tensor([0])):
        got = [m.tolist() for m in minibatches(1, 2, 2, "cpu", shuffle=True, group=group)]
        assert got == [[0], [0]]  # one update per epoch, none empty
