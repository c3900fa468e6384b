"""What a process holds that a transport could leak: threads (Python and native), file
descriptors, listening TCP ports, lmdisagg shared-memory segments."""
from __future__ import annotations

import os
import threading


def listening_ports() -> list[int]:
    """TCP ports this process listens on (any address)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the fd listing itself, closed meanwhile
            pass
    return sorted(out)


def snapshot() -> dict:
    return {
        "threads": sorted(t.name for t in threading.enumerate()),
        "tasks": len(os.listdir("/proc/self/task")),
        "fds": open_files(),
        "ports": listening_ports(),
        "shm": sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"lmdisagg-{os.getpid()}-")),
    }


def diff(before: dict, after: dict) -> dict:
    """Everything ``after`` holds beyond ``before`` (empty dict: nothing leaked)."""
    out = {}
    for k in ("threads", "ports", "shm"):
        extra = sorted(set(after[k]) - set(before[k]))
        if extra:
            out[k] = extra
    if len(after["fds"]) > len(before["fds"]):
        out["fds"] = sorted(set(after["fds"]) - set(before["fds"])) or len(after["fds"]) - len(before["fds"])
    if after["tasks"] > before["tasks"]:
        out["tasks"] = after["tasks"] - before["tasks"]
    return out


def left_over(before: dict, grace_s: float = 5.0) -> dict:
    """``diff(before, now)``, given up to ``grace_s`` to become empty: libraries (Mooncake's
    engine, NCCL) finish closing sockets and threads on their own threads after close returns.
    What is still there then is a leak."""
    import gc
    import time
    deadline = time.monotonic() + grace_s
    while True:
        gc.collect()
        out = diff(before, snapshot())
        if not out or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)
