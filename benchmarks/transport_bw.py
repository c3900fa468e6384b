"""KV transport bandwidth: every transport × payload, against the link's limit measured in the same run.

    python benchmarks/transport_bw.py                     # CPU: shm, fake, nccl (gloo), mooncake (tcp)
    python benchmarks/transport_bw.py --device cuda       # GPU: cuda_ipc (same GPU, GPU0→GPU1),
                                                          #      nccl (GPU0→GPU1), shm (CUDA staging)
    python benchmarks/transport_bw.py --only shm --sizes-mib 64,256,1024 \
        --set shm:piece_nbytes=16777216 --suffix=-shm-pieces16   # an option against its default

The source lives in another process (spawned, as workers are): it allocates one buffer with its
transport's allocator (so shm serves it zero-copy, like a prefill engine made with
``kv_allocator=tx.allocate``), fills it, registers it and describes blocks on request. This process
pulls into a registered destination buffer from the same transport's allocator (a decode engine's
cache in serving, made with ``kv_allocator=tx.allocate``; nccl pairs then run registered where
NCCL allows, see ``transports/_nccl_mem.py``; runs before 2026-11-28 used ordinary memory
here). Timed: ``pull`` + ``wait`` of
``size // block`` contiguous blocks (the descriptor is made beforehand, not timed). Each size: one
warm-up pull, a verified pull (bytes compared with the pattern the source wrote), then timed pulls
(``reps``: 512 MiB worth, 5-50; at least 25 on GPUs since 2026-11-29, where runs before took 5-8
at ≥ 64 MiB and their medians moved by a few hundredths between runs); the median counts.
``fixed_us``: median latency of a one-block 4 KiB pull after first contact;
``first_contact_ms``: the very first pull (handshakes, IPC opens, pair groups).
``gbps_before_raw_copies``: one pull of the largest size made before this process has made any
raw copy between two GPUs (absent for the media measured after one). Such a copy has torch
enable peer access from the source's GPU to the destination's, which decides whether a copy out
of memory opened from another process runs peer to peer or staged through the host; a decode
worker makes no such copy, so this pull shows the rate it gets from the transport alone.
``*_sustained``: a stream of PULLS pulls of the size with DEPTH in flight (a new pull starts as
the oldest finishes, into the blocks that one filled): the rate a loaded decode worker sees when
several requests' KV moves at once, measured as ib_write_bw and nccl-tests do (many operations
back to back, in flight, one clock around them all); its limit is PULLS raw copies into the same
regions queued back to back, then one sync. GPU-to-GPU media (cuda_ipc, nccl) get them at every
size; host-staged and CPU media only for sizes whose DEPTH copies fit the largest payload.
Rows "<medium> push" (media that push: nccl through cupy or gloo): ``expect`` here, then ``push``
in the source, one transfer at a time, timed from the source's ``push`` call to this process's
``wait`` returning (both read the same monotonic clock); the expectation, whose receives are
posted before the source is asked, is made first and not timed, as a decode worker makes it
when it reserves blocks before the prefill; ``fixed_us``: the same for one 4 KiB block.
``ordered_*`` (GPU push rows): the push made while the GPU work that readies its bytes still
runs, timed from the bytes being ready on the source GPU (see ``ordered_push``).
``raw_nccl_*`` (nccl rows launched through cupy): NCCL's own rate on the link, the transport's
ceiling: send/recv between the two processes over a communicator of their own, no transport and
no control messages, timed on the sender's GPU around its sends (one message, and
PULLS messages over DEPTH regions against the sustained limit). ``raw_nccl_posted_first_*``: one
message whose receive this process posted before the source posted its send, timed on the host
from the source's post to the moment this process sees the bytes land (both read the same
monotonic clock), against the serial limit: the best a design in which the source posts first (a
push) could do with NCCL; a pull adds the request's trip to the source before that.

Limits, timed the same way in this process: host memcpy (shm, fake), loopback TCP between two
processes (nccl-gloo, mooncake-tcp), device-to-device copy (same-GPU IPC), torch peer copy
(cross-GPU IPC, NCCL), pinned host-to-device copy (shm staging for CUDA). Each side is timed to
the moment the bytes are known to have landed: a pull until its ``wait`` returns, a raw CUDA copy
(queued, it returns at once) until a sync of the devices it runs on returns.
Needs no Ray and no pydantic. Writes benchmarks/results/transport_<tag>.json (+ .png).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import socket
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, also when run through runpy
# OpenMP threads that spin between parallel regions turn a 1 MiB copy into ~8 ms on a shared,
# oversubscribed host (measured here); sleeping waiters give both the limit and the transports
# their real speed. Read by OpenMP when torch loads, so set before the import (children inherit).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from machine import describe  # noqa: E402

from lmdisagg.transports import create_transport  # noqa: E402

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 2 * MiB  # one KV chunk of a mid-size model in bf16
DEPTH = 4        # pulls in flight for the sustained figures
PULLS = 16       # pulls in one sustained run

# label: (transport, options, source device, destination device, limit)
CPU_MEDIA = {
    "shm": ("shm", {}, "cpu", "cpu", "host memcpy"),
    "fake": ("fake", {}, "cpu", "cpu", "host memcpy"),
    "nccl (gloo)": ("nccl", {"backend": "gloo"}, "cpu", "cpu", "loopback TCP"),
    "mooncake (tcp)": ("mooncake", {"protocol": "tcp"}, "cpu", "cpu", "loopback TCP"),
}
CUDA_MEDIA = {
    "cuda_ipc (same GPU)": ("cuda_ipc", {}, "cuda:0", "cuda:0", "D2D copy"),
    "cuda_ipc (GPU0→GPU1)": ("cuda_ipc", {}, "cuda:0", "cuda:1", "peer copy"),
    "nccl (GPU0→GPU1)": ("nccl", {"backend": "nccl"}, "cuda:0", "cuda:1", "peer copy"),  # cupy's NCCL if installed
    "nccl-torch (GPU0→GPU1)": ("nccl", {"backend": "nccl", "runtime": "torch"}, "cuda:0", "cuda:1", "peer copy"),
    "shm (CUDA staging)": ("shm", {}, "cuda:0", "cuda:0", "pinned copy"),
}


# --- the source process ------------------------------------------------------------------------
def pattern(n: int, offset: int = 0) -> torch.Tensor:
    """The bytes the source writes: position-dependent, cheap to regenerate for checks."""
    start, words = offset // 8, -(-n // 8)
    w = torch.arange(start, start + words, dtype=torch.int64).mul_(0x9E3779B1).add_(17)
    return w.view(torch.uint8)[:n]


def source_main(conn, name: str, options: dict, device: str, nbytes: int) -> None:
    tx = create_transport(name, **options)
    t = tx.allocate((nbytes,), torch.uint8, device)
    for off in range(0, nbytes, 256 * MiB):
        n = min(256 * MiB, nbytes - off)
        t[off:off + n].copy_(pattern(n, off).to(t.device))
    buf = tx.register(t)
    raw = None  # a raw NCCL communicator with the parent, once asked for
    while True:
        op, *args = conn.recv()
        if op == "describe":
            ids, block, checksum = args
            conn.send(tx.describe(buf, ids, block, checksum=checksum))
        elif op == "bufdesc":
            conn.send(buf.desc)
        elif op == "push":  # the parent expects these blocks: push them, report when push was called
            ticket, ids = args
            t0 = time.perf_counter()
            try:
                y = tx.push(ticket, buf, ids)
            except Exception as e:
                conn.send(RuntimeError(f"source: {e!r}"))
                continue
            conn.send(t0)
            try:
                y.wait(600)
            except Exception as e:  # the parent's expectation fails or times out too
                print(f"source: push failed: {e!r}", flush=True)
        elif op == "push_ordered":  # push called while the GPU work that readies the bytes still runs
            ticket, ids, cycles = args
            try:
                with torch.cuda.device(t.device):
                    torch.cuda._sleep(cycles)  # stands for the prefill that writes the blocks
                    ready = torch.cuda.Event()
                    ready.record()
                    y = tx.push(ticket, buf, ids)  # its sends wait for that work on the GPU
                    hidden = not ready.query()     # push's host work ended before the bytes were ready
                    while not ready.query():
                        pass
                    t_ready = time.perf_counter()
            except Exception as e:
                conn.send(RuntimeError(f"source: {e!r}"))
                continue
            conn.send((t_ready, hidden))
            try:
                y.wait(600)
            except Exception as e:
                print(f"source: push failed: {e!r}", flush=True)
        elif op == "nccl_join":  # a raw 2-rank NCCL communicator with the parent (see RawNccl)
            try:
                from cupy.cuda import nccl
                from cupy.cuda import runtime as rt
                rt.setDevice(t.device.index)
                raw = nccl.NcclCommunicator(2, args[0], 0)  # returns once the parent joined
                conn.send(None)
            except Exception as e:
                conn.send(RuntimeError(f"source: {e!r}"))
        elif op == "nccl_send":  # the parent posts its receives as it asks: send, report GPU seconds
            n, count, depth = args
            try:
                conn.send(nccl_ops(raw, t, n, count, depth, send=True)())
            except Exception as e:
                conn.send(RuntimeError(f"source: {e!r}"))
        elif op == "nccl_push":  # the parent's receive is posted: send now, report when we posted
            n, cycles = args     # (cycles > 0: queue the send behind that much GPU work, report when it ended)
            try:
                from cupy.cuda import nccl
                from cupy.cuda import runtime as rt
                rt.setDevice(t.device.index)
                with torch.cuda.device(t.device):
                    stream = torch.cuda.Stream()
                    ready = torch.cuda.Event()
                    with torch.cuda.stream(stream):
                        if cycles:
                            torch.cuda._sleep(cycles)
                        ready.record()
                    t0 = time.perf_counter()  # CLOCK_MONOTONIC: the parent reads the same clock
                    raw.send(t.data_ptr(), n, nccl.NCCL_UINT8, 1, stream.cuda_stream)
                    if cycles:
                        while not ready.query():
                            pass
                        t0 = time.perf_counter()
                conn.send(t0)
                stream.synchronize()
            except Exception as e:
                conn.send(RuntimeError(f"source: {e!r}"))
        elif op == "tcp":  # the loopback TCP limit: send n bytes to a port of the parent
            port, n = args
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
                s.sendall(memoryview(t.numpy())[:n])
            conn.send(None)
        else:
            if raw is not None:
                raw.abort()  # not destroy(): NCCL's destroy waits for the peer to destroy too
            tx.close()
            conn.send(None)
            return


def nccl_ops(comm, buf: torch.Tensor, n: int, count: int, depth: int, send: bool):
    """Queue ``count`` NCCL sends (or receives) of ``n`` bytes of ``buf`` (regions of ``depth`` in
    turn) on a fresh stream; return a function that waits for them and gives the seconds between
    events recorded around them."""
    from cupy.cuda import nccl
    from cupy.cuda import runtime as rt
    prev = rt.getDevice()
    rt.setDevice(buf.device.index)
    try:
        stream = rt.streamCreateWithFlags(rt.streamNonBlocking)
        a, b = rt.eventCreate(), rt.eventCreate()
        op, peer = (comm.send, 1) if send else (comm.recv, 0)
        rt.eventRecord(a, stream)
        for i in range(count):
            op(buf.data_ptr() + (i % depth) * n, n, nccl.NCCL_UINT8, peer, stream)
        rt.eventRecord(b, stream)
    finally:
        rt.setDevice(prev)

    def finish() -> float:
        rt.eventSynchronize(b)
        secs = rt.eventElapsedTime(a, b) / 1e3
        for ev in (a, b):
            rt.eventDestroy(ev)
        rt.streamDestroy(stream)
        return secs
    return finish


class Source:
    def __init__(self, name, options, device, nbytes):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=source_main, args=(child, name, options, device, nbytes), daemon=True)
        self.proc.start()

    def call(self, *msg, timeout=600):
        self.conn.send(msg)
        return self.reply(msg[0], timeout)

    def reply(self, what: str, timeout=600):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"source did not answer {what}")
        out = self.conn.recv()
        if isinstance(out, Exception):
            raise out
        return out

    def close(self):
        try:
            self.call("exit", timeout=60)
        except (TimeoutError, OSError, EOFError):  # stuck (say, in a NCCL call whose peer gave up)
            self.proc.kill()
        self.proc.join(60)


# --- timing ------------------------------------------------------------------------------------
MIN_REPS = 5  # timed runs per size at least (--min-reps; 25 on GPUs, whose runs take µs to ms)


def reps_for(nbytes: int) -> int:
    return max(MIN_REPS, min(50, (512 * MiB) // nbytes))


def timed_pair(fn, limit_fn, nbytes: int, sync=lambda: None) -> tuple[list[float], list[float]]:
    """Seconds of each timed call of ``fn`` and of ``limit_fn``, after one warm-up each, timed
    alternately so that both see the same machine (other processes come and go on a shared host).
    ``fn`` (pulls and their waits) is timed until it returns: a transfer's ``wait`` returns once
    its bytes landed. ``limit_fn`` (raw copies, which return before they end) is timed until
    ``sync`` (of the devices they run on) returns. Every device is synced, untimed, after each."""
    fn(); cuda_sync(); limit_fn(); sync(); cuda_sync()  # noqa: E702
    a, b = [], []
    for _ in range(reps_for(nbytes)):
        for f, s, out in ((fn, None, a), (limit_fn, sync, b)):
            t0 = time.perf_counter()
            f()
            if s is not None:
                s()
            out.append(time.perf_counter() - t0)
            cuda_sync()
    return a, b


def cuda_sync(*devices: torch.device):
    """Wait for the work queued on ``devices`` (default: every CUDA device)."""
    if torch.cuda.is_available():
        for d in devices or range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


PEER_COPY_MADE = False  # a raw copy between two GPUs ran in this process (see gbps_before_raw_copies)


def limit_op(kind: str, nbytes: int, tcp_source: Source | None, depth: int = 1, count: int | None = None):
    """(fn, sync, cleanup): ``count`` (default ``depth``) raw copies of ``nbytes`` over the
    medium's underlying link, into ``depth`` distinct regions in turn, queued back to back."""
    count = depth if count is None else count
    parts = [slice((i % depth) * nbytes, (i % depth + 1) * nbytes) for i in range(count)]
    if kind == "host memcpy":
        a, b = torch.ones(depth * nbytes, dtype=torch.uint8), torch.zeros(depth * nbytes, dtype=torch.uint8)
        return (lambda: [b[p].copy_(a[p]) for p in parts]), (lambda: None), (lambda: None)
    if kind == "loopback TCP":
        view = memoryview(bytearray(nbytes))
        srv = socket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]

        def once():
            tcp_source.conn.send(("tcp", port, nbytes))
            conn, _ = srv.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
            with conn:
                got = 0
                while got < nbytes:
                    got += conn.recv_into(view[got:], nbytes - got)
            tcp_source.conn.recv()
        return (lambda: [once() for _ in parts]), (lambda: None), srv.close
    global PEER_COPY_MADE
    PEER_COPY_MADE = PEER_COPY_MADE or kind == "peer copy"
    dev0 = torch.device("cuda:0")
    n = depth * nbytes
    if kind == "D2D copy":
        a, b = torch.ones(n, dtype=torch.uint8, device=dev0), torch.zeros(n, dtype=torch.uint8, device=dev0)
    elif kind == "peer copy":
        a = torch.ones(n, dtype=torch.uint8, device=dev0)
        b = torch.zeros(n, dtype=torch.uint8, device="cuda:1")
    elif kind == "pinned copy":
        a = torch.ones(n, dtype=torch.uint8).pin_memory()
        b = torch.zeros(n, dtype=torch.uint8, device=dev0)
    else:
        raise ValueError(kind)
    devices = list(dict.fromkeys(t.device for t in (a, b) if t.is_cuda))  # the devices the copy runs on
    return ((lambda: [b[p].copy_(a[p], non_blocking=True) for p in parts]), (lambda: cuda_sync(*devices)),
            (lambda: None))


