"""Point-to-point over torch.distributed: NCCL for CUDA buffers, gloo for CPU buffers (CI).

There is no global world: workers join at any time. Every NcclTransport hosts

    a control server   TCP on ``host`` (127.0.0.1 by default), msgpack messages, one handler
                       thread per connected destination (the "serving thread" of the source)
    a TCPStore         rendezvous for the pair groups in which it is the source

A destination's first pull from a source connects to its control server, says hello, and both
sides build a 2-rank process group over ``PrefixStore("<dst agent>/<epoch>", source's store)``
(rank 0 = source, rank 1 = destination). One group per (source, destination) pair, kept until
close or until the pair breaks (then the next pull makes a new epoch).

A pull, driven by the destination's link thread (one per source; its pulls run in order, which
NCCL needs: p2p ops of a pair must match in order)::

    for each window of pieces (<= window_nbytes):       two windows in flight at most
        destination  → {"op": "send", "tag", "buffer", "pieces": [[offset, nbytes], ...]}
        destination  post recv(piece, tag) for every piece (in this order: NCCL builds the
                     pair's communicator inside the first op, which needs the source there too)
        source       check buffer and ranges → post send(piece, tag) for each
                     (or ← {"op": "error"}: the pair is torn down, the transfer FAILED)
    every recv completed → checksums → DONE

The source sends nothing unrequested, so abort just stops posting windows and drains the ones in
flight. A broken control connection (EOF: the peer died or closed) fails the pair's transfers at
once and aborts its process group; a peer that stops answering is cut off when ``abort`` (or a
``wait`` timeout) finds the drain too slow.
"""
from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from lmdisagg.transports._blocks import byte_runs, split_runs, windows
from lmdisagg.transports._wire import Channel, ChannelClosed
from lmdisagg.transports.base import (
    Buffer, ChunkDesc, PeerLostError, Transfer, TransferCorruptError, TransferError, Transport,
    failed_transfer,
)

log = logging.getLogger(__name__)
_epochs = itertools.count()


def make_pair_group(backend: str, store, rank: int, tx: "NcclTransport"):
    """A 2-rank process group on ``store``; blocks until both ranks joined (gloo) or
    ``connect_timeout_s``. Ops time out after ``op_timeout_s``."""
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=tx.host)]
        opts._timeout = timedelta(seconds=tx.connect_timeout_s)
        pg = dist.ProcessGroupGloo(store, rank, 2, opts)
        pg._set_default_timeout(timedelta(seconds=tx.op_timeout_s))
        return pg
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timedelta(seconds=tx.op_timeout_s)
    return dist.ProcessGroupNCCL(store, rank, 2, opts)  # the NCCL communicator is made lazily


