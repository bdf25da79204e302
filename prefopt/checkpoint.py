"""Atomic checkpoints: write into ``<name>.tmp``, then rename; only renamed directories count as complete.

A checkpoint holds what ``accelerator.save_state`` writes (optimizer, scheduler, the RNG states of every process:
python, numpy, torch, cuda; the model weights only when they are sharded, FSDP / DeepSpeed) and its ``model/``, which
holds the weights ONCE, loadable with plain ``from_pretrained`` (the trainable rest, a critic or heads, beside it:
prefopt.export.ExportedWeights), plus ``trainer_state.json``, written last: the step,
each process's data position (epoch, batches of it taken) and its metrics averager's partial sums. A directory without
``trainer_state.json``, or still named ``*.tmp``, is an interrupted write and is never resumed from.

Loading is safe: the model is safetensors and every pickle accelerate wrote (optimizer, scheduler, RNG states) is
read with ``torch.load(weights_only=True)``; the RNG states need only numpy's array reconstruction on top
(``SAFE_RNG_GLOBALS``). Objects an algorithm registers with ``accelerator.register_for_checkpointing`` (PPO's KL
controller) would be read by accelerate with ``weights_only=False``, so we save and load their state dicts ourselves
(``custom_state_<i>.pt``, weights-only). accelerate swallows a failed RNG restore with an info log, which would
silently break exact resume, so ``load_checkpoint`` restores the RNG states itself and fails loudly instead.

Integrity: ``trainer_state.json`` lists every other file of the checkpoint with its size and sha256, and carries a
sha256 of its own content (``STATE_SUM_KEY``), so a truncated or flipped byte anywhere, or a hand-edited step
counter, is found by ``verify_checkpoint`` before anything is loaded. ``load_resume`` asks the caller's ``check``
whether the checkpoint belongs to this run before it loads it (``prefopt.identity``). A directory whose every
checkpoint is damaged stays refused (the damaged ones are kept as ``<name>.corrupt``) until ``train.overwrite``.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefopt.errors import CheckpointError, ConfigError
from prefopt.identity import sha256_files

STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"  # a copy of the model that plain ``from_pretrained`` loads (with the tokenizer)
STATE_KEYS = ("step", "batches_consumed")
FILES_KEY = "files"  # in trainer_state.json: every other file of the checkpoint, its size and sha256
STATE_SUM_KEY = "state_sha256"  # in trainer_state.json: the sha256 of the rest of it
STEP_NAME = re.compile(r"step-(\d+)")
WRITTEN_NAME = re.compile(r"step-\d+(\.corrupt)?")  # a checkpoint that was completed once (usable or set aside)
RNG_FILE = "random_states_{}.pkl"  # accelerate's name, one per process
CUSTOM_FILE = "custom_state_{}.pt"  # objects registered with accelerator.register_for_checkpointing
ACCELERATE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # accelerate's model file, when it wrote one
log = logging.getLogger("prefopt.checkpoint")


def _numpy_rng_globals() -> list[Any]:
    """What an unpickled ``np.random.get_state()`` needs beyond torch's weights-only allowlist."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    found = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.append(dtypes.UInt32DType)
    return found


SAFE_RNG_GLOBALS = _numpy_rng_globals()


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, state: dict[str, Any], keep: int,
                    export: Any = None, weights: Any = None) -> Path:
    """Save accelerate state + trainer state atomically; prune to the ``keep`` newest complete checkpoints.

    Every process must call this (``save_state`` and the barriers are collective); the main process writes
    ``state`` (JSON-serialisable) and does the renames. ``export(directory)``, when given, writes the loadable
    ``model/`` copy (main process only). With ``weights`` (a ``prefopt.export.ExportedWeights``) the model's weights
    are stored once: accelerate writes none, ``model/`` holds them, and the trainable rest goes beside it.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if accelerator.is_main_process:
        for stale in root.glob("*.tmp"):  # left by a write that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    with _own_custom_objects(accelerator) as custom, _weights_skipped(accelerator, weights is not None):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for index, obj in enumerate(custom):
            torch.save(obj.state_dict(), tmp / CUSTOM_FILE.format(index))
        if export is not None:
            export(tmp / MODEL_DIR)
            if weights is not None:
                weights.save_rest(tmp, MODEL_DIR)
        written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
                 for p, digest in zip(written, sha256_files(written))}
        (tmp / STATE_FILE).write_text(json.dumps(sealed({"step": step, **state, FILES_KEY: files}), indent=2))
        _fsync_tree(tmp)
        aside = root / f"step-{step:08d}.old.tmp"
        if final.exists():  # the same step saved again (a finished run resumed): never leave a gap
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed, with a trainer state), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` -> newest complete one (or None), ``no`` -> None, else a path."""
    found = resume_candidates(output_dir, resume)
    return found[0] if found else None