class RawNccl:
    """NCCL's own rate on the link, the ceiling of the nccl transport: send/recv between this
    process and the source process over a 2-rank cupy communicator of their own (no transport, no
    control messages). This process asks the source for sends and posts its receives; the
    source's GPU time around its sends is the transfer. The receives are normally posted before
    the source, woken by the request, queues its sends; where not, the time includes the wait, so
    this rate can read low, never high."""

    def __init__(self, src: "Source", device: int):
        from cupy.cuda import nccl
        from cupy.cuda import runtime as rt
        uid = nccl.get_unique_id()
        src.conn.send(("nccl_join", uid))
        made = []

        def join():  # blocks until the source joins: in a thread, so that a source error shows
            rt.setDevice(device)
            made.append(nccl.NcclCommunicator(2, uid, 1))
        th = threading.Thread(target=join, daemon=True)
        th.start()
        src.reply("nccl_join", 120)
        th.join(120)
        if not made:
            raise TimeoutError("the raw NCCL communicator did not form")
        self.comm = made[0]
        self.src = src

    def gbps(self, dst, n: int, count: int, depth: int) -> float:
        # ask first, then post the receives, as the transport does: posting the receives first
        # hung on 2xH200 (the source's first ncclSend on the new communicator never returned)
        self.src.conn.send(("nccl_send", n, count, depth))
        finish = nccl_ops(self.comm, dst.flat, n, count, depth, send=False)
        secs = self.src.reply("nccl_send", 120)
        finish()
        return n * count / secs / 1e9

    def posted_first(self, dst, n: int, cycles: int = 0) -> float:
        """Seconds from the source posting one send of ``n`` bytes to this process seeing them
        land, this process's receive having been posted before (both processes read the same
        monotonic clock): what a design in which the source posts first, a push, could do at
        best with NCCL; a pull adds the request's trip before the source posts. ``cycles``: the
        send is queued behind that much GPU work, and timed from the end of that work."""
        from cupy.cuda import nccl
        from cupy.cuda import runtime as rt
        prev = rt.getDevice()
        rt.setDevice(dst.flat.device.index)
        try:
            stream = rt.streamCreateWithFlags(rt.streamNonBlocking)
            ev = rt.eventCreateWithFlags(rt.eventDisableTiming)
            self.comm.recv(dst.flat.data_ptr(), n, nccl.NCCL_UINT8, 0, stream)
            rt.eventRecord(ev, stream)
        finally:
            rt.setDevice(prev)
        self.src.conn.send(("nccl_push", n, cycles))
        deadline = time.monotonic() + 120
        while rt.eventQuery(ev) != 0:  # spin: the moment the bytes are known to have landed
            if time.monotonic() > deadline:  # the source failed to send (its reply says why)
                self.src.reply("nccl_push", 1)
                raise TimeoutError("the source's NCCL send did not land within 120 s")
        t1 = time.perf_counter()
        t0 = self.src.reply("nccl_push", 120)
        rt.eventDestroy(ev)
        rt.streamDestroy(stream)
        return t1 - t0

    def row(self, dst, size: int, r: dict) -> dict:
        """raw_nccl_gbps: one message (median of a few); *_sustained: PULLS messages over DEPTH
        regions, against the same limit as the transport's sustained figure; *_posted_first:
        one message whose receive was posted before the source's send (median of a few), against
        the serial limit."""
        self.gbps(dst, size, 1, 1)  # warm-up
        out = {"raw_nccl_gbps": round(statistics.median(self.gbps(dst, size, 1, 1) for _ in range(5)), 3)}
        self.posted_first(dst, size)  # warm-up
        first = size / statistics.median(self.posted_first(dst, size) for _ in range(5)) / 1e9
        out["raw_nccl_posted_first_gbps"] = round(first, 3)
        out["raw_nccl_posted_first_ratio"] = round(first / r["limit_gbps"], 3)
        if "limit_gbps_sustained" in r:
            raw = statistics.median(self.gbps(dst, size, PULLS, DEPTH) for _ in range(3))
            out["raw_nccl_gbps_sustained"] = round(raw, 3)
            out["raw_nccl_ratio_sustained"] = round(raw / r["limit_gbps_sustained"], 3)
        return out

    def close(self) -> None:
        self.comm.abort()  # local; ncclCommDestroy would wait for the source's own destroy


