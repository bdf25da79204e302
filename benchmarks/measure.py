"""Machine and model measures of the side-by-side benchmarks: the matmul ceiling, RSS, FLOPs per token, workers.

A worker is the benchmark script itself run in a fresh process (``--worker PATH``) that writes its measurements
to PATH as JSON: each dtype of ``vs_trl.py`` needs one (accelerate's mixed-precision state is per process), and
peak memory is ``ru_maxrss`` of a process that runs only one contestant.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from assets import ROOT


def matmul_ceiling(dtype: str) -> float:
    """Best torch.mm GFLOP/s of ``dtype`` over this model's shapes and a square one."""
    import torch

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    best = 0.0
    for m, k, n in ((4096, 256, 1024), (4096, 1024, 256), (4096, 256, 4096), (1024, 1024, 1024)):
        a, b = torch.randn(m, k, dtype=torch_dtype), torch.randn(k, n, dtype=torch_dtype)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best = max(best, 2 * m * k * n / min(times) / 1e9)
    return best


def parameters_per_token(model_dir: Path, reward_model: bool = False) -> int:
    """Matmul parameters a token passes through: all but a learned position table (the tied embedding counts once,
    as the LM head). A reward model (``reward_model``) has no LM head: its token embedding is a lookup, not a matmul,
    so it is left out too (its score head counts)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = (AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM).from_pretrained(model_dir)
    positions = getattr(getattr(model, "transformer", None), "wpe", None)  # GPT-2's position table
    lookups = [positions] + ([model.get_input_embeddings()] if reward_model else [])
    return model.num_parameters() - sum(t.weight.numel() for t in lookups if t is not None)


def rss_mb() -> float:
    """This process's resident memory now, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (``ru_maxrss``), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str | Path, work: Path, flags: list[str], quiet: bool = False) -> dict[str, Any]:
    """Run ``script --worker PATH *flags`` in a fresh process from the repository root; return the JSON it wrote.

    ``quiet``: hold back the worker's output (the libraries' logs), shown only when the worker fails.
    """
    out = work / f"worker-{os.getpid()}-{time.time_ns()}.json"
    command = [sys.executable, str(Path(script).resolve()), "--worker", str(out), *flags]
    try:
        subprocess.run(command, check=True, cwd=ROOT, capture_output=quiet, text=True)
    except subprocess.CalledProcessError as error:
        if quiet:
            sys.stderr.write(error.stdout + error.stderr)
        raise
    result = json.loads(out.read_text())
    out.unlink()
    return result
