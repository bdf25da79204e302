"""The output directory of a run: which directories may hold one, who may write into it, and what is the run's.

* ``check_output_dir``: ``train.output_dir`` is never empty, and never the working directory or one above it
  (``.``, ``..``, ``x/..``, ``/``): a run's directory is one of its own.
* The ledger ``output_dir/run_files.json`` lists every entry (file or folder) a run writes there, recorded BEFORE
  it is written. ``train.overwrite=true`` removes exactly the entries the ledger lists (``clear_run``), never a
  name it guesses; everything else in the directory (notes, a recipe, a user's own ``model/``) stays. A run refuses
  to start when an entry it is about to write exists but is not listed (``check_unowned``): it would write into
  someone else's file.
* A directory holds a run when it has a run config (``prefopt_config.json``), a ledger, a ``metrics.jsonl`` or a
  ``checkpoints/`` folder. Starting into it is refused unless ``train.resume`` (auto or a checkpoint path) continues
  the SAME run (its config equals this one in every key that changes what is computed, ``config_hash``; the
  run-control keys ``CONTROL_KEYS`` may differ, else the refusal lists the keys that differ) or
  ``train.overwrite=true`` clears it. A run without a ledger (an older prefopt) is never cleared: its files cannot be
  told from the user's.
* One process writes a directory at a time: ``prefopt.runlock.RunLock``; every check above runs under that lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from prefopt.errors import ConfigError
from prefopt.runlock import LOCK_FILE, RunLock

CONFIG_FILE = "prefopt_config.json"
LEDGER_FILE = "run_files.json"
RUN_MARKERS = (CONFIG_FILE, LEDGER_FILE, "metrics.jsonl", "checkpoints")
# What every run writes into its output directory (recorded in its ledger first); see ``run_entries``.
RUN_ENTRIES = (CONFIG_FILE, CONFIG_FILE + ".tmp", "manifest.json", "metrics.jsonl", "metrics.csv", "summary.json",
               "checkpoints")
MODEL_ENTRIES = ("model", "model.tmp", "model.old")  # the final model, written in place atomically (replace_dir)
# May change between a run and its resumption: how the run is driven and watched (not what it computes), where it
# is (the directory itself, however spelled), and the keys the Trainer warns about when they change at a resume
# (seed, batch_size, gradient_accumulation_steps: the data position is kept in batches, not exact).
# on_nonfinite changes nothing while the numbers are finite: it may be switched to skip to get past a divergence.
CONTROL_KEYS = frozenset({"train.resume", "train.overwrite", "train.progress", "train.report_to", "train.log_every",
                          "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.max_eval_batches",
                          "train.max_steps", "train.save_model", "train.max_skipped_updates", "train.num_workers",
                          "train.output_dir", "train.seed", "train.batch_size", "train.gradient_accumulation_steps",
                          "train.on_nonfinite", "train.accept_changed_data", "train.epochs", "train.push_to_hub",
                          "train.hub_private",
                          "model.logits.keep_mb"})  # kept or recomputed, the head's logits are the same numbers
log = logging.getLogger("prefopt.rundir")
__all__ = ["CONFIG_FILE", "LEDGER_FILE", "LOCK_FILE", "RunLock", "RunFiles", "check_output_dir", "claim",
           "clear_run", "config_hash", "changed_keys", "flatten", "holds_run"]


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


def check_output_dir(output_dir: str | Path) -> Path:
    """``output_dir`` as a Path; ConfigError when it is empty or is the working directory or one above it."""
    text = str(output_dir)
    key = f"train.output_dir={text!r}"
    if not text.strip():
        raise ConfigError(f"{key}: empty; name the run's own directory, e.g. runs/my-run")
    resolved, here = Path(text).expanduser().resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        where = "the working directory" if resolved == here else f"{resolved}, above the working directory"
        raise ConfigError(f"{key} is {where}; a run needs a directory of its own (a run writes and, with "
                          "train.overwrite, removes its files there), e.g. runs/my-run")
    return Path(text)


def run_entries(output_dir: Path, save_model: bool, samples: bool, trackers: bool) -> tuple[str, ...]:
    """The entries a run writes: ``RUN_ENTRIES``, the model when it saves one, ``samples.jsonl`` when it samples,
    and accelerate's tracker folder (``output_dir / output_dir.name``) when it reports to a tracker."""
    return (*RUN_ENTRIES, *(MODEL_ENTRIES if save_model else ()), *(("samples.jsonl",) if samples else ()),
            *((output_dir.name,) if trackers else ()))


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


