"""A short DPO run's ``prefopt train`` overrides, shared by the CLI-level run tests (test_run_policy, test_run_watch).

16 training pairs of ``hh_small`` (about 12 held out), 128 tokens, batches of 4, 2 steps, a metrics row every step,
no progress bar; ``extra`` overrides come last and win.
"""

from __future__ import annotations

from pathlib import Path


def short_dpo(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["algorithm.name=dpo", f"model.name_or_path={model}", f"data.path={data}", "data.max_examples=16",
            "data.eval_fraction=0.25", "data.max_length=128", "data.max_prompt_length=64", f"train.output_dir={out}",
            "train.max_steps=2", "train.batch_size=4", "train.eval_batch_size=8", "train.learning_rate=0.002",
            "train.log_every=1", "train.progress=false", "train.mixed_precision=no", *extra]
