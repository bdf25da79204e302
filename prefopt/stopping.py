"""How a run stops early: on a signal (SIGTERM / SIGINT) or on non-finite numbers, always saying where it stands.

* ``SignalCatcher``: the first SIGTERM/SIGINT is remembered and the Trainer stops after the step in flight, saving
  a checkpoint (``Interrupted``, exit 128 + the signal); a second one stops at once without saving. ``agreed()``
  is collective, so every process stops at the same step.
* ``NonFiniteError`` (exit 3): the loss, gradient or weights went NaN/inf with ``on_nonfinite=stop``, too many
  updates in a row were skipped with ``on_nonfinite=skip``, or an online algorithm's sampling met NaN/inf
  probabilities (a diverged policy: ``sampling_diverged``). ``advice`` names the newest checkpoint whose weights and
  optimizer state really are finite, and says the truth about it: resumed as it is, an exact resume repeats the
  same steps and meets the same NaN, so it says what to change.
* ``NonFiniteGuard``: what the Trainer does with a non-finite loss, gradient norm or weights, and its count of
  skipped updates (part of the trainer state a checkpoint keeps). Every decision is agreed by all processes, so none
  waits forever in a collective.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from prefopt.checkpoint import complete_checkpoints
from prefopt.distributed import any_process, max_over_processes
from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt.stopping")


class NonFiniteError(PrefoptError):
    """The loss, gradient or weights were NaN/inf (``train.on_nonfinite``); exit code 3."""

    exit_code = 3


class Interrupted(PrefoptError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved (unless a second signal asked to stop at once)."""

    exit_code = 128 + 15  # set to 128 + the signal number when raised
    label = "stopped"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalCatcher:
    """Remembers the first SIGTERM/SIGINT; the second raises ``Interrupted`` at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        def handler(signum, frame):
            if self.received is not None:  # the second one: stop at once
                error = Interrupted(f"second {signal_name(signum)}: stopped at once, no checkpoint written "
                                    "(the last complete one is intact)")
                error.exit_code = 128 + signum
                raise error
            self.received = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def agreed(self, accelerator: Any) -> int:
        """The stop signal any process received (0: none); collective, so all processes stop together."""
        received = max_over_processes(accelerator, self.received or 0)
        if received and self.received is None:
            self.received = received
        return received


SAMPLING_NAN = "probability tensor contains"  # torch.multinomial on NaN/inf probabilities


def sampling_diverged(exc: BaseException) -> bool:
    """The error torch raises when sampling from a policy whose probabilities are NaN/inf."""
    return isinstance(exc, RuntimeError) and SAMPLING_NAN in str(exc)


def _all_finite(tensors: Any) -> bool:
    if isinstance(tensors, torch.Tensor):
        return not tensors.is_floating_point() or bool(torch.isfinite(tensors).all())
    if isinstance(tensors, dict):
        return all(_all_finite(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return all(_all_finite(v) for v in tensors)
    return True


def checkpoint_finite(path: Path) -> bool:
    """Every tensor of the checkpoint's weights (model*.safetensors) and optimizer state (optimizer*.bin) is finite."""
    from safetensors import safe_open

    for file in sorted(path.glob("model*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if not all(_all_finite(handle.get_tensor(key)) for key in handle.keys()):
                return False
    return all(_all_finite(torch.load(file, map_location="cpu", weights_only=True))
               for file in sorted(path.glob("optimizer*.bin")))


def last_finite_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose weights and optimizer state are finite (None: there is none)."""
    for path in reversed(complete_checkpoints(output_dir)):
        try:
            if checkpoint_finite(path):
                return path
        except Exception:  # unreadable: not one to resume from
            continue
    return None


def advice(output_dir: str | Path, skipping: bool) -> str:
    """What to do after a non-finite stop; ``skipping``: skipping updates did not help (or would not)."""
    path = last_finite_checkpoint(output_dir)
    if path is None:
        return ("No checkpoint with finite weights and optimizer state was written, so there is nothing to resume "
                "from: start over with a lower train.learning_rate")
    model = path / "model"
    restart = f"start a new run from {model if model.is_dir() else path} with a lower train.learning_rate"
    how = restart if skipping else (f"resume with train.resume={path} train.on_nonfinite=skip to skip such "
                                    f"updates, or {restart}")
    return (f"The newest checkpoint with finite weights and optimizer state is {path}; resumed as it is, it repeats "
            f"the same steps exactly (and meets the same NaN): {how}")


class NonFiniteGuard:
    """A non-finite loss or gradient norm spoils its update: skipped (``train.on_nonfinite=skip``) or the run stops
    (``stop``); ``train.max_skipped_updates`` skips in a row stop it too. Non-finite weights are never written."""

    def __init__(self, accelerator: Any, train: Any, output_dir: Path):
        self.accelerator, self.train, self.output_dir = accelerator, train, output_dir
        self.skipped_updates = 0
        self.skipped_in_a_row = 0

    def state(self) -> dict[str, int]:
        return {"skipped_updates": self.skipped_updates, "skipped_in_a_row": self.skipped_in_a_row}

    def restore(self, state: dict[str, Any]) -> None:
        self.skipped_updates = state.get("skipped_updates", 0)
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)

    def loss_spoiled(self, loss: torch.Tensor, step: int) -> bool:
        """Whether any process's ``loss`` is non-finite (then ``spoiled`` has decided what happens)."""
        finite = bool(torch.isfinite(loss.detach()))
        if any_process(self.accelerator, not finite):
            self.spoiled(step, "loss")
            return True
        return False

    def clip(self, params: list[torch.Tensor], averager: Any, step: int) -> str | None:
        """Clip the gradients (``max_grad_norm`` 0: only measure); "gradient norm" when it is not finite."""
        acc, max_norm = self.accelerator, self.train.max_grad_norm
        norm = acc.clip_grad_norm_(params, max_norm or float("inf"))
        if norm is None:  # DeepSpeed clips inside its own step
            return None
        norm = float(norm)
        if acc.scaler is not None:  # fp16: an overflow is the loss scaler's business (it skips the step)
            finite = True
        else:
            finite = not any_process(acc, not math.isfinite(norm))
        if not finite:
            self.spoiled(step, "gradient norm")
            return "gradient norm"
        if math.isfinite(norm):
            averager.add({"train/grad_norm": norm})
        return None

    def spoiled(self, step: int, what: str) -> None:
        """A non-finite ``what``: stop (``on_nonfinite=stop``) or warn that its update is skipped."""
        message = f"non-finite {what} at step {step + 1}"
        if self.train.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}; stopped. {advice(self.output_dir, skipping=False)}")
        log.warning("%s; update skipped", message)

    def updated(self) -> None:
        self.skipped_in_a_row = 0

    def skipped(self, step: int, what: str) -> None:
        """Count a skipped update; ``train.max_skipped_updates`` in a row stop the run."""
        self.skipped_updates += 1
        self.skipped_in_a_row += 1
        limit = self.train.max_skipped_updates
        if self.skipped_in_a_row >= limit:
            raise NonFiniteError(f"{self.skipped_in_a_row} updates in a row skipped (non-finite {what}, last at step "
                                 f"{step + 1}; train.max_skipped_updates={limit}); stopped. "
                                 f"{advice(self.output_dir, skipping=True)}")

    def check_weights(self, model: Any, step: int, what: str) -> None:
        """Refuse to write ``what`` from non-finite weights (agreed by all processes): stop with exit code 3."""
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())
        if any_process(self.accelerator, not finite):
            raise NonFiniteError(f"the weights are non-finite at step {step}; {what} not written; stopped. "
                                 f"{advice(self.output_dir, skipping=self.train.on_nonfinite == 'skip')}")

    @contextlib.contextmanager
    def sampling(self, step: int, where: str) -> Iterator[None]:
        """Sampling from NaN/inf probabilities inside the block (an online policy diverged) stops with exit 3."""
        try:
            yield
        except RuntimeError as exc:
            if not sampling_diverged(exc):
                raise
            raise NonFiniteError(f"the policy's sampling probabilities are NaN/inf at step {step} ({where}): it "
                                 f"diverged; stopped. {advice(self.output_dir, skipping=True)}") from None