def sustained(tx, src, dst, size, block, limit, tcp_source) -> dict:
    """PULLS pulls with DEPTH in flight vs PULLS raw copies queued (see the module doc)."""
    if DEPTH * size > dst.desc.nbytes:
        return {}
    nb = size // block
    ids = [list(range(i * nb, (i + 1) * nb)) for i in range(DEPTH)]
    descs = [src.call("describe", b, block, False) for b in ids]

    def pulls():
        flying = deque()
        for i in range(PULLS):
            if len(flying) == DEPTH:
                flying.popleft().wait(600)  # its blocks are the next pull's destination
            flying.append(tx.pull(descs[i % DEPTH], dst, ids[i % DEPTH]))
        while flying:
            flying.popleft().wait(600)
    lim_fn, sync, cleanup = limit_op(limit, size, tcp_source, DEPTH, PULLS)
    try:
        secs, lim = timed_pair(pulls, lim_fn, PULLS * size, sync)
    finally:
        cleanup()
    total = PULLS * size
    return {"depth": DEPTH, "pulls": PULLS,
            "gbps_sustained": round(total / statistics.median(secs) / 1e9, 3),
            "limit_gbps_sustained": round(total / statistics.median(lim) / 1e9, 3),
            "ratio_sustained": round(statistics.median(b / a for a, b in zip(secs, lim)), 3)}


