"""How a run stops early: on a signal (SIGTERM / SIGINT) or on non-finite numbers, always saying where it stands.

* ``SignalCatcher``: the first SIGTERM/SIGINT is remembered and the Trainer stops after the step in flight, saving
  a checkpoint (``Interrupted``, exit 128 + the signal); a second one stops at once without saving. ``agreed()``
  is collective, so every process stops at the same step.
* ``NonFiniteError`` (exit 3): the loss, gradient or weights went NaN/inf with ``on_nonfinite=stop``, or too many
  updates in a row were skipped with ``on_nonfinite=skip``. ``last_finite_checkpoint`` names the checkpoint a
  resume would start from, after checking that its weights really are finite.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import torch

from prefopt.checkpoint import complete_checkpoints
from prefopt.distributed import max_over_processes
from prefopt.errors import PrefoptError


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


def weights_finite(path: Path) -> bool:
    """Every tensor of the checkpoint's model*.safetensors is finite."""
    from safetensors import safe_open

    for file in sorted(path.glob("model*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return False
    return True


def last_finite_checkpoint(output_dir: str | Path) -> str:
    """'the newest checkpoint with finite weights is X (resume with train.resume=auto)', or that there is none."""
    for path in reversed(complete_checkpoints(output_dir)):
        try:
            if weights_finite(path):
                return f"the newest checkpoint with finite weights is {path} (resume with train.resume=auto)"
        except Exception:  # unreadable: not one to resume from
            continue
    return "no checkpoint with finite weights was written, so there is nothing to resume from"
