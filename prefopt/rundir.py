"""The output directory of a run: who may write into it, and a lock so that only one run does at a time.

A run writes its config to ``output_dir/prefopt_config.json`` (not ``config.json``: that name is transformers'). A
directory holds a run when it has that file, a ``metrics.jsonl`` or a ``checkpoints/`` folder (files such as a
recipe or a bench's ``run.json`` placed there by hand or by a tool do not count). Starting into a directory that
holds a run is refused unless

* ``train.resume=auto`` (or a checkpoint path) and the directory holds the SAME run: its config equals this one in
  every key that changes what is computed (``config_hash``; the run-control keys in ``CONTROL_KEYS`` may differ),
  else the refusal lists the keys that differ;
* ``train.overwrite=true``: the earlier run's outputs are removed first (``clear_run``: only what a run writes;
  a recipe or notes kept beside them stay).

``output_dir/.lock`` holds the pid and host of the run writing the directory; a second run is refused while that
process lives. A lock left by a process that died (kill -9, a crash) is taken over with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from prefopt.errors import ConfigError

CONFIG_FILE = "prefopt_config.json"
LEGACY_CONFIG_FILE = "config.json"  # prefopt before the rename: resumable, and then rewritten as CONFIG_FILE
LOCK_FILE = ".lock"
RUN_MARKERS = (CONFIG_FILE, "metrics.jsonl", "checkpoints")
RUN_OUTPUTS = (CONFIG_FILE, "manifest.json", "metrics.jsonl", "metrics.csv", "samples.jsonl", "summary.json",
               "checkpoints", "model")
# May change between a run and its resumption: how the run is driven and watched (not what it computes), where it
# is (the directory itself, however spelled), and the keys the Trainer warns about when they change at a resume
# (seed, batch_size, gradient_accumulation_steps: the data position is kept in batches, not exact).
CONTROL_KEYS = frozenset({"train.resume", "train.overwrite", "train.progress", "train.report_to", "train.log_every",
                          "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.max_eval_batches",
                          "train.max_steps", "train.save_model", "train.max_skipped_updates", "train.num_workers",
                          "train.output_dir", "train.seed", "train.batch_size", "train.gradient_accumulation_steps",
                          "train.epochs", "train.push_to_hub", "train.hub_private"})
log = logging.getLogger("prefopt.rundir")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}`` (lists and None kept as values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the config without its run-control keys."""
    kept = {k: v for k, v in flatten(config).items() if k not in CONTROL_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys outside ``CONTROL_KEYS`` whose values differ, as ``key: old -> new``."""
    a, b = flatten(json.loads(json.dumps(old, default=str))), flatten(json.loads(json.dumps(new, default=str)))
    keys = sorted(k for k in set(a) | set(b) if k not in CONTROL_KEYS and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def holds_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_MARKERS)


def check_writable(output_dir: Path) -> None:
    """``output_dir`` is (or can be made) a writable directory; else a ConfigError naming it."""
    key = f"train.output_dir={str(output_dir)!r}"
    for parent in (output_dir, *output_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{key}: {parent} is a file, not a directory")
        if parent.exists():
            break
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot create it: {exc.strerror or exc}") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: not writable")


def claim(output_dir: str | Path, config: dict[str, Any], resume: str, overwrite: bool) -> None:
    """Apply the output-directory policy (module docstring) and write this run's config; raise ConfigError."""
    output_dir = Path(output_dir)
    check_writable(output_dir)
    key = f"train.output_dir={str(output_dir)!r}"
    if holds_run(output_dir):
        if overwrite:
            log.warning("train.overwrite=true: removing the earlier run's outputs from %s", output_dir)
            clear_run(output_dir)
        elif resume == "no":
            raise ConfigError(f"{key} already holds a run; set train.resume=auto to continue it, "
                              "train.overwrite=true to start over, or choose another output_dir")
        else:
            previous = _read_config(output_dir)
            if previous is None:
                raise ConfigError(f"{key} holds a run without a readable {CONFIG_FILE} (written by an older "
                                  "prefopt?); it cannot be resumed safely: set train.overwrite=true to start over")
            if config_hash(previous) != config_hash(config):
                diff = changed_keys(previous, config)
                raise ConfigError(f"{key} holds a different run (config differs in {'; '.join(diff)}); "
                                  "train.resume continues only the same run: set train.overwrite=true to start "
                                  "over, or choose another output_dir")
    (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))


def clear_run(output_dir: Path) -> None:
    """Remove what a run wrote into ``output_dir`` (``RUN_OUTPUTS``, the trackers' folder); nothing else."""
    names = [*RUN_OUTPUTS, output_dir.name]  # accelerate's trackers log to project_dir / project_name
    if _read_config_file(output_dir / LEGACY_CONFIG_FILE) is not None:
        names.append(LEGACY_CONFIG_FILE)
    for name in names:
        entry = output_dir / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


def _read_config(output_dir: Path) -> dict[str, Any] | None:
    """The run config of ``output_dir``: ``prefopt_config.json``, or the ``config.json`` older versions wrote."""
    for name in (CONFIG_FILE, LEGACY_CONFIG_FILE):
        data = _read_config_file(output_dir / name)
        if data is not None:
            return data
    return None


def _read_config_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "train" in data and "algorithm" in data else None


class RunLock:
    """``output_dir/.lock`` with this process's pid; refuses while another live process holds it."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _alive(holder):
                    raise ConfigError(f"train.output_dir={str(self.path.parent)!r} is in use by another run "
                                      f"(pid {holder['pid']} on {holder.get('host', '?')}, lock {self.path}); wait "
                                      "for it to finish or choose another output_dir") from None
                log.warning("taking over the stale lock %s (%s)", self.path,
                            f"pid {holder['pid']} is not running" if holder else "unreadable")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return
        raise ConfigError(f"cannot take the lock {self.path}: another run keeps taking it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError):
            return None


def _alive(holder: dict[str, Any]) -> bool:
    """The holder process runs (a lock from another host is assumed live: its pid cannot be checked here)."""
    if holder.get("host", socket.gethostname()) != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
