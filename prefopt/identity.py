"""What a run depends on, recorded in every checkpoint so that a resume knows what it resumes.

``run_identity`` gathers: the algorithm's name; the config hash (``prefopt.rundir.config_hash``: every key that
changes what is computed) with the config itself, to name the keys that differ; the data actually read (each
source file's sha256 or a hub dataset's fingerprint, and each split's row count and id digest, from the data
manifest); and a content fingerprint of every other local file or folder the config names (the start model, a
reference or reward model, a tokenizer, a chat template, a PPO-ptx text, Sparrow's heads file ...).

``differences`` compares a checkpoint's identity with the current run's and says, one line each, what changed;
``check_resumable`` refuses a resume on it (``train.accept_changed_data`` lets changed data through, knowingly).
A hub id is identified by its name (and the config hash): its files cannot be read offline.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefopt.errors import CheckpointError, ConfigError
from prefopt.rundir import changed_keys, config_hash

# Covered otherwise: the data paths by the data manifest (the files actually read), the run's own directory.
NOT_INPUTS = frozenset({"train.output_dir", "train.resume", "data.path", "eval_data.path"})
SKIPPED_NAMES = frozenset({".git", "__pycache__", ".cache"})
log = logging.getLogger("prefopt.identity")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_files(paths: list[Path]) -> list[str]:
    """``file_sha256`` of each path, several files at once (hashlib releases the GIL: a sharded checkpoint of a big
    model is hashed on several cores)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(paths)))) as pool:
        return list(pool.map(file_sha256, paths))


def fingerprint(path: Path) -> dict[str, Any]:
    """A file: its sha256. A folder: the sha256 of every file under it (hidden ones and caches skipped)."""
    path = path.expanduser()
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": file_sha256(path)}
    found = [file for file in sorted(path.rglob("*")) if file.is_file()
             and not any(p.startswith(".") or p in SKIPPED_NAMES for p in file.relative_to(path).parts)]
    files = dict(zip((file.relative_to(path).as_posix() for file in found), sha256_files(found)))
    return {"path": str(path.resolve()), "files": files}


def named_paths(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{dotted key: value}`` of every string value of ``config`` that names an existing local path."""
    found: dict[str, str] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for key, value in items:
        dotted = f"{prefix}[{key}]" if isinstance(key, int) else (f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, (dict, list)):
            found.update(named_paths(value, dotted))
        elif isinstance(value, str) and value.strip() and dotted not in NOT_INPUTS:
            try:
                exists = Path(value).expanduser().exists()
            except OSError:  # a name too long for the filesystem: not a path
                exists = False
            if exists:
                found[dotted] = value
    return found


def run_identity(algorithm: str, config: dict[str, Any], data_report: dict[str, Any]) -> dict[str, Any]:
    """The identity of a run (module docstring), JSON-serialisable."""
    data = {}
    for name, manifest in (data_report.get("manifests") or {}).items():
        data[name] = {"sources": manifest.get("sources"), "parts": manifest.get("parts")}
    return {"algorithm": algorithm, "config_sha256": config_hash(config), "config": config, "data": data,
            "inputs": {key: fingerprint(Path(value)) for key, value in named_paths(config).items()}}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(what changed in the run's inputs, what changed in its data), one phrase each; empty when the same."""
    if saved.get("algorithm") != current["algorithm"]:
        return [f"it is a checkpoint of algorithm {saved.get('algorithm')!r}, this run is "
                f"{current['algorithm']!r}"], []
    changed = []
    if saved.get("config_sha256") != current["config_sha256"]:
        diff = changed_keys(saved.get("config") or {}, current["config"])
        changed.append(f"the config differs in {'; '.join(diff) or 'keys this prefopt cannot name'}")
    old_inputs, new_inputs = saved.get("inputs") or {}, current["inputs"]
    for key in sorted(set(old_inputs) | set(new_inputs)):
        old, new = old_inputs.get(key), new_inputs.get(key)
        if _contents(old) == _contents(new):  # the same bytes, wherever the path now points from
            continue
        if old is None or new is None:
            state = "exists now" if old is None else "is gone"
            changed.append(f"{key} ({(new or old)['path']}) {state}, it {'did not' if old is None else 'did'} then")
        else:
            changed.append(f"{key}={new['path']!r} changed since the checkpoint ({_what_changed(old, new)})")
    return changed, _data_differences(saved.get("data") or {}, current["data"])


def _contents(found: dict[str, Any] | None) -> Any:
    return None if found is None else (found.get("sha256"), found.get("files"))


def _what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    if "sha256" in old and "sha256" in new:
        return f"sha256 {old['sha256'][:12]}... -> {new['sha256'][:12]}..."
    a, b = old.get("files", {}), new.get("files", {})
    names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    shown = ", ".join(f"{n} {'added' if n not in a else 'removed' if n not in b else 'differs'}" for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else "its path"


def _data_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = []
    for name in sorted(set(old) | set(new)):
        key = "eval_data.path" if name == "eval_data" else "data.path"
        a, b = old.get(name) or {}, new.get(name) or {}
        old_sources = {_source_name(s): s for s in a.get("sources") or []}
        new_sources = {_source_name(s): s for s in b.get("sources") or []}
        for source in sorted(set(old_sources) | set(new_sources)):
            x, y = old_sources.get(source), new_sources.get(source)
            if x is None or y is None:
                changed.append(f"{key} reads {source} {'now' if x is None else 'no more'}")
            elif _content(x) != _content(y):
                changed.append(f"{key} file {source} changed since the checkpoint ({_content(x)[:12]}... -> "
                               f"{_content(y)[:12]}...)")
        if not changed and a.get("parts") != b.get("parts"):
            changed.append(f"the rows {key} gives changed since the checkpoint (split counts or ids differ)")
    return changed


def _source_name(source: dict[str, Any]) -> str:
    return str(source.get("path") or source.get("hub") or source)


def _content(source: dict[str, Any]) -> str:
    return str(source.get("sha256") or source.get("fingerprint") or "")


def check_resumable(path: Path, state: dict[str, Any], current: dict[str, Any], train: Any) -> None:
    """Refuse (one line) resuming checkpoint ``path`` (its trainer ``state``) in the run of identity ``current``:
    not this run's, on changed data (unless ``train.accept_changed_data``), or past ``train.max_steps``."""
    saved = state.get("identity")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} records no identity (written by an older prefopt), so it cannot "
                              "be checked to be this run's; set train.overwrite=true to start over")
    changed, data_changed = differences(saved, current)
    if changed:
        more = f" (and {len(changed) - 1} more difference(s))" if len(changed) > 1 else ""
        raise ConfigError(f"train.resume: checkpoint {path} is not this run's: {changed[0]}{more}; choose its own "
                          "run's settings, or train.overwrite=true / another output_dir to start anew")
    if data_changed and not train.accept_changed_data:
        raise ConfigError(f"train.resume: {data_changed[0]}, so the saved data position would point into other rows "
                          f"than checkpoint {path} trained on; restore the data, or set "
                          "train.accept_changed_data=true to continue on the changed data knowingly")
    if data_changed:
        log.warning("resuming from %s on changed data (train.accept_changed_data=true): %s", path,
                    "; ".join(data_changed))
    if state["step"] > train.max_steps:
        raise ConfigError(f"train.max_steps={train.max_steps}: below the step of checkpoint {path} "
                          f"({state['step']}); set train.max_steps >= {state['step']} to resume it")
