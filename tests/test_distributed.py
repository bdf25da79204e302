"""Two processes through accelerate (CPU, gloo) match one process: DPO with twice the gradient accumulation, and
the online algorithms' batch statistics and a REINFORCE++ run on the same global batch.

``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=true`` starts two torchrun workers
that accelerate runs as MULTI_CPU over gloo (``--cpu`` alone would start ONE process unless MPI is installed).
Each process takes batch_size=4 pairs per step; the single process takes 4 pairs x 2 accumulated batches. Both
see the same 8 pairs per update: the same length-bucketed batch order (a function of seed and epoch), batch
2k on process 0 and 2k+1 on process 1. DPO with its precomputed reference cache (filled through a gather).

Why the tolerance can be tiny: accelerate scales each micro-batch loss by 1/2 before backward and DDP divides each
gradient by the world size (2) before its all-reduce, so both runs add g0/2 + g1/2 -- halving is exact in
floating point, and a + b == b + a. Each batch's forward is the same computation in both runs. Measured: the
weights and every logged training number agree to the last bit; we allow 1e-6 (a few float32 ulps of weights of
size ~0.1) so that a BLAS kernel blocking differently cannot fail the test.

Evaluation: the 11 held-out rows make batches of 5, 5 and 1, uneven over two processes; accelerate's even_batches
would pad the last round with rows from the start and count them twice. The Trainer counts each row once, so the
accuracy (a count of rows over 11) must be EQUAL. The other eval numbers agree to 1e-6 relative, not to the last
bit: the reference cache is filled under even_batches (it needs equal gathers), so the rows of the padded last
round get their reference log-probs from a batch padded to another width, which moves float32 rounding (~1e-7).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.cli import main
from prefopt.config import build_run_config
from prefopt.trainer import Trainer

ACCELERATE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "accelerate").glob("*.yaml"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recipe(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["algorithm.name=dpo", "algorithm.precompute_reference=true", f"model.name_or_path={model}",
            f"data.path={data}", "data.max_examples=16", "data.eval_fraction=0.25", "data.max_length=128",
            "data.max_prompt_length=64", f"train.output_dir={out}", "train.max_steps=6", "train.batch_size=4",
            "train.eval_batch_size=5", "train.learning_rate=0.002", "train.log_every=1", "train.eval_every=3",
            "train.progress=false", "train.mixed_precision=no", *extra]


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def launch_two(*command: str, tmp_path: Path) -> subprocess.Popen:
    """``command`` (a module's ``-m name`` or a script, and its arguments) in 2 CPU processes under accelerate."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(tmp_path / "hf-home")}  # no user accelerate config
    return subprocess.Popen([*launcher, *command], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    """(stdout, stderr) of a launch that exited 0; a hang (a collective out of step) stops it and fails the test."""
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
        pytest.fail(f"the 2-process run hung:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


def in_one_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_match_one_with_double_accumulation(tiny_model_dir, hh_small, tmp_path):
    two = tmp_path / "two-processes"
    process = launch_two("-m", "prefopt.cli", "train", "", *recipe(tiny_model_dir, hh_small, two), tmp_path=tmp_path)
    one = tmp_path / "one-process"  # meanwhile, in this process
    extra = "train.gradient_accumulation_steps=2"
    assert in_one_thread(main, ["train", "", *recipe(tiny_model_dir, hh_small, one, extra)]) == 0
    stdout, stderr = finish(process)
    assert json.loads(stdout)["output_dir"] == str(two)  # one final JSON, from the main process only
    console = [line for line in stderr.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in console] == [f"step {n}/6" for n in range(1, 7)]  # printed once

    state = json.loads((two / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["batches_consumed"] == 6  # per process: 3 epochs of 2 batches
    assert (two / "checkpoints" / "step-00000006" / "random_states_1.pkl").is_file()

    expected = load_file(str(one / "model" / "model.safetensors"))
    got = load_file(str(two / "model" / "model.safetensors"))
    diff = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert diff <= 1e-6, f"weights differ by {diff:.3g}"

    rows_one, rows_two = metrics(one), metrics(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (a["step"], key)
    evals = [(a, b) for a, b in zip(rows_one, rows_two) if "eval/loss" in a]
    assert len(evals) == 2  # steps 3 and 6
    for a, b in evals:
        assert b["eval/rewards/accuracy"] == a["eval/rewards/accuracy"]
        assert round(a["eval/rewards/accuracy"] * 11, 9).is_integer()  # 11 rows, each counted once


def online_recipe(model: Path, prompts: Path, out: Path, batch_size: int, accumulation: int) -> dict:
    """REINFORCE++ (global whitening, token-mean loss over the update), greedy so both launches sample the same
    responses, two epochs over the rollout (the second off-policy), no length bucketing (so the batch of 4 of one
    process is the two batches of 2 of two processes)."""
    reward = {"name": "callable", "params": {"fn": "online_two_processes:question_number"}}
    return {"algorithm": {"name": "reinforce_pp", "rewards": [reward], "kl_coef": 0.05, "epochs": 2,
                          "num_minibatches": 1, "generation": {"max_new_tokens": 6, "do_sample": False}},
            "model": {"name_or_path": str(model)},
            "data": {"path": str(prompts), "format": "prompts", "eval_fraction": 0.0, "length_bucketing": False},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": batch_size, "learning_rate": 1e-2,
                      "gradient_accumulation_steps": accumulation, "log_every": 1, "progress": False,
                      "mixed_precision": "no"}}


@pytest.mark.slow
def test_online_batch_statistics_on_two_processes_equal_one_process(gpt2_real_dir, tmp_path):
    """The same global batch on 2 processes (half each) and on 1: every batch-level statistic is reduced over the
    processes. ``tests/online_two_processes.py``: grpo / rloo batch std, REINFORCE++'s global whitening (plain and
    with a group baseline), advantage and reward whitening, and the update's loss and gradient for token_mean,
    dapo, grpo, dr_grpo and top-entropy masking (per row, as DDP averages them; TRL's bnpo is each micro-batch's own
    mean, so 2 processes equal 1 with twice the micro-batches). Then a REINFORCE++ run over 2 steps of 2 updates:
    2 processes x 2 prompts, and 1 process x 4 prompts in 2 micro-batches of 2 (each a process's rows). Each
    micro-batch's update has the shapes of a process's, and DDP's average of two gradients (each scaled by 2 / 2,
    exact) is the sum accelerate accumulates; but the rollout is sampled over 4 rows in one process and 2 in each of
    two, and the decode loop's behaviour log-probs (the update's old log-probs) come from one model call per token on
    all rows, whose products over 4 rows round differently from those over 2 (4.8e-7 on this fixture; a scoring pass
    is row-invariant, 0.0), so step 1 differs in the 7th digit (loss 0.16177442 vs 0.16177439, grad norm 0.5753760
    vs 0.5753763). Adam
    turns that 1e-7 relative noise into weight differences of the learning rate's order on the elements whose
    gradient is near 0: 2.2e-4 after 2 steps, where training moved the weights by 4.0e-2. So the run is checked to
    1% of the movement and the logs to 1e-4 relative; the statistics themselves (above) are checked to 1e-6, which
    a statistic computed per process fails by far (before the fix: grad norm 0.4459 vs 0.4026, weights 0.078 apart)."""
    import online_two_processes as script

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"\n\nHuman: question {i}?\n\nAssistant:"}) + "\n"
                               for i in range(18)))
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    (tmp_path / "two.json").write_text(json.dumps(online_recipe(gpt2_real_dir, prompts, two, 2, accumulation=1)))
    process = launch_two(script.__file__, str(tmp_path / "two.json"), str(two), tmp_path=tmp_path)
    expected = in_one_thread(script.statistics, None)  # meanwhile, in this process
    in_one_thread(lambda: Trainer(build_run_config(online_recipe(gpt2_real_dir, prompts, one, 4, 2))).fit())
    _, stderr = finish(process)
    # 18 prompts = 9 batches of 2: accelerate gives each process 4 (the odd batch leaves the epoch with drop_last)
    assert json.loads((two / "manifest.json").read_text())["rows_left_out_per_epoch"] == 2
    assert "; 4 steps per epoch;" in stderr

    halves = [json.loads((two / f"stats-{rank}.json").read_text()) for rank in (0, 1)]
    assert halves[0]["rows"] + halves[1]["rows"] == expected["rows"]
    for key, value in expected.items():
        if key == "rows":
            continue
        if isinstance(value, dict):  # an update: the processes' loss shares add up, each row's gradient is the same
            assert halves[0][key]["loss"] + halves[1][key]["loss"] == pytest.approx(value["loss"], abs=1e-6), key
            got = torch.tensor(halves[0][key]["grad"] + halves[1][key]["grad"])
        else:
            got = torch.tensor(halves[0][key] + halves[1][key])
        want = torch.tensor(value["grad"] if isinstance(value, dict) else value)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=key)
        assert want.abs().max() > 0, key

    expected_weights = load_file(str(one / "model" / "model.safetensors"))
    got_weights = load_file(str(two / "model" / "model.safetensors"))
    diff = max(float((expected_weights[k] - got_weights[k]).abs().max()) for k in expected_weights)
    start = load_file(str(gpt2_real_dir / "model.safetensors"))
    moved = max(float((expected_weights[k] - start[k].float()).abs().max()) for k in start if k in expected_weights)
    print(f"2 vs 1 process: max weight difference {diff:.3g} (training moved them by up to {moved:.3g})")
    assert moved > 1e-3 and diff <= 0.01 * moved
    rows_one, rows_two = ([r for r in metrics(run) if "train/loss" in r] for run in (one, two))
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2]
    for a, b in zip(rows_one, rows_two):
        assert a.keys() == b.keys() and {"kl", "train/grad_norm", "loss/policy", "reward/score"} <= a.keys()
        for key in a:  # the logs: the same to the rounding of 4-row vs 2-row products (above)
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-8), (a["step"], key)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.stem for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_load(path):
    """Each shipped config is one accelerate reads (unknown top-level keys are errors there)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert str(config.distributed_type).split(".")[-1] == expected[path.stem]
    if path.stem.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
    if path.stem == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # loads with weights_only=True


@pytest.mark.parametrize("variable,value,message", [
    ("ACCELERATE_USE_FSDP", "true", "the accelerate config asks for FSDP but accelerate runs this launch as NO on cpu"),
    ("WORLD_SIZE", "2", r"launched as 2 processes but accelerate runs each alone \(NO\)"),
])
def test_a_launch_accelerate_would_silently_change_is_refused(variable, value, message, monkeypatch, tmp_path):
    """FSDP on CPU: accelerate 1.15 runs an FSDP launch as plain data parallel (``use_cpu``: MULTI_CPU) or, without
    ``use_cpu``, as independent single processes (NO) on one output directory. Both are refused before any work
    (checked by hand with ``accelerate launch`` of an FSDP config on this CPU machine: each worker exits 2 with this
    line). In-process here: the same check on the same environment variables the launcher sets."""
    from accelerate.state import AcceleratorState

    from prefopt.config import build_run_config
    from prefopt.distributed import make_accelerator
    from prefopt.errors import ConfigError

    monkeypatch.setenv(variable, value)
    config = build_run_config({"algorithm": {"name": "sft"}, "train": {"output_dir": str(tmp_path)}})
    AcceleratorState._reset_state()
    try:
        with pytest.raises(ConfigError, match=message):
            make_accelerator(config)
    finally:
        AcceleratorState._reset_state()