def _close_listener(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
    except OSError:
        pass
    sock.close()


def _teardown(pg) -> None:
    if pg is None:
        return
    try:
        pg.abort()  # pending ops fail; NCCL kernels are stopped
    except Exception as e:  # already broken: nothing more to release
        log.debug("process group abort: %r", e)


class NcclTransfer(Transfer):
    link: "_Link"

    def __init__(self, *args):
        super().__init__(*args)
        self._quiet = True  # nothing posted yet

    def _begin_io(self) -> bool:
        """About to post recvs into dst: False if aborting (then post nothing)."""
        with self._cond:
            if self._aborting:
                return False
            self._quiet = False
            return True

    def _cancel(self) -> bool:
        """Drain the windows in flight; if the peer is too slow, cut the pair (its serving
        thread then drops the group, so nothing more lands)."""
        with self._cond:
            if self._cond.wait_for(lambda: self._quiet, self.drain_timeout_s):
                return True
        self.link.cut(PeerLostError(f"peer {self.desc.buffer.agent} did not finish a window in "
                                    f"{self.drain_timeout_s}s; pair torn down"))
        return True


class _Link:
    """Destination side of one (source, destination) pair. Its worker thread runs the pulls in
    order; its reader thread watches the control connection, so a lost peer fails the pulls at
    once (gloo itself may only notice when a receive times out, NCCL never does)."""

    def __init__(self, tx: "NcclTransport", source_agent: str, address: str):
        self.tx = tx
        self.source = source_agent
        host, ctl, store = address.rsplit(":", 2)
        self.host, self.ctl_port, self.store_port = host, int(ctl), int(store)
        self.ch: Channel | None = None
        self.pg = None
        self.broken: TransferError | None = None  # set once; the next pull makes a new link
        self.tag = 0
        self._cv = threading.Condition()
        self._jobs: deque[NcclTransfer] = deque()
        self._current: NcclTransfer | None = None
        self._stopping = False
        self._remote_error: str | None = None
        self.threads = [threading.Thread(target=self._run, name=f"lmdisagg-nccl-link-{source_agent}", daemon=True)]
        self.threads[0].start()

    # --- called by the transport ---------------------------------------------------------------
    def submit(self, x: NcclTransfer) -> None:
        with self._cv:
            if self.broken is None:
                self._jobs.append(x)
                self._cv.notify_all()
                return
        x._fail(self.broken)
        x._quiesce()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()

    def cut(self, err: TransferError) -> None:
        """Break the pair from any thread: queued and running pulls FAIL now (nothing more can
        land: the source drops the group when its control connection closes)."""
        with self._cv:
            if self.broken is None:
                self.broken = err
            victims = list(self._jobs) + ([self._current] if self._current else [])
            self._jobs.clear()
            self._cv.notify_all()
        if self.ch is not None:
            self.ch.close()
        _teardown(self.pg)
        for x in victims:
            x._fail(self.broken)
            x._quiesce()

    # --- worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if not self._jobs:
                    break
                x = self._current = self._jobs.popleft()
            self._pull(x)
            with self._cv:
                self._current = None
        if self.ch is not None:
            self.ch.close()
        _teardown(self.pg)
        self.pg = None  # frees the group's gloo device / NCCL communicator

    def _connect(self) -> None:
        tx = self.tx
        self.ch = Channel.connect(self.host, self.ctl_port, tx.connect_timeout_s)
        epoch = next(_epochs)
        self.ch.send({"op": "hello", "agent": tx.agent, "epoch": epoch, "backend": tx.backend})
        store = dist.TCPStore(self.host, self.store_port, is_master=False,
                              timeout=timedelta(seconds=tx.connect_timeout_s))
        self.pg = make_pair_group(tx.backend, dist.PrefixStore(f"{tx.agent}/{epoch}", store), 1, tx)
        reader = threading.Thread(target=self._read, name=f"lmdisagg-nccl-read-{self.source}", daemon=True)
        self.threads.append(reader)
        reader.start()

    def _pull(self, x: NcclTransfer) -> None:
        err = None
        try:
            if x.aborting or self.broken is not None:
                return
            if self.pg is None:
                if x.dst.flat.device.type == "cuda":
                    torch.cuda.set_device(x.dst.flat.device)
                self._connect()
            x._start()
            runs = byte_runs(x.desc.block_ids, x.dst_blocks, x.desc.block_nbytes)
            wins = list(windows(list(split_runs(runs, self.tx.window_nbytes)), self.tx.window_nbytes))
            inflight: deque = deque()
            i = 0
            while i < len(wins) or inflight:
                while i < len(wins) and len(inflight) < 2 and self.broken is None and x._begin_io():
                    inflight.append(self._post(x, wins[i]))
                    i += 1
                if x.aborting or self.broken is not None:
                    i = len(wins)  # post nothing more; drain what is in flight
                if inflight:
                    works, nbytes = inflight.popleft()
                    self._wait(works)
                    x.bytes_done += nbytes
        except (ChannelClosed, OSError, RuntimeError) as e:
            if len(self.threads) > 1:  # let the reader report the source's own reason first
                self.threads[1].join(0.5)
            err = self.broken or PeerLostError(f"nccl pull from {self.source} failed: {e}")
            self.cut(err)
        finally:
            if self.broken is not None:
                x._fail(self.broken)
            elif err is None and not x.aborting:
                x._landed()
            x._quiesce()

    def _post(self, x: NcclTransfer, win):
        tag = self.tag
        self.tag = (self.tag + len(win)) % (1 << 30)
        # ask first, then post the recvs: NCCL builds the pair's communicator inside the first
        # recv, which blocks until the source (prompted by this message) publishes its unique id
        self.ch.send({"op": "send", "tag": tag, "buffer": x.desc.buffer.buffer_id,
                      "pieces": [[s, n] for s, _, n in win]})
        works = [self.pg.recv([x.dst.flat[d:d + n]], 0, tag + j) for j, (_, d, n) in enumerate(win)]
        return works, sum(n for *_, n in win)

    def _wait(self, works) -> None:
        if self.tx.backend == "gloo":
            # gloo completes p2p works only inside wait() (and a wait timeout breaks the pair):
            # block; data, a pair error, or op_timeout_s ends it, and cut() fails the transfer
            # meanwhile if the peer is lost
            for w in works:
                w.wait()
            return
        # NCCL: poll the works' CUDA events, closely for 2 ms (a window takes ~0.2 ms on NVLink),
        # then backing off; the reader's cut() wakes us when the pair breaks
        spin_until, delay = time.monotonic() + 2e-3, 5e-5
        while not all(w.is_completed() for w in works):
            if self.broken is not None:
                raise self.broken
            if time.monotonic() < spin_until:
                time.sleep(0)  # yield the GIL to the process's other threads
                continue
            with self._cv:
                if self.broken is None:
                    self._cv.wait(delay)
            delay = min(2 * delay, 1e-3)
        for w in works:
            w.wait()

    # --- reader thread -------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                msg = self.ch.recv()
                if msg.get("op") == "error":  # the source tears the pair down right after
                    self._remote_error = msg
        except ChannelClosed as e:
            with self._cv:
                stopping = self._stopping and not self._jobs and self._current is None
            if stopping:
                return
            err = self._remote_error
            if err is None:
                self.cut(PeerLostError(f"nccl pair with {self.source} lost: the source died or closed ({e})"))
            else:
                cls = TransferCorruptError if err.get("kind") == "range" else TransferError
                self.cut(cls(f"nccl pull from {self.source} refused: {err['msg']}"))


class _Peer:
    """Source side of one pair: the serving thread answering one destination's requests."""

    def __init__(self, tx: "NcclTransport", sock: socket.socket):
        self.tx = tx
        self.ch = Channel(sock)
        self.pg = None
        self.sends: deque = deque()
        self.thread = threading.Thread(target=self._run, name="lmdisagg-nccl-serve", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        tx = self.tx
        try:
            hello = self.ch.recv(timeout=tx.connect_timeout_s)
            if not hello or hello.get("op") != "hello":
                return
            if hello["backend"] != tx.backend:
                self.ch.send({"op": "error", "tag": -1, "msg": f"backend {hello['backend']} != {tx.backend}"})
                return
            if tx.device is not None:
                torch.cuda.set_device(tx.device)
            self.pg = make_pair_group(tx.backend, dist.PrefixStore(f"{hello['agent']}/{hello['epoch']}", tx._store),
                                      0, tx)
            while True:
                msg = self.ch.recv()
                if msg.get("op") == "send":
                    self._serve(msg)
                while len(self.sends) > 2:  # keep two windows posted; reap older ones (gloo
                    for w in self.sends.popleft():  # completes works only in wait())
                        w.wait()  # raises if a send failed: the pair is done
        except (ChannelClosed, OSError, RuntimeError) as e:
            log.debug("nccl serving thread for %s ends: %r", self.tx.agent, e)
        finally:
            self.ch.close()
            _teardown(self.pg)
            self.sends.clear()
            self.pg = None  # gloo closes the pair's sockets when the group is freed

    def _serve(self, msg) -> None:
        buf = self.tx._buffers.get(msg["buffer"])
        bad = kind = None
        if buf is None:
            bad, kind = f"buffer {msg['buffer']} is not registered on {self.tx.agent}", "gone"
        elif any(off < 0 or off + n > buf.desc.nbytes for off, n in msg["pieces"]):
            bad, kind = (f"requested bytes lie outside buffer {msg['buffer']} ({buf.desc.nbytes} bytes) "
                         f"of {self.tx.agent}: truncated descriptor"), "range"
        if bad is not None:  # reply, then tear the pair down: the peer's posted recvs must fail
            self.ch.send({"op": "error", "kind": kind, "tag": msg["tag"], "msg": bad})
            raise ChannelClosed(bad)
        self.sends.append([self.pg.send([buf.flat[off:off + n]], 1, msg["tag"] + j)
                           for j, (off, n) in enumerate(msg["pieces"])])


class NcclTransport(Transport):
    name = "nccl"

    def __init__(self, *, backend: str = "auto", host: str = "127.0.0.1", checksum: bool = False,
                 drain_timeout_s: float = 10.0, window_nbytes: int | None = None,
                 connect_timeout_s: float = 30.0, op_timeout_s: float = 30.0, device: int | None = None):
        """``backend``: "nccl" (CUDA buffers), "gloo" (CPU buffers) or "auto" (nccl when CUDA is
        available). ``host``: the address this worker serves on (loopback on one node).
        ``op_timeout_s`` bounds one window's send/recv (a gloo receive from a dead peer ends only
        then, though its transfer FAILS at once); ``device``: CUDA device of the serving threads.
        ``window_nbytes``: bytes per request window (two in flight; abort stops between windows),
        default 256 MiB on NCCL (each window costs a control round trip, ~0.1 ms) and 64 MiB on
        gloo."""
        super().__init__(checksum=checksum, drain_timeout_s=drain_timeout_s)
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend not in ("nccl", "gloo"):
            raise TransferError(f"nccl transport: backend must be 'nccl' or 'gloo', not {backend!r}")
        self.backend, self.host, self.device = backend, host, device
        self.window_nbytes = window_nbytes or ((256 if backend == "nccl" else 64) << 20)
        self.connect_timeout_s = connect_timeout_s
        self.op_timeout_s = op_timeout_s
        self._store_sock = socket.create_server((host, 0))
        self._store = dist.TCPStore(host, self._store_sock.getsockname()[1], is_master=True,
                                    master_listen_fd=self._store_sock.fileno(), wait_for_workers=False,
                                    timeout=timedelta(seconds=connect_timeout_s), use_libuv=True)
        self._server = socket.create_server((host, 0))
        self.address = f"{host}:{self._server.getsockname()[1]}:{self._store_sock.getsockname()[1]}"
        self._links: dict[str, _Link] = {}
        self._dead_links: list[_Link] = []  # broken links whose threads may still be unwinding
        self._peers: list[_Peer] = []
        self._accepter = threading.Thread(target=self._accept, name="lmdisagg-nccl-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:  # closed
                return
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._peers = [p for p in self._peers if p.thread.is_alive()]
                self._peers.append(_Peer(self, sock))

    def _register(self, buf: Buffer, buffer_id: int) -> tuple[str, bytes]:
        want = "cuda" if self.backend == "nccl" else "cpu"
        if buf.flat.device.type != want:
            raise TransferError(f"nccl transport with backend {self.backend} moves {want} buffers, "
                                f"not {buf.flat.device.type}")
        return self.address, b""

    def _prepare(self, buf: Buffer, block_ids, block_nbytes) -> None:
        if buf.flat.device.type == "cuda":
            torch.cuda.synchronize(buf.flat.device)  # the engine's writes land before a peer reads

    def _pull(self, desc: ChunkDesc, dst: Buffer, dst_blocks: tuple[int, ...]) -> Transfer:
        b = desc.buffer
        if not self.peer_alive(b.host, b.pid, b.pid_start):
            return failed_transfer(desc, dst, dst_blocks, PeerLostError(f"source process {b.pid} ({b.agent}) is gone"))
        with self._lock:
            link = self._links.get(b.agent)
            if link is None or link.broken is not None:
                if link is not None:
                    link.stop()
                    self._dead_links.append(link)
                link = self._links[b.agent] = _Link(self, b.agent, b.address)
        x = NcclTransfer(desc, dst, dst_blocks, self.peer_alive)
        x.link = link
        link.submit(x)
        return x

    def _close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()) + self._dead_links, {}
            peers, self._peers = list(self._peers), []
        _close_listener(self._server)
        for link in links:
            link.stop()
            if link.ch is not None:
                link.ch.close()
        for p in peers:
            p.ch.close()
        self._accepter.join(10)
        # a gloo receive whose peer died returns only after op_timeout_s
        for t in [t for link in links for t in link.threads] + [p.thread for p in peers]:
            t.join(self.op_timeout_s + 10)
        del self._store  # stops the store's server thread
        self._store_sock.detach()  # the store owned (and closed) the listening socket