def resume_candidates(output_dir: str | Path, resume: str) -> list[Path]:
    """Checkpoints to try, in order: ``auto`` -> every complete one, newest first; a path -> that one."""
    if resume == "no":
        return []
    if resume == "auto":
        return complete_checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume={resume!r}: not a complete checkpoint (no {STATE_FILE}); "
                          "use auto, no, or a checkpoints/step-N directory")
    return [path]


def sealed(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the sha256 of its canonical JSON under ``STATE_SUM_KEY``."""
    body = {k: v for k, v in state.items() if k != STATE_SUM_KEY}
    return {**body, STATE_SUM_KEY: _state_sum(body)}


def _state_sum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with checkpoint ``path``, naming the file (None: it is as it was written).

    The trainer state must be readable, carry the keys a resume needs and its own checksum, and say the step the
    directory name says; every file it lists must be there with the size and sha256 it was written with (a
    missing, truncated or altered weights, optimizer, scheduler, RNG or shard file), and no other file may hold
    weights.
    """
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{path / STATE_FILE}: unreadable ({exc})"
    missing = [key for key in (*STATE_KEYS, FILES_KEY, STATE_SUM_KEY) if not isinstance(state, dict) or key not in state]
    if missing:
        return f"{path / STATE_FILE}: missing {', '.join(missing)} (damaged, or written by an older prefopt)"
    if state[STATE_SUM_KEY] != _state_sum({k: v for k, v in state.items() if k != STATE_SUM_KEY}):
        return f"{path / STATE_FILE}: its content does not match its checksum (edited or damaged)"
    named = STEP_NAME.fullmatch(path.name)
    if named and int(named.group(1)) != state["step"]:
        return f"{path / STATE_FILE}: says step {state['step']}, the directory says {int(named.group(1))}"
    files = state[FILES_KEY]
    for name, written in files.items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != written["bytes"]:
            return f"{file}: {file.stat().st_size} bytes, written with {written['bytes']} (truncated?)"
    names = list(files)
    for name, digest in zip(names, sha256_files([path / name for name in names])):
        if digest != files[name]["sha256"]:
            return f"{path / name}: its content differs from what was written (sha256 mismatch: damaged or altered)"
    extra = [p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() not in files
             and p.name != STATE_FILE and p.suffix in (".safetensors", ".bin", ".pt", ".pkl")]
    if extra:
        return f"{extra[0]}: not part of the checkpoint as written"
    return None


def load_resume(accelerator: Any, output_dir: str | Path, resume: str, weights: Any = None,
                check: Callable[[Path, dict[str, Any]], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Load the checkpoint ``resume`` names: (its path, its trainer state), or None for a fresh start.

    ``check(path, state)`` runs before anything is loaded and raises when the checkpoint is not this run's (it is
    then left as it is). With ``auto``, a newest checkpoint that fails ``verify_checkpoint`` or
    ``load_checkpoint`` is set aside as ``<name>.corrupt`` with a warning naming the bad file, and the previous
    complete one is tried; when none is left but one was ever completed, the resume is refused (CheckpointError)
    rather than started over.
    """
    problems = []
    for path in resume_candidates(output_dir, resume):
        problem = verify_checkpoint(path)
        if problem is None:
            state = json.loads((path / STATE_FILE).read_text())
            if check is not None:
                check(path, state)
            try:
                return path, load_checkpoint(accelerator, path, weights)
            except CheckpointError as exc:
                problem = str(exc)
        problems.append(problem)
        if resume != "auto":
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            set_aside(path)
        accelerator.wait_for_everyone()
        log.warning("checkpoint %s is unusable (%s); set aside as %s.corrupt, trying the previous one",
                    path, problem, path.name)
    if resume == "auto" and (problems or written_checkpoints(output_dir)):
        found = "; ".join(problems) or "set aside earlier: " + ", ".join(p.name for p in written_checkpoints(output_dir))
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(output_dir)} ({found}); this run cannot be "
                              "continued: set train.overwrite=true to start it over")
    return None


def written_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every checkpoint that was completed once, usable or set aside (``step-N``, ``step-N.corrupt``)."""
    root = checkpoint_dir(output_dir)
    return sorted(p for p in root.iterdir() if WRITTEN_NAME.fullmatch(p.name)) if root.is_dir() else []


def set_aside(path: Path) -> Path:
    """Rename an unusable checkpoint to ``<name>.corrupt`` (kept for inspection, never resumed from again)."""
    target = path.with_name(path.name + ".corrupt")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def load_checkpoint(accelerator: Any, path: Path, weights: Any = None) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this process's RNG states; return the trainer state.

    A checkpoint without accelerate's model file stored its weights once (``save_checkpoint``): they are read from
    its ``model/`` and the trainable rest by ``weights`` (a ``prefopt.export.ExportedWeights``)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {exc}") from exc
    state.pop(FILES_KEY, None)
    state.pop(STATE_SUM_KEY, None)
    once = weights is not None and not any((path / name).is_file() for name in ACCELERATE_WEIGHTS)
    try:
        with _own_custom_objects(accelerator) as custom, _weights_skipped(accelerator, once):
            accelerator.load_state(str(path))
        if once:
            weights.restore(path, MODEL_DIR)
    except CheckpointError:
        raise
    except Exception as exc:  # accelerate and torch raise many types; the user needs the file and the reason
        raise CheckpointError(f"checkpoint {path} cannot be loaded into this run: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
    for index, obj in enumerate(custom):
        obj.load_state_dict(_safe_load(path / CUSTOM_FILE.format(index), "the state of a registered object"))
    restore_rng(path / RNG_FILE.format(accelerator.process_index))
    return state


@contextlib.contextmanager
def _weights_skipped(accelerator: Any, skip: bool) -> Iterator[None]:
    """While on, ``save_state`` writes no model weights and ``load_state`` reads none (accelerate's state hooks)."""
    if not skip:
        yield
        return
    handles = [accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear()),
               accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _own_custom_objects(accelerator: Any) -> Iterator[list[Any]]:
    """Hide objects registered with ``accelerator.register_for_checkpointing`` from save/load_state.

    accelerate reads their pickles with ``weights_only=False`` (arbitrary code on load); we write their state
    dicts as ``custom_state_<i>.pt`` ourselves and read them back with ``weights_only=True``.
    """
    custom = list(getattr(accelerator, "_custom_objects", []))
    if custom:
        accelerator._custom_objects = []
    try:
        yield custom
    finally:
        if custom:
            accelerator._custom_objects = custom


def _safe_load(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} ({what}) is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise CheckpointError(f"{path}: cannot load {what} safely (weights_only=True): "
                              f"{type(exc).__name__}: {exc}") from exc


def restore_rng(path: Path) -> None:
    """Set the python, numpy and torch (and cuda) RNGs from accelerate's ``random_states_<rank>.pkl``."""
    if not path.is_file():  # resumed with more processes than wrote the checkpoint: not exact, but allowed
        log.warning("checkpoint %s has no %s: the RNG states of this process are not restored, so the resumed "
                    "run is not an exact continuation", path.parent, path.name)
        return
    try:
        with torch.serialization.safe_globals(SAFE_RNG_GLOBALS):
            states = torch.load(path, map_location="cpu", weights_only=True)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except Exception as exc:  # an unpickling error has many types; the user needs the file and the reason
        raise CheckpointError(f"{path}: cannot restore the RNG states: {type(exc).__name__}: {exc}") from exc


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk, so the rename publishes complete data even after a crash."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
