"""Sample completions of online algorithms, for ``samples.jsonl`` and the console.

While ``recording()`` is active, the generation engine hands every rollout it samples to ``note_rollout`` and the
reward composition hands each rollout's total and per-component rewards to ``note_rewards``; the Trainer records
during evaluation (every ``train.eval_every`` steps and at the end), so no algorithm writes samples itself. Only
the first ``keep`` rows are kept. Offline algorithms generate nothing, so nothing is recorded for them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_active: "Recorder | None" = None


class Recorder:
    """The first ``keep`` sampled rows: prompt, response and reward parts."""

    def __init__(self, keep: int):
        self.keep = keep
        self.rollouts: list[Any] = []
        self.rewards: dict[int, dict[str, Any]] = {}  # id(rollout) -> {"reward": [B], "parts": {name: [B]}}

    def rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for rollout in self.rollouts:
            noted = self.rewards.get(id(rollout), {})
            for i, (prompt, response) in enumerate(zip(rollout.prompts, rollout.responses)):
                if len(out) >= self.keep:
                    return out
                row: dict[str, Any] = {"prompt": prompt, "response": response}
                if "reward" in noted:
                    row["reward"] = _item(noted["reward"], i)
                    row["reward_parts"] = {name: _item(values, i) for name, values in noted["parts"].items()}
                out.append(row)
        return out


def _item(values: Any, i: int) -> float:
    return float(values[i])


@contextlib.contextmanager
def recording(keep: int = 8) -> Iterator[Recorder]:
    """Collect the rollouts sampled inside the block (at most ``keep`` rows)."""
    global _active
    previous, _active = _active, Recorder(keep)
    try:
        yield _active
    finally:
        _active = previous


def note_rollout(rollout: Any) -> None:
    """Called by the generation engine for every rollout it returns."""
    if _active is not None and sum(len(r.responses) for r in _active.rollouts) < _active.keep:
        _active.rollouts.append(rollout)


def note_rewards(rollout: Any, total: Any, parts: dict[str, Any]) -> None:
    """Called with a rollout's reward [B] and its named parts {name: [B]} (a later call for it replaces these)."""
    if _active is not None and any(r is rollout for r in _active.rollouts):
        _active.rewards[id(rollout)] = {"reward": total.detach().float().cpu(),
                                        "parts": {k: v.detach().float().cpu() for k, v in parts.items()}}


def write_samples(path: Path, step: int, rows: list[dict[str, Any]]) -> None:
    """Append ``{"step": step, **row}`` lines to ``path``."""
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps({"step": step, **row}) + "\n")


def format_sample(row: dict[str, Any], width: int = 100) -> str:
    """One console line: the prompt's tail, the response's head and the reward parts."""
    prompt = " ".join(row["prompt"].split())[-width // 2:]
    response = " ".join(row["response"].split())[:width]
    reward = ""
    if "reward" in row:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in row["reward_parts"].items())
        reward = f"  [reward {row['reward']:.3g}: {parts}]"
    return f"  sample: ...{prompt!r} -> {response!r}{reward}"
