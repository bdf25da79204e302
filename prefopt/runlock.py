"""The lock of a run directory: one process writes into it at a time.

``output_dir/.lock`` is held with ``fcntl.flock`` for the whole run. The kernel releases that lock when its holder
ends in any way (kill -9 included), so a lock is stale exactly when no live process holds it, and taking a stale
lock over is the same atomic ``flock`` call as taking a fresh one: two processes can never both hold it. The file
is created with ``O_CREAT | O_EXCL`` when absent; its text names the holder (pid, the process's start time, host)
for the refusal message. Only the holder removes the file, while it still holds it, and a process that got the
lock checks that the path still names the file it locked (else it locked a file just removed, and tries again):
there is no unlink race.

Where ``flock`` is not honoured (a filesystem without locks, or a shared filesystem whose locks are local to each
host), the text decides, conservatively: a lock whose holder provably runs (this host, that pid alive with the same
start time) or that names another host (whose processes cannot be checked from here) is never taken over.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from prefopt.errors import ConfigError

LOCK_FILE = ".lock"
log = logging.getLogger("prefopt.runlock")


def process_start(pid: int) -> float | None:
    """The start time (epoch seconds) of process ``pid``; None when it does not run (or cannot be seen)."""
    import psutil  # a dependency of accelerate

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # exists, but not ours to inspect: alive, start unknown
        return -1.0


def holder_runs(holder: dict[str, Any]) -> bool:
    """Whether the process a lock text names may still run: True unless it is provably gone (this host, and its
    pid is not running, or runs with another start time: a reused pid)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    started = process_start(pid)
    if started is None:
        return False
    recorded = holder.get("started")
    if started < 0 or not isinstance(recorded, (int, float)):
        return True
    return abs(started - recorded) < 1.0


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that has not yet written its name"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


class RunLock:
    """``output_dir/.lock``: ``acquire`` (ConfigError while another process holds it), ``release``."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> None:
        if self.fd is not None:
            return
        for _ in range(100):
            fd, created = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            if not self._still_at_path(fd):  # locked a file its holder removed meanwhile: try again
                os.close(fd)
                continue
            holder = None if created else _read(fd)
            if holder and holder.get("pid") != os.getpid() and holder_runs(holder):  # flock not honoured here
                os.close(fd)
                raise self._in_use(holder)
            if not created and holder is not None:
                log.warning("taking over the stale lock %s (%s is not running)", self.path, describe(holder))
            _write(fd, {"pid": os.getpid(), "host": socket.gethostname(),
                        "started": process_start(os.getpid()), "since": time.time()})
            self.fd = fd
            return
        raise ConfigError(f"cannot take the lock {self.path}: other processes keep creating and removing it")

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock."""
        if self.fd is None:
            return
        try:
            if self._still_at_path(self.fd):
                self.path.unlink()
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def _open(self) -> tuple[int | None, bool]:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), True
        except FileExistsError:
            pass
        try:
            return os.open(self.path, os.O_RDWR | os.O_CLOEXEC), False
        except FileNotFoundError:  # removed between the two calls
            return None, False

    def _still_at_path(self, fd: int) -> bool:
        try:
            here, mine = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _in_use(self, holder: dict[str, Any] | None) -> ConfigError:
        other_host = holder and holder.get("host") not in (None, socket.gethostname())
        hint = (f"; if no run is alive on {holder.get('host')}, remove {self.path} by hand" if other_host
                else "; wait for it to finish or choose another output_dir")
        return ConfigError(f"train.output_dir={str(self.path.parent)!r} is in use by another run "
                           f"({describe(holder)}, lock {self.path}){hint}")


def _read(fd: int) -> dict[str, Any] | None:
    """The holder a lock file names (None: empty or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0)
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _write(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)