def push_rows(label, tx, src, dst, sizes, limit, tcp_source, raw=None) -> list[dict]:
    """Pushes (``expect`` here, then ``push`` in the source): one transfer of each size, timed
    from the source's ``push`` call to this process's ``wait`` returning, both on the same
    monotonic clock. The expectation (receives posted) is made before the push is asked for, as
    a decode worker makes it when it reserves blocks, and is not timed. Against the same serial
    limit as the pulls, paired run by run."""
    source = src.call("bufdesc")

    def one(size: int, block: int) -> float:
        ids = list(range(size // block))
        x = tx.expect(source, dst, ids, block)
        src.conn.send(("push", x.ticket.pack(), ids))
        x.wait(600)
        t1 = time.perf_counter()
        return t1 - src.reply("push", 600)

    one(4096, 4096)  # first contact: the push pair connects and warms up
    lat = [one(4096, 4096) for _ in range(300)]
    fixed_us = statistics.median(lat[50:]) * 1e6
    rows = []
    for size in sizes:
        block = min(size, BLOCK)
        one(size, block)
        dst.flat[:size].zero_()
        one(size, block)
        if not torch.equal(dst.flat[:size].cpu(), pattern(size)):
            raise AssertionError(f"{label} push: bytes differ after a {size}-byte push")
        lim_fn, sync, cleanup = limit_op(limit, size, tcp_source)
        secs, lim = [], []
        try:
            lim_fn(); sync(); cuda_sync()  # noqa: E702
            for _ in range(reps_for(size)):
                secs.append(one(size, block))
                cuda_sync()
                t0 = time.perf_counter()
                lim_fn()
                sync()
                lim.append(time.perf_counter() - t0)
                cuda_sync()
        finally:
            cleanup()
        r = {"transport": f"{label} push", "bytes": size, "gbps": round(size / statistics.median(secs) / 1e9, 3),
             "limit_gbps": round(size / statistics.median(lim) / 1e9, 3),
             "ratio": round(statistics.median(b / a for a, b in zip(secs, lim)), 3),
             "fixed_us": round(fixed_us, 1), "limit": limit, "reps": len(secs),
             "gbps_best": round(size / min(secs) / 1e9, 3), "limit_gbps_best": round(size / min(lim) / 1e9, 3),
             "ratio_best": round(min(lim) / min(secs), 3), "launcher": getattr(tx, "runtime", None),
             "timed": "from the source's push call to the destination's wait returning; expect made before"}
        rows.append(r)
        print(f"{r['transport']:22s} {size / MiB:7.0f} MiB {r['gbps']:8.2f} GB/s  limit {r['limit_gbps']:8.2f} "
              f"({limit})  ratio {r['ratio']:5.2f} (best {r['ratio_best']:4.2f})  fixed {fixed_us:7.1f} µs", flush=True)
        if limit == "peer copy":
            r.update(ordered_push(tx, src, source, dst, size, block, raw))
            alone = f"  NCCL alone {r['raw_nccl_ordered_ratio']:4.2f}" if "raw_nccl_ordered_ratio" in r else ""
            print(f"{'  stream-ordered':22s} {size / MiB:7.0f} MiB {r['ordered_gbps']:8.2f} GB/s  limit "
                  f"{r['ordered_limit_gbps']:8.2f}  ratio {r['ordered_ratio']:5.2f}{alone}  host work hidden in "
                  f"{r['ordered_host_hidden']:.0%} of runs", flush=True)
    return rows


ORDERED_CYCLES = 2_000_000  # torch.cuda._sleep: ~1 ms, longer than push's host work


def ordered_push(tx, src, source, dst, size: int, block: int, raw: "RawNccl | None" = None) -> dict:
    """A push made while the GPU work that readies its bytes still runs (the source queues ~1 ms
    of work, then calls ``push``, whose sends wait for that work on the GPU): timed from the
    moment the bytes are ready on the source GPU (its event seen complete, host clock) to this
    process's ``wait`` returning. The limit is timed the same way: a peer copy queued behind the
    same GPU work, from that work's end to a sync of both GPUs returning. This is the handoff a
    worker gets when it pushes as soon as it has queued the work that writes the blocks: the
    host work of the push is hidden behind the GPU's (``ordered_host_hidden``: the share of runs
    in which ``push`` returned before the bytes were ready). With ``raw``: NCCL alone the same
    way (``raw_nccl_ordered_*``: one message between the two processes over a communicator of
    their own, its receive posted first, its send queued behind the same GPU work; from that
    work's end to this process seeing the bytes land), the transport's ceiling on this path."""
    ids = list(range(size // block))
    a = torch.ones(size, dtype=torch.uint8, device="cuda:0")
    b = torch.zeros(size, dtype=torch.uint8, device="cuda:1")

    def one() -> tuple[float, bool]:
        x = tx.expect(source, dst, ids, block)
        src.conn.send(("push_ordered", x.ticket.pack(), ids, ORDERED_CYCLES))
        x.wait(600)
        t1 = time.perf_counter()
        t_ready, hidden = src.reply("push_ordered", 600)
        return t1 - t_ready, hidden

    def limit() -> float:
        with torch.cuda.device(0):
            torch.cuda._sleep(ORDERED_CYCLES)
            ready = torch.cuda.Event()
            ready.record()
            b.copy_(a, non_blocking=True)
            while not ready.query():
                pass
            t0 = time.perf_counter()
        cuda_sync(a.device, b.device)
        return time.perf_counter() - t0

    one(); limit()  # noqa: E702
    if raw is not None:
        raw.posted_first(dst, size, ORDERED_CYCLES)
    secs, lim, hidden, bare = [], [], [], []
    for _ in range(reps_for(size)):
        s_, h = one()
        secs.append(s_)
        hidden.append(h)
        cuda_sync()
        lim.append(limit())
        cuda_sync()
        if raw is not None:
            bare.append(raw.posted_first(dst, size, ORDERED_CYCLES))
            cuda_sync()
    out = {"ordered_gbps": round(size / statistics.median(secs) / 1e9, 3),
           "ordered_limit_gbps": round(size / statistics.median(lim) / 1e9, 3),
           "ordered_ratio": round(statistics.median(y / x for x, y in zip(secs, lim)), 3),
           "ordered_ratio_best": round(min(lim) / min(secs), 3),
           "ordered_host_hidden": round(sum(hidden) / len(hidden), 3)}
    if bare:
        out["raw_nccl_ordered_gbps"] = round(size / statistics.median(bare) / 1e9, 3)
        out["raw_nccl_ordered_ratio"] = round(statistics.median(y / x for x, y in zip(bare, lim)), 3)
    return out


def bench_medium(label, spec, sizes, tcp_source):
    name, options, src_dev, dst_dev, limit = spec
    top = max(sizes)
    # GPU-to-GPU media hold DEPTH regions of the largest payload, so that every size gets
    # sustained figures; host-staged ones one (their /dev/shm mirror and pinned limit buffers
    # would need DEPTH times as much host memory)
    span = DEPTH * top if limit in ("D2D copy", "peer copy") else top
    src = Source(name, options, src_dev, span)
    tx = create_transport(name, **options)
    # the destination is a decode engine's cache, in the memory its transport allocates (as the
    # engine's kv_allocator does in serving); pages faulted in, as a running worker's cache is
    dst = tx.register(tx.allocate((span,), torch.uint8, dst_dev).fill_(0))
    # how it launches: cuda_ipc's launcher, nccl's runtime ("cupy" or "torch")
    launcher = getattr(getattr(tx, "launcher", None), "name", None) or getattr(tx, "runtime", None)
    raw = None
    try:
        if name == "nccl" and launcher == "cupy":
            raw = RawNccl(src, dst.flat.device.index)
        tiny = src.call("describe", [0], 4096, False)
        t0 = time.perf_counter()
        tx.pull(tiny, dst, [0]).wait(600)
        first_ms = (time.perf_counter() - t0) * 1e3
        lat = []
        for _ in range(300):
            t0 = time.perf_counter()
            tx.pull(tiny, dst, [0]).wait(60)
            lat.append(time.perf_counter() - t0)
        fixed_us = statistics.median(lat[50:]) * 1e6
        # the largest pull once, as a decode worker makes it: before any raw copy between two
        # GPUs in this process (see gbps_before_raw_copies in the module doc)
        before_raw = {}
        if not PEER_COPY_MADE:
            ids = list(range(top // min(top, BLOCK)))
            desc = src.call("describe", ids, min(top, BLOCK), False)
            tx.pull(desc, dst, ids).wait(600)
            t0 = time.perf_counter()
            tx.pull(desc, dst, ids).wait(600)
            before_raw["gbps_before_raw_copies"] = round(top / (time.perf_counter() - t0) / 1e9, 3)
        rows = []
        for size in sizes:
            block = min(size, BLOCK)
            ids = list(range(size // block))
            desc = src.call("describe", ids, block, False)
            tx.pull(desc, dst, ids).wait(600)
            dst.flat[:size].zero_()
            tx.pull(desc, dst, ids).wait(600)
            if not torch.equal(dst.flat[:size].cpu(), pattern(size)):
                raise AssertionError(f"{label}: bytes differ after a {size}-byte pull")
            lim_fn, sync, cleanup = limit_op(limit, size, tcp_source)
            try:
                secs, lim = timed_pair(lambda: tx.pull(desc, dst, ids).wait(600), lim_fn, size, sync)
            finally:
                cleanup()
            gbps, limit_gbps = size / statistics.median(secs) / 1e9, size / statistics.median(lim) / 1e9
            best, limit_best = size / min(secs) / 1e9, size / min(lim) / 1e9
            # each transport run is paired with the limit run right after it: the median of the
            # pairs' ratios follows the machine's load as it changes
            ratio = statistics.median(b / a for a, b in zip(secs, lim))
            rows.append({"transport": label, "bytes": size, "gbps": round(gbps, 3),
                         "limit_gbps": round(limit_gbps, 3), "ratio": round(ratio, 3),
                         "fixed_us": round(fixed_us, 1), "limit": limit,
                         "first_contact_ms": round(first_ms, 2), "reps": len(secs),
                         "gbps_best": round(best, 3), "limit_gbps_best": round(limit_best, 3),
                         "ratio_best": round(best / limit_best, 3), "launcher": launcher,
                         **before_raw,
                         **sustained(tx, src, dst, size, block, limit, tcp_source)})
            r = rows[-1]
            if raw is not None:
                r.update(raw.row(dst, size, r))
            piped = f"  sustained x{DEPTH} {r['ratio_sustained']:5.2f}" if "ratio_sustained" in r else ""
            if "raw_nccl_ratio_sustained" in r:
                piped += f" (NCCL alone {r['raw_nccl_ratio_sustained']:4.2f})"
            if "raw_nccl_posted_first_ratio" in r:
                piped += f"  NCCL posted first {r['raw_nccl_posted_first_ratio']:4.2f}"
            print(f"{label:22s} {size / MiB:7.0f} MiB {r['gbps']:8.2f} GB/s  limit {r['limit_gbps']:8.2f} "
                  f"({limit})  ratio {r['ratio']:5.2f} (best {r['ratio_best']:4.2f}){piped}  fixed {fixed_us:7.1f} µs",
                  flush=True)
        if tx.supports_push:
            rows += push_rows(label, tx, src, dst, sizes, limit, tcp_source, raw)
        return rows
    finally:
        if raw is not None:
            raw.close()
        tx.close()
        src.close()


# --- report ------------------------------------------------------------------------------------
def tag(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + f"-x{torch.cuda.device_count()}"
    return f"cpu-{os.cpu_count()}core"


def plot(rows, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, label in enumerate(dict.fromkeys(r["transport"] for r in rows)):
        rs = [r for r in rows if r["transport"] == label]
        color = f"C{i}"
        ax.plot([r["bytes"] / MiB for r in rs], [r["gbps"] for r in rs], "o-", color=color, label=label)
        ax.plot([r["bytes"] / MiB for r in rs], [r["limit_gbps"] for r in rs], "--", color=color, alpha=0.5,
                label=f"limit: {rs[0]['limit']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("payload (MiB)")
    ax.set_ylabel("GB/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_sets(items: list[str]) -> dict[str, dict[str, int]]:
    """``["shm:piece_nbytes=16777216"]`` -> ``{"shm": {"piece_nbytes": 16777216}}``."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        m = re.fullmatch(r"(\w+):(\w+)=(\d+)", item)
        if m is None:
            raise SystemExit(f"--set {item!r}: expected TRANSPORT:OPTION=INT")
        out.setdefault(m[1], {})[m[2]] = int(m[3])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes-mib", default="1,4,16,64,256,1024")
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="TRANSPORT:OPTION=INT",
                    help="an option for every medium of that transport, e.g. shm:piece_nbytes=16777216 "
                         "(both sides; repeatable)")
    ap.add_argument("--suffix", default="", help="appended to the result's file name, e.g. --suffix=-pieces16")
    ap.add_argument("--min-reps", type=int, default=None,
                    help="timed runs per size at least (default: 25 with --device cuda, else 5); "
                         "smaller sizes get 512 MiB worth, up to 50")
    args = ap.parse_args()
    global MIN_REPS
    MIN_REPS = args.min_reps or (25 if args.device == "cuda" else 5)
    torch.manual_seed(0)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # NCCL bootstrap on loopback
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    media = dict(CPU_MEDIA if args.device == "cpu" else CUDA_MEDIA)
    if args.only:
        media = {k: v for k, v in media.items() if k in args.only.split(",")}
    overrides = parse_sets(args.set)
    media = {k: (v[0], {**v[1], **overrides.get(v[0], {})}, *v[2:]) for k, v in media.items()}
    skipped = {}
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        for k in [k for k, v in media.items() if "cuda:1" in v[3]]:
            skipped[k] = "needs 2 GPUs"
            del media[k]
    tcp_source = None
    if any(v[4] == "loopback TCP" for v in media.values()):
        tcp_source = Source("fake", {}, "cpu", max(sizes))
    rows = []
    try:
        for label, spec in media.items():
            try:
                rows += bench_medium(label, spec, sizes, tcp_source)
            except Exception as e:  # one medium failing (say, a small /dev/shm) must not hide the others
                print(f"{label}: FAILED {e!r}", flush=True)
                skipped[label] = f"failed: {e!r}"
    finally:
        if tcp_source is not None:
            tcp_source.close()
    hw = describe(args.device)
    out = {"benchmark": "transport_bw", "hardware": hw, "load_average": os.getloadavg()[0],
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "block_bytes": BLOCK, "min_reps": MIN_REPS, "timed": "pull + wait of contiguous blocks, until wait returns; describe not timed; raw "
           "copies until a sync of the devices they run on returns; "
           "gbps/limit_gbps: medians; ratio: median of paired runs (transport, then limit); "
           "*_best: fastest run of each; *_sustained: a stream of `pulls` pulls with `depth` in flight vs as "
           "many raw copies queued; raw_nccl_*: NCCL send/recv alone between the two processes, sender's "
           "GPU time around its sends; raw_nccl_posted_first_*: one NCCL message, its receive posted first, from the "
           "source's post to the bytes seen landed (host clock), vs the serial limit; '<medium> push' rows: expect "
           "(untimed), then push in the source, from its push call to wait returning here (host clock)",
           "options": overrides, "skipped": skipped, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"transport_{tag(args.device)}{args.suffix}.json"
    path.write_text(json.dumps(out, indent=1))
    plot(rows, path.with_suffix(".png"), f"KV transports vs link limit — {hw}")
    print(f"\n{'transport':22s} {'MiB':>7s} {'GB/s':>8s} {'limit':>8s} {'ratio':>6s} {'best':>6s} "
          f"{'x' + str(DEPTH):>6s} {'fixed µs':>9s} {'1st ms':>8s}  (medians; best = fastest run of each; "
          f"x{DEPTH} = ratio of {PULLS} pulls streamed with {DEPTH} in flight)")
    for r in rows:
        piped = f"{r['ratio_sustained']:6.2f}" if "ratio_sustained" in r else f"{'-':>6s}"
        print(f"{r['transport']:22s} {r['bytes'] / MiB:7.0f} {r['gbps']:8.2f} {r['limit_gbps']:8.2f} "
              f"{r['ratio']:6.2f} {r['ratio_best']:6.2f} {piped} {r['fixed_us']:9.1f} {r.get('first_contact_ms', float('nan')):8.1f}")
    for k, why in skipped.items():
        print(f"{k}: skipped ({why})")
    print(f"wrote {path} (+ .png); load average {out['load_average']:.1f}")


if __name__ == "__main__":
    main()
