"""The fault harness: real training processes killed at chosen points, resumed, compared with an uninterrupted run.

Every registered algorithm (``prefopt.registry.ALGORITHMS``: one registered later joins by itself and must state its
settings in ``SETTINGS``) x {full weights, LoRA} x the points a process dies at:

* ``step``: SIGKILL inside the training step after step N, N chosen at random in 1..5 (seeded by the case): the rows
  of steps 1..N are logged, step N+1's update is made but not logged (N = 1: before the first checkpoint);
* ``sigterm``: SIGTERM at that place (the graceful stop: the step is finished, a checkpoint saved, exit 143);
* ``checkpoint``: SIGKILL inside the checkpoint write of step 4 (accelerate's files written, not yet published);
* ``final-eval``: SIGKILL inside the final evaluation (its samples written, its metrics row not);
* ``final-save``: SIGKILL inside the final save of ``model/`` (after the final checkpoint).

The killed process is a fork of the test process (a real OS process, killed by the kernel; forking spares the
interpreter start and the imports). ``train.resume=auto`` then finishes the run, and it must equal the uninterrupted
run of the same recipe: the weights of ``model/`` and the final checkpoint's optimizer state tensor for tensor,
``samples.jsonl`` byte for byte, ``metrics.jsonl`` and ``summary.json`` byte for byte once the timing and memory
readings (``perf/*``, which differ between any two runs) are left out of each row; no ``*.tmp`` is left behind.

The runs: the realistic GPT-2 fixture (dropout 0.1 in its config, pad = eos), 24 HH pairs (a quarter held out),
6 steps of batches of 2, a checkpoint and an evaluation every 2 steps, a row every step. ``make test`` runs
``SLICE``; ``make faults`` (``PREFOPT_FAULTS=all``) the whole matrix.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from prefopt.cli import main
from prefopt.registry import ALGORITHMS

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

MAX_STEPS, EVERY = 6, 2
POINTS = ("step", "sigterm", "checkpoint", "final-eval", "final-save")
ONLINE = {"rewards": [{"name": "length_penalty", "params": {"target": 3}}], "generation": {"max_new_tokens": 4}}
SETTINGS: dict[str, dict[str, Any]] = {  # each algorithm's settings beyond its defaults
    "pt": {}, "sft": {}, "reward": {}, "dpo": {}, "orpo": {}, "kto": {},
    "ppo": {**ONLINE, "epochs": 2, "num_minibatches": 2},
    "a2c": {**ONLINE, "trainable_layers": 1, "preference_weight": 0.0, "rules": {}},
    # 4-token samples tend to share their reward (advantage 0): the entropy bonus keeps the policy moving
    **{name: {**ONLINE, "num_samples": 2, "kl_coef": 0.05, "entropy_coef": 0.01} for name in ("grpo", "rloo",
                                                                                                "reinforce_pp")},
}
NO_LORA = {"a2c"}  # trains its top blocks in full (refused with LoRA when the recipe is read)
MATRIX = [(algorithm, weights, point) for algorithm in ALGORITHMS.available() for weights in ("full", "lora")
          if not (weights == "lora" and algorithm in NO_LORA) for point in POINTS]
# in make test: a kill before the first checkpoint (grpo-lora-step dies after step 1), inside the checkpoint write
# after an evaluation that sampled, inside the final save (each was wrong on main before the fix)
SLICE = [("grpo", "lora", "step"), ("rloo", "full", "checkpoint"), ("dpo", "full", "final-save")]
CASES = MATRIX if os.environ.get("PREFOPT_FAULTS") == "all" else SLICE


def test_every_registered_algorithm_is_in_the_matrix():
    assert sorted(SETTINGS) == sorted(ALGORITHMS.available())
    assert set(SLICE) <= set(MATRIX)


def overrides(algorithm: str, weights: str, model: Path, data: Path, out: Path) -> list[str]:
    lora = ["model.lora.r=4", "model.lora.alpha=8"] if weights == "lora" else []
    return [f"algorithm={json.dumps({'name': algorithm, **SETTINGS[algorithm]})}", f"model.name_or_path={model}",
            *lora, f"data.path={data}", "data.eval_fraction=0.25", "data.max_length=64", "data.max_prompt_length=32",
            f"train.output_dir={out}", f"train.max_steps={MAX_STEPS}", "train.batch_size=2", "train.eval_batch_size=4",
            "train.max_eval_batches=1", f"train.save_every={EVERY}", f"train.eval_every={EVERY}",
            "train.keep_checkpoints=5", "train.log_every=1", "train.learning_rate=1e-3", "train.progress=false",
            "train.mixed_precision=no"]


def train(argv: list[str]) -> int:
    AcceleratorState._reset_state()  # each run builds its own (a fork inherits the parent's otherwise)
    return main(["train", "", *argv])


def die(how: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), how)


def install(point: str, at_step: int) -> None:
    """In the child: patch prefopt so that the process dies at ``point``."""
    from accelerate import Accelerator

    from prefopt import rundir, trainer

    if point in ("step", "sigterm"):
        train_step = trainer.Trainer._train_step

        def dying_step(self, batches, step, *args):
            tokens = train_step(self, batches, step, *args)
            if step == at_step:  # steps 1..at_step are done and logged; this one is not
                die(signal.SIGKILL if point == "step" else signal.SIGTERM)
            return tokens

        trainer.Trainer._train_step = dying_step
    elif point == "checkpoint":
        save_state = Accelerator.save_state

        def dying_save_state(self, output_dir=None, **kwargs):
            save_state(self, output_dir, **kwargs)
            if f"step-{at_step:08d}" in str(output_dir):
                die()

        Accelerator.save_state = dying_save_state
    elif point == "final-eval":
        evaluate_and_sample = trainer.evaluate_and_sample

        def dying_evaluation(run_evaluation, step, output_dir, main_process):
            metrics = evaluate_and_sample(run_evaluation, step, output_dir, main_process)
            if step == MAX_STEPS:
                die()
            return metrics

        trainer.evaluate_and_sample = dying_evaluation
    elif point == "final-save":
        def dying_replace_dir(target, write):
            write(target.with_name(target.name + ".tmp"))
            die()

        rundir.replace_dir = dying_replace_dir


def child(point: str, at_step: int, argv: list[str], log: str) -> None:
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    install(point, at_step)
    sys.exit(train(argv))


def interrupted_run(point: str, at_step: int, argv: list[str], log: Path) -> int:
    """The exit code of a forked process running ``prefopt train argv`` that dies at ``point``."""
    process = multiprocessing.get_context("fork").Process(target=child, args=(point, at_step, argv, str(log)))
    process.start()
    process.join(600)
    return process.exitcode


def rows(path: Path) -> list[str]:
    """The lines of a jsonl log, each without its ``perf/*`` readings (NaN kept as such)."""
    if not path.exists():
        return []
    return [json.dumps({k: v for k, v in json.loads(line).items() if not k.startswith("perf/")})
            for line in path.read_text().splitlines()]


def summary(run: Path) -> str:
    return json.dumps({k: v for k, v in json.loads((run / "summary.json").read_text()).items()
                       if not k.startswith("perf/")})


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{file.name}:{key}": value for file in sorted(folder.glob("*.safetensors"))
            for key, value in load_file(str(file)).items()}


def optimizer_state(checkpoint: Path) -> list[torch.Tensor]:
    state = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)["state"]
    return [value for key in sorted(state) for _, value in sorted(state[key].items())]


def differences(reference: Path, resumed: Path) -> list[str]:
    """What the resumed run's outputs do not share with the uninterrupted run's (empty: the same)."""
    found = []
    a, b = rows(reference / "metrics.jsonl"), rows(resumed / "metrics.jsonl")
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        found.append(f"metrics.jsonl: {len(a)} rows vs {len(b)}, the first difference at row {first + 1}")
    if summary(reference) != summary(resumed):
        found.append("summary.json differs")
    a, b = ((run / "samples.jsonl").read_bytes() if (run / "samples.jsonl").exists() else b"" for run in (reference,
                                                                                                          resumed))
    if a != b:
        found.append(f"samples.jsonl differs ({len(a)} vs {len(b)} bytes)")
    expected, got = tensors(reference / "model"), tensors(resumed / "model")
    if expected.keys() != got.keys() or not all(torch.equal(expected[k], got[k]) for k in expected):
        found.append("model/ weights differ")
    final = Path("checkpoints") / f"step-{MAX_STEPS:08d}"
    a, b = optimizer_state(reference / final), optimizer_state(resumed / final)
    if len(a) != len(b) or not all(torch.equal(x, y) for x, y in zip(a, b)):
        found.append("the final optimizer state differs")
    left = sorted(p.name for p in resumed.rglob("*.tmp"))
    if left:
        found.append(f"left behind: {left}")
    return found


@pytest.fixture(scope="module")
def data(hh_head) -> Path:
    return hh_head(24)


@pytest.fixture(scope="module")
def references(gpt2_real_dir, data, tmp_path_factory) -> Any:
    """The uninterrupted run of each (algorithm, weights), made once."""
    made: dict[tuple[str, str], Path] = {}

    def reference(algorithm: str, weights: str) -> Path:
        if (algorithm, weights) not in made:
            out = tmp_path_factory.mktemp(f"reference-{algorithm}-{weights}") / "run"
            assert train(overrides(algorithm, weights, gpt2_real_dir, data, out)) == 0
            made[algorithm, weights] = out
        return made[algorithm, weights]

    return reference


@pytest.mark.parametrize("algorithm, weights, point", CASES, ids=["-".join(case) for case in CASES])
def test_killed_then_resumed_equals_uninterrupted(algorithm, weights, point, references, gpt2_real_dir, data,
                                                  tmp_path):
    reference = references(algorithm, weights)
    out = tmp_path / "run"
    argv = overrides(algorithm, weights, gpt2_real_dir, data, out)
    seed = zlib.crc32(f"{algorithm}-{weights}-{point}".encode())
    at_step = 4 if point == "checkpoint" else random.Random(seed).randint(1, 5)
    code = interrupted_run(point, at_step, argv, tmp_path / "killed.log")
    expected_code = 128 + signal.SIGTERM if point == "sigterm" else -signal.SIGKILL
    assert code == expected_code, (code, (tmp_path / "killed.log").read_text()[-3000:])
    assert train([*argv, "train.resume=auto"]) == 0
    assert differences(reference, out) == []
