"""Process identity on this host, for liveness checks of same-node peers.

A pid alone can be reused, so a process is named by (pid, start time in clock ticks since boot),
read from ``/proc/<pid>/stat``. A zombie (killed, not yet reaped) counts as dead.
"""
from __future__ import annotations

import os
import select
import socket
import threading

HOSTNAME = socket.gethostname()


PF_EXITING = 0x4  # include/linux/sched.h: set as soon as the process starts dying


def _parse_stat(stat: bytes) -> int | None:
    """starttime from /proc/<pid>/stat, or None for a zombie or dying process."""
    # the command name (field 2) may hold spaces and parentheses: split after the last ')', and
    # only as far as starttime (this runs once per finished transfer)
    fields = stat[stat.rindex(b")") + 2:].split(None, 20)
    if fields[0] in (b"Z", b"X") or int(fields[6]) & PF_EXITING:  # fields 3 (state), 9 (flags)
        return None
    return int(fields[19])  # field 22: starttime


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if it is gone, dying or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return _parse_stat(f.read())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def self_identity() -> tuple[int, int]:
    pid = os.getpid()
    return pid, start_ticks(pid) or 0


def alive(host: str, pid: int, start: int, strict: bool = True) -> bool:
    """Whether the process (pid, start) on ``host`` still runs. Peers on other hosts are assumed
    alive here: their transports detect loss on the medium itself (connection reset, timeouts)."""
    if host != HOSTNAME:
        return True
    return start_ticks(pid) == start


class ProcWatch:
    """Cached liveness checks of same-node processes. Per process it keeps a pidfd (readable once
    the process has exited: a non-blocking poll of it costs ~0.5 µs) and an open stat file of its
    main thread (re-read with pread for ``strict`` checks, which also see a process that is dying
    but not yet gone: tearing down a large address space takes milliseconds). Owned by a transport.

    The main thread's ``/proc/<pid>/task/<pid>/stat`` has the same state, flags and start time as
    ``/proc/<pid>/stat`` (both describe the thread-group leader), but the kernel does not sum every
    thread's CPU times to make it: 3.2 µs a read for a worker of 256 threads against 6.8 µs (64
    threads: 3.3 against 4.1 µs) on the 2-core VM. Workers running torch and Ray have dozens."""

    def __init__(self):
        # (pid, start) -> (pidfd, stat fd, a poll object watching the pidfd)
        self._fds: dict[tuple[int, int], tuple[int, int, select.poll]] = {}
        self._lock = threading.Lock()

    def alive(self, host: str, pid: int, start: int, strict: bool = False) -> bool:
        if host != HOSTNAME:
            return True
        key = (pid, start)
        with self._lock:
            fds = self._fds.get(key)
            if fds is None:
                fds = self._open(pid, start)
                if fds is None:
                    return False
                self._fds[key] = fds
            pidfd, statfd, poller = fds
            if strict:  # the stat read also sees an exited process: a zombie, or gone (ESRCH)
                try:
                    dead = _parse_stat(os.pread(statfd, 1024, 0)) != start
                except OSError:  # reaped
                    dead = True
            else:
                dead = bool(poller.poll(0))
            if dead:
                del self._fds[key]
                os.close(pidfd)
                os.close(statfd)
            return not dead

    @staticmethod
    def _open(pid: int, start: int) -> tuple[int, int, select.poll] | None:
        try:
            statfd = os.open(f"/proc/{pid}/task/{pid}/stat", os.O_RDONLY)
        except OSError:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.close(statfd)
            return None
        try:  # checked after both opens: a reused pid cannot slip in between
            ok = _parse_stat(os.pread(statfd, 1024, 0)) == start
        except OSError:
            ok = False
        if not ok:
            os.close(statfd)
            os.close(pidfd)
            return None
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return pidfd, statfd, poller

    def close(self) -> None:
        with self._lock:
            for pidfd, statfd, _ in self._fds.values():
                os.close(pidfd)
                os.close(statfd)
            self._fds.clear()
