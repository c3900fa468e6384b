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


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if it is gone, dying or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X") or int(fields[6]) & PF_EXITING:  # fields 3 (state), 9 (flags)
        return None
    return int(fields[19])  # field 22: starttime


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
    """Cached liveness checks: one pidfd per watched process, polled without blocking (a few
    microseconds; a plain /proc read costs ~30). Owned by a transport, closed with it."""

    def __init__(self):
        self._fds: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def alive(self, host: str, pid: int, start: int, strict: bool = False) -> bool:
        """``strict`` also reads /proc (~30 µs) to see a process that is dying but not yet
        exited (tearing down a big address space takes milliseconds)."""
        if host != HOSTNAME:
            return True
        if strict and start_ticks(pid) != start:
            return False
        key = (pid, start)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = self._open(pid, start)
                if fd is None:
                    return False
                self._fds[key] = fd
            if select.select([fd], [], [], 0)[0]:  # readable = the process has exited
                os.close(self._fds.pop(key))
                return False
            return True

    @staticmethod
    def _open(pid: int, start: int) -> int | None:
        if start_ticks(pid) != start:
            return None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        if start_ticks(pid) != start:  # the pid was reused between the two reads
            os.close(fd)
            return None
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