class RunFiles:
    """The ledger ``run_files.json``: the entries of the output directory this run wrote (or is about to)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LEDGER_FILE
        self.names = read_ledger(Path(output_dir)) or set()

    def add(self, *names: str) -> None:
        """Record ``names`` (top-level entries of the output directory) before they are written."""
        new = set(names) - self.names
        if not new:
            return
        self.names |= new
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"files": sorted(self.names)}, indent=2) + "\n")
        os.replace(tmp, self.path)


def read_ledger(output_dir: Path) -> set[str] | None:
    """The entries ``output_dir/run_files.json`` lists (None: there is no readable ledger)."""
    try:
        data = json.loads((output_dir / LEDGER_FILE).read_text())
    except (OSError, ValueError):
        return None
    names = data.get("files") if isinstance(data, dict) else None
    if not isinstance(names, list):
        return None
    return {n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")}


def claim(output_dir: str | Path, config: dict[str, Any], resume: str, overwrite: bool,
          writes: tuple[str, ...] = (), lock: RunLock | None = None) -> None:
    """Apply the output-directory policy (module docstring) under ``lock`` (taken here); raise ConfigError.

    ``writes``: the entries this run will write; one that exists but no run of this directory wrote is refused.
    Nothing is written here: the run config is written by the caller once the resume is decided.
    """
    output_dir = check_output_dir(output_dir)
    check_writable(output_dir)
    if lock is not None:
        lock.acquire()
    key = f"train.output_dir={str(output_dir)!r}"
    if holds_run(output_dir) and read_ledger(output_dir) is None:
        raise _without_ledger(output_dir)
    check_unowned(output_dir, writes)  # before anything is removed
    if holds_run(output_dir):
        if overwrite:
            clear_run(output_dir)
        elif resume == "no":
            raise ConfigError(f"{key} already holds a run; set train.resume=auto to continue it, "
                              "train.overwrite=true to start over, or choose another output_dir")
        else:
            previous = read_config(output_dir)
            if previous is None:
                raise ConfigError(f"{key} holds a run without a readable {CONFIG_FILE}; it cannot be resumed "
                                  "safely: set train.overwrite=true to start over, or choose another output_dir")
            if config_hash(previous) != config_hash(config):
                diff = changed_keys(previous, config)
                raise ConfigError(f"{key} holds a different run (config differs in {'; '.join(diff)}); "
                                  "train.resume continues only the same run: set train.overwrite=true to start "
                                  "over, or choose another output_dir")


def check_unowned(output_dir: Path, writes: tuple[str, ...]) -> None:
    """ConfigError when an entry the run will write exists and the ledger does not list it."""
    owned = read_ledger(output_dir) or set()
    foreign = [name for name in writes if name not in owned and (output_dir / name).exists()]
    if foreign:
        shown = ", ".join(name + ("/" if (output_dir / name).is_dir() else "") for name in foreign)
        raise ConfigError(f"train.output_dir={str(output_dir)!r} holds {shown}, which no prefopt run wrote there "
                          f"(not in {LEDGER_FILE}); this run would write into it: move it away or choose another "
                          "output_dir")


def clear_run(output_dir: Path) -> list[str]:
    """Remove exactly the entries the ledger lists, then the ledger; return their names. A run without a ledger
    is refused (ConfigError): nothing says which files are its."""
    owned = read_ledger(output_dir)
    if owned is None:
        raise _without_ledger(output_dir)
    log.warning("train.overwrite=true: removing the earlier run's %s from %s", ", ".join(sorted(owned)), output_dir)
    return undo_start(output_dir)


def _without_ledger(output_dir: Path) -> ConfigError:
    present = [n for n in RUN_MARKERS if (output_dir / n).exists()]
    return ConfigError(f"train.output_dir={str(output_dir)!r} holds {', '.join(present)} but no {LEDGER_FILE} (a run "
                       "of an older prefopt, or not a prefopt run): nothing says which files are a run's, so it can "
                       "be neither resumed nor overwritten safely; move them away by hand, or choose another "
                       "output_dir")


def undo_start(output_dir: Path) -> list[str]:
    """Remove every entry the ledger lists, then the ledger (a start that failed before its first step)."""
    removed = sorted(read_ledger(output_dir) or set())
    for name in removed:
        remove_entry(output_dir / name)
    for name in (LEDGER_FILE, LEDGER_FILE + ".tmp"):
        (output_dir / name).unlink(missing_ok=True)
    return removed


def remove_entry(entry: Path) -> None:
    """Remove a file, a link (not its target) or a folder."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    elif entry.exists() or entry.is_symlink():
        entry.unlink()


def read_config(output_dir: Path) -> dict[str, Any] | None:
    """The run config of ``output_dir`` (None when missing or unreadable)."""
    try:
        data = json.loads((output_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "train" in data and "algorithm" in data else None


def replace_dir(target: Path, write: Any) -> None:
    """``write(folder)`` into ``<target>.tmp``, then put it in ``target``'s place: a reader finds the old folder or
    the new one, never a half-written one."""
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    for stale in (tmp, old):
        remove_entry(stale)
    write(tmp)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    remove_entry(old)


def write_config(output_dir: Path, config: dict[str, Any]) -> None:
    tmp = output_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, default=str))
    os.replace(tmp, output_dir / CONFIG_FILE)
