"""The run lock: two processes never both hold it; a lock is taken over only when its holder is provably gone.

Many concurrent trials: in each, six processes released at once by a barrier race for a directory whose ``.lock``
names a dead process (the stale-lock takeover raced on main: both held the lock in 8 of 30 trials); each holder
counts itself in a shared counter while it holds the lock. A live holder is never displaced, whatever its lock file
says (unreadable text included), and a lock naming another host is never taken over from here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefopt.errors import ConfigError
from prefopt.rundir import RunLock

CONTENDERS = 6
TRIALS = 100


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def contend(root: str, trials: int, barrier, guard, holding, peak, held) -> None:
    """One contender: in each trial, wait for the start, try to take the lock, hold it a while, release it."""
    for trial in range(trials):
        lock = RunLock(Path(root) / f"trial-{trial}")
        barrier.wait()  # the trial's directory is ready: all contenders start at once
        try:
            lock.acquire()
        except ConfigError:
            barrier.wait()
            continue
        with guard:
            holding.value += 1
            peak[trial] = max(peak[trial], holding.value)
            held[trial] += 1
        time.sleep(0.01)  # hold it a while: a second holder would overlap
        with guard:
            holding.value -= 1
        lock.release()
        barrier.wait()


def race(root: Path, trials: int, stale: bool) -> list[tuple[int, int]]:
    """CONTENDERS processes race for the lock of a new directory per trial, one whose ``.lock`` names a dead
    process when ``stale``; (most holders at one time, how many held it in turn) per trial."""
    context = multiprocessing.get_context("fork")
    barrier, guard = context.Barrier(CONTENDERS + 1), context.Lock()
    holding, peak, held = context.Value("i", 0), context.Array("i", trials), context.Array("i", trials)
    processes = [context.Process(target=contend, args=(str(root), trials, barrier, guard, holding, peak, held))
                 for _ in range(CONTENDERS)]
    for process in processes:
        process.start()
    gone = dead_pid()
    for trial in range(trials):
        directory = root / f"trial-{trial}"
        directory.mkdir()
        if stale:
            (directory / ".lock").write_text(json.dumps({"pid": gone, "host": socket.gethostname()}))
        barrier.wait()  # go
        barrier.wait()  # every contender is done
        assert not (directory / ".lock").exists()  # every holder removed it on release
    for process in processes:
        process.join(30)
    return list(zip(peak, held))


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many_racing_processes(tmp_path):
    outcomes = race(tmp_path, TRIALS, stale=True)
    overlapping = [trial for trial, (peak, _) in enumerate(outcomes) if peak > 1]
    assert not overlapping, f"two processes held the lock at once in trials {overlapping} of {TRIALS}"
    assert all(held >= 1 for _, held in outcomes)


def test_a_fresh_directory_is_locked_by_exactly_one_of_many_racing_processes(tmp_path):
    outcomes = race(tmp_path, TRIALS, stale=False)
    assert all(peak == 1 and held >= 1 for peak, held in outcomes), outcomes


HOLDER = """
import sys, time
from prefopt.rundir import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
open(sys.argv[2], "w").write(sys.argv[3])
print("holding", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("text", ["garbage", ""], ids=["unreadable", "empty"])
def test_a_live_holder_is_never_displaced_whatever_its_lock_file_says(text, tmp_path):
    """The holder's lock file is overwritten with garbage (or emptied): the lock is still its own."""
    lock_file = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(lock_file), text],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(ConfigError, match="is in use by another run"):
            RunLock(tmp_path).acquire()
        assert lock_file.read_text() == text
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path)  # killed (-9): the kernel released its lock, and it is taken over
    lock.acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()


def test_a_lock_of_a_live_pid_or_another_host_is_not_taken_over(tmp_path):
    """Where flock is not honoured the lock text decides, conservatively."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {sleeper.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": "another-host"}))
    with pytest.raises(ConfigError, match="if no run is alive on another-host, remove .* by hand"):
        RunLock(tmp_path).acquire()
