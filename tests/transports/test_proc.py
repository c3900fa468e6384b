"""Liveness of same-node peers (transports/_proc.py): a live process, one named with the wrong
start time (as a reused pid would be), a killed one not reaped yet (zombie), a reaped one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from lmdisagg.transports._proc import HOSTNAME, ProcWatch, start_ticks


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_live_zombie_and_reaped_processes():
    w = ProcWatch()
    p = _sleeper()
    try:
        start = start_ticks(p.pid)
        assert start is not None
        assert w.alive(HOSTNAME, p.pid, start) and w.alive(HOSTNAME, p.pid, start, strict=True)
        assert not w.alive(HOSTNAME, p.pid, start + 1, strict=True)  # same pid, another start time
        assert w.alive("another-host", 1, 0)  # remote peers: their medium detects loss
        os.kill(p.pid, signal.SIGKILL)
        # not reaped: a zombie. The strict check sees it at once; the pidfd once it exited
        _until(lambda: not w.alive(HOSTNAME, p.pid, start, strict=True))
        assert not w.alive(HOSTNAME, p.pid, start)
        p.wait()
        assert not w.alive(HOSTNAME, p.pid, start) and not w.alive(HOSTNAME, p.pid, start, strict=True)
    finally:
        p.kill()
        p.wait()
        w.close()


def test_a_watched_process_reaped_between_checks_is_dead_for_both_checks():
    for strict in (False, True):
        w = ProcWatch()
        p = _sleeper()
        start = start_ticks(p.pid)
        assert w.alive(HOSTNAME, p.pid, start, strict)  # its fds are now cached
        p.kill()
        p.wait()  # reaped: /proc/<pid> is gone, the cached fds name a dead process
        assert not w.alive(HOSTNAME, p.pid, start, strict)
        assert not w._fds, "the dead process's fds stay open"
        w.close()


def test_the_pidfd_check_sees_a_killed_process_before_it_is_reaped():
    """The cheap check (a poll of the cached pidfd) of a process that exited but is still a
    zombie: dead, and its fds are released."""
    w = ProcWatch()
    p = _sleeper()
    try:
        start = start_ticks(p.pid)
        assert w.alive(HOSTNAME, p.pid, start)  # cached: pidfd, stat fd, poll object
        os.kill(p.pid, signal.SIGKILL)
        _until(lambda: not w.alive(HOSTNAME, p.pid, start))
        with open(f"/proc/{p.pid}/stat") as f:  # nobody has reaped it: a zombie
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
        assert not w._fds, "the dead process's fds stay open"
    finally:
        p.kill()
        p.wait()
        w.close()
