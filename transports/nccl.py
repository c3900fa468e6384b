"""Point-to-point over NCCL for CUDA buffers, gloo for CPU buffers (CI); one code path.

There is no global world: workers join at any time. Every NcclTransport hosts a control server
(TCP on ``host``, 127.0.0.1 by default, msgpack messages, one serving thread per connected
destination; destinations on the same host connect to its Unix socket instead, which carries
each window's request at a fraction of loopback TCP's cost) and a TCPStore for the torch pair
groups in which it is the source.

A destination's first pull from a source connects to its control server, says hello (naming its
backend, runtime and GPU), and once the source accepts, both sides build the pair's data plane
(rank 0 = source, rank 1 = destination), kept until close or until the pair breaks (then the
next pull makes a new epoch). The source refuses a destination that runs another backend or
runtime, or uses the same GPU (NCCL cannot make a communicator of two ranks on one device:
workers that share a GPU move KV with cuda_ipc); that pull FAILS at once, saying why.

    cupy    NCCL through cupy's bindings (``runtime="auto"`` with cupy installed, or "cupy"): the
            source sends an NCCL unique id on the control connection, both sides make a 2-rank
            communicator; ncclSend / ncclRecv on a side stream, a CUDA event per window. A few
            µs per window on each side.
    torch   a 2-rank torch.distributed group over ``PrefixStore("<dst agent>/<epoch>", source's
            store)``: gloo for CPU buffers; NCCL without cupy (or ``runtime="torch"``), whose
            per-op Python and bookkeeping cost ~60-90 µs per window on each side (runtime
            "auto" logs a warning when it falls back to this for want of cupy).

A cupy pair runs *registered* when both ends say, as it forms, that every buffer they have
registered is NCCL memory from ``allocate`` (``register_memory``, ``_nccl_mem.py``): each end
registers what it posts from with the pair's communicator on first use, and NCCL writes straight
into the destination's blocks (staging copies and filler come from a registered pool). Else the
pair is staged through NCCL's own buffers, as NCCL requires both ends of an op to agree.

A pull is cut into windows (<= ``window_nbytes``). For each window, in one order per pair (NCCL
p2p ops of a pair must match in order)::

    destination  → {"op": "send", "tag", "buffer", "pieces": [[offset, nbytes], ...]}
    destination  post recv(piece) for every piece
    source       check buffer and ranges → post send(piece) for each
                 (or ← {"op": "error"}: the pair is torn down, the transfer FAILED)

On CUDA a window's receives land after the work queued on the stream that was current when
the pull was made (whichever thread posts it). Up to ``windows_in_flight`` windows of a pair are
posted at once, across pulls: the next pull's windows go out while earlier ones move. A pull
made while its pair is idle posts its first windows in the caller's thread (no hand-off), the
pair's link thread the rest as room frees up. Windows are reaped in order, and the last one of a
pull finishes it (checksums → DONE; its completed receives prove the source lived until the
bytes left, so no liveness read): on NCCL by the threads that poll or wait on pulls
(again no hand-off; the link thread looks every 0.2-1 ms as a backstop), on gloo by the link
thread, whose waits block.

Push (``expect`` / ``push``) runs over a second pair of its own (its own control connection and
communicator, so pulls never queue behind an expectation), warmed up with one 1-byte message
asked for first (a receive posted before a fresh communicator's first send hung that send):

    destination  expect: number it (seq), post its receives now, one per run of its blocks;
                 its ticket carries seq, the piece sizes and the pair's epoch
    source       push(ticket): in seq order (a push before its turn waits for the earlier
                 ones), post the sends (read after the caller's queued GPU work), then
                 → {"op": "pushed", "seq", "ok": true, "sums"}
    destination  the receives done and the "pushed" message read: DONE (sums checked)
    abort        destination → {"op": "cancel", "seq", "sizes", "tag"}: the source sends filler
                 in its place (+ "ok": false) unless already pushed; the destination drains it.
                 A push aborted on the source before its turn: filler + "ok": false, so the
                 destination FAILS it

The source sends nothing unrequested on a pull pair, so abort just stops posting windows and
drains the ones in flight. A broken control connection (EOF: the peer died or closed) fails the
pair's transfers at once and aborts its data plane; a peer that stops answering is cut off when
``abort`` (or a ``wait`` timeout) finds the drain too slow.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from lmdisagg.transports._blocks import byte_runs, split_runs, windows
from lmdisagg.transports._proc import HOSTNAME
from lmdisagg.transports._wire import Channel, ChannelClosed, local_listener, local_name
from lmdisagg.transports.base import (
    Buffer, BufferDesc, ChunkDesc, PeerLostError, PushTicket, Transfer, TransferAbortedError,
    TransferCorruptError, TransferError, TransferState, Transport, failed_transfer, warn_torch_path,
)

log = logging.getLogger(__name__)
_epochs = itertools.count()
_FAILURES = (ChannelClosed, OSError, RuntimeError)  # socket, torch.distributed, NCCL / CUDA errors


NCCL_MEMORY = b"nccl-mem"  # a BufferDesc handle: the buffer is NCCL memory from allocate


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


def gpu_uuid(device: int | None) -> str | None:
    """The GPU's UUID (one GPU is one UUID in every process), None for CPU buffers."""
    return None if device is None else str(torch.cuda.get_device_properties(device).uuid)


def cupy_nccl():
    """(cupy's NCCL bindings, "") if they load here, else (None, why not)."""
    try:
        from cupy.cuda import nccl
    except (ImportError, OSError) as e:
        return None, f"cupy's NCCL does not load ({type(e).__name__}: {e})"
    if not getattr(nccl, "available", True):
        return None, "cupy is built without NCCL"
    return nccl, ""


def _close_listener(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
    except OSError:
        pass
    sock.close()


def _wait_work(work, plane, timeout: float, what: str) -> None:
    """Wait for one posted op (a pair's warm-up), at most ``timeout`` on NCCL."""
    if plane.pollable:
        deadline = time.monotonic() + timeout
        while not work.done():
            if time.monotonic() > deadline:
                raise PeerLostError(f"{what} did not complete within {timeout}s")
            time.sleep(1e-4)
    work.wait()


def _teardown(pg) -> None:
    if pg is None:
        return
    try:
        pg.abort()  # pending ops fail; NCCL kernels are stopped
    except Exception as e:  # already broken: nothing more to release
        log.debug("process group abort: %r", e)


# --- data planes: post one window's sends or recvs, tell when they completed -------------------
class _Works:
    """One window's torch p2p works."""

    def __init__(self, works):
        self.works = works

    def done(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> None:
        for w in self.works:
            w.wait()  # gloo: blocks until the data moved (or op_timeout_s); NCCL: orders streams


class _TorchPlane:
    """A 2-rank torch.distributed group: gloo (CPU buffers), or NCCL without cupy."""

    registered = False

    def __init__(self, pg, peer: int, backend: str):
        self.pg, self.peer = pg, peer
        self.pollable = backend == "nccl"  # gloo completes p2p works only inside wait()

    def post(self, base: torch.Tensor, pieces, tag: int, send: bool, after=None) -> _Works:
        op = self.pg.send if send else self.pg.recv
        with torch.cuda.stream(after) if after is not None else contextlib.nullcontext():  # NCCL orders after it
            return _Works([op([base[o:o + n]], self.peer, tag + j) for j, (o, n) in enumerate(pieces)])

    def abort(self) -> None:
        _teardown(self.pg)

    close = abort


class _Event:
    """One window on a cupy plane: a CUDA event recorded after its NCCL calls."""

    def __init__(self, rt, ev: int):
        self.rt, self.ev = rt, ev
        self.ok = False  # seen complete: nothing left to query or wait for

    def done(self) -> bool:
        if not self.ok:
            self.ok = self.rt.eventQuery(self.ev) == 0
        return self.ok

    def wait(self) -> None:
        if not self.ok:  # a sync of a completed event still costs a driver call (~4 µs on 2xH200)
            self.rt.eventSynchronize(self.ev)
            self.ok = True

    def __del__(self):
        try:
            self.rt.eventDestroy(self.ev)  # legal while pending: freed once it completes
        except Exception:  # interpreter shutdown
            pass


class _CupyPlane:
    """NCCL through cupy's bindings: ncclSend / ncclRecv of a window's pieces (one NCCL group)
    on a side stream of the pair's device, a few µs per window."""

    pollable = True

    def __init__(self, nccl, uid, rank: int, device: int, mem=None):
        """``mem`` (an ``NcclMemory``): the pair runs registered (both ends agreed): whatever
        is posted on it must be that memory, registered with the communicator on first use."""
        from cupy.cuda import runtime as rt
        self.nccl, self.rt, self.peer, self.device = nccl, rt, 1 - rank, device
        self.mem = self.regs = None
        self._lock = threading.Lock()
        self._calls = threading.Lock()  # registered pairs: posts and deregistration never overlap
        prev = rt.getDevice()
        rt.setDevice(device)
        try:
            # the id is bytes in newer cupy, a tuple of 128 ints in older ones (a list after msgpack)
            uid = uid if isinstance(uid, bytes) else tuple(uid)
            self.comm = nccl.NcclCommunicator(2, uid, rank)  # returns once both ranks joined
            self.stream = rt.streamCreateWithFlags(rt.streamNonBlocking)
            self.after = rt.eventCreateWithFlags(rt.eventDisableTiming)
            if mem is not None:
                from lmdisagg.transports._nccl_mem import Registrations
                self.mem, self.regs = mem, Registrations(mem.lib, self.comm, rank)
        finally:
            rt.setDevice(prev)

    @property
    def registered(self) -> bool:
        return self.regs is not None

    def post(self, base: torch.Tensor, pieces, tag: int, send: bool, after=None) -> _Event:
        """``after``: receives land after the work queued on this torch stream (default: the
        posting thread's current stream); sends read after it only if it is given."""
        with self._calls:
            return self._post(base, pieces, tag, send, after)

    def _post(self, base: torch.Tensor, pieces, tag: int, send: bool, after) -> _Event:
        rt, nccl, comm = self.rt, self.nccl, self.comm
        if comm is None:
            raise RuntimeError("the pair's NCCL communicator was aborted")
        prev = rt.getDevice()
        if prev != self.device:
            rt.setDevice(self.device)
        try:
            if self.regs is not None:  # both ends of every op registered, or the pair hangs
                seg = self.mem.segment_of(base)
                if seg is None:
                    raise TransferError("this nccl pair moves registered memory (from the transport's allocate) "
                                        "only; register every buffer before the first transfer, or pass "
                                        "register_memory=False")
                self.regs.ensure(seg)
            if not send or after is not None:  # land after (pushes: read after) the caller's queued work
                rt.eventRecord(self.after, after if after is not None
                               else torch._C._cuda_getCurrentRawStream(self.device))
                rt.streamWaitEvent(self.stream, self.after, 0)
            op, ptr = (comm.send if send else comm.recv), base.data_ptr()
            nccl.groupStart()
            try:
                for o, n in pieces:
                    op(ptr + o, n, nccl.NCCL_UINT8, self.peer, self.stream)
            finally:
                nccl.groupEnd()
            ev = rt.eventCreateWithFlags(rt.eventDisableTiming)
            rt.eventRecord(ev, self.stream)
            return _Event(rt, ev)
        finally:
            if prev != self.device:
                rt.setDevice(prev)

    def abort(self) -> None:
        """Stop the pair's NCCL kernels now (from any thread; once). A registered pair first
        gives its registrations back (ncclCommDeregister): an abort that still holds some
        tears them down after its proxy is gone, and segfaulted so on 2xH200 (NCCL 2.28.9)."""
        with self._lock:
            comm, self.comm = self.comm, None
        if comm is None:
            return
        if self.regs is not None and self._calls.acquire(timeout=1.0):  # else a post is stuck in NCCL
            try:
                self.regs.release()
            finally:
                self._calls.release()
        try:
            comm.abort()
        except Exception as e:
            log.debug("nccl comm abort: %r", e)

    def close(self) -> None:
        self.abort()
        try:
            self.rt.streamDestroy(self.stream)
            self.rt.eventDestroy(self.after)
        except Exception as e:
            log.debug("nccl plane close: %r", e)


# --- destination side --------------------------------------------------------------------------
class NcclTransfer(Transfer):
    # a receive that completed on a pair that was not cut holds every byte the source sent: a
    # lost source leaves it pending (NCCL) or failing (gloo) until the pair is cut, and windows
    # of a cut pair are never finished
    landing_proves_source = True
    link: "_Link"
    windows: deque  # windows not posted yet: lists of (source offset, destination offset, nbytes)
    after = None    # CUDA: the caller's current stream at pull (windows land after its queued work)

    def __init__(self, *args):
        super().__init__(*args)
        self._quiet = True  # no window in flight
        self._posted = 0    # windows in flight

    def _begin_io(self) -> bool:
        """About to post a window into dst: False if aborting (then post nothing)."""
        with self._mu:
            if self._aborting:
                return False
            self._quiet = False
            self._posted += 1
            return True

    def _progress(self) -> None:
        self.link.advance()  # NCCL: the waiting thread reaps its own windows

    def _window_done(self, last: bool = False) -> None:
        """A window's receives completed; ``last``: every byte is in (then the end checks, and
        DONE with the same wake-up, unless aborting or failed meanwhile)."""
        landed = last and not self._aborting and self._verify()
        with self._mu:
            self._posted -= 1
            if landed and not self._state.terminal:
                self.bytes_done = self.nbytes
                self._state = TransferState.DONE
            if self._posted == 0:
                self._quiet = True
            if landed or self._quiet:
                self._cond.notify_all()

    def _cancel(self) -> bool:
        """Drain the windows in flight; if the peer is too slow, cut the pair (its serving
        thread then drops the data plane, so nothing more lands)."""
        with self._mu:
            if self._cond.wait_for(lambda: self._quiet, self.drain_timeout_s):
                return True
        self.link.cut(PeerLostError(f"peer {self.desc.buffer.agent} did not finish a window in "
                                    f"{self.drain_timeout_s}s; pair torn down"))
        return True


class NcclExpect(NcclTransfer):
    """Destination side of a push: its receives are posted at ``expect`` (or as soon as the pair
    is up), before the source has the bytes. It counts as in flight from the start, so an abort
    always waits until those receives have been matched and drained."""

    seq = 0
    ticket: PushTicket | None = None

    def __init__(self, *args):
        super().__init__(*args)
        self._quiet, self._posted = False, 1

    def _cancel(self) -> bool:
        self.link.cancel(self)  # the source sends filler into what it has not pushed
        return super()._cancel()


class _Window:
    __slots__ = ("x", "work", "nbytes", "last")

    def __init__(self, x: NcclTransfer, work, nbytes: int, last: bool):
        self.x, self.work, self.nbytes, self.last = x, work, nbytes, last


class _Link:
    """Destination side of one (source, destination) pair. Windows are posted under one lock, in
    one order (by the pulling thread while the pair is idle, else by the link thread); the link
    thread reaps them in that order. Its reader thread watches the control connection, so a lost
    peer fails the pulls at once (gloo itself may only notice when a receive times out, NCCL
    never does)."""

    def __init__(self, tx: "NcclTransport", source_agent: str, address: str, kind: str = "pull",
                 same_host: bool = False):
        """``same_host``: the source runs on this host (the control connection then goes over
        its Unix socket, if it has one: the address names it)."""
        self.tx = tx
        self.source = source_agent
        self.kind = kind  # "pull" (the destination asks per window) or "push" (its own pair)
        self.epoch = next(_epochs)
        host, ctl, store, token = address.rsplit(":", 3)
        self.host, self.ctl_port, self.store_port = host, int(ctl), int(store)
        self.local = local_name(token) if same_host and token else None
        self.ch: Channel | None = None
        self.plane = None
        self.ready = False  # connected and a window came through: pulls may post inline
        self.broken: TransferError | None = None  # set once; the next pull makes a new link
        self.tag = 1 if kind == "push" else 0  # push: tag 0 is the pair's warm-up message
        self.seq = 0  # push: the next expectation's number
        self._headers: dict[int, dict] = {}  # push: seq -> the source's "pushed" message
        self._cancels: list[dict] = []  # push: cancels made before the pair was up
        self._up = False  # push: connected and warmed up (cancels may be sent)
        self._mu = threading.RLock()  # plain critical sections; waits and wake-ups through _cv
        self._cv = threading.Condition(self._mu)
        self._post_lock = threading.Lock()  # a window's request and its recvs, in pair order
        self._reap_lock = threading.Lock()  # windows finish in the order they were posted
        self._jobs: deque[NcclTransfer] = deque()     # pulls with windows not posted yet
        self._inflight: deque[_Window] = deque()      # posted windows, oldest first
        self._stopping = False
        self._idle = False  # the link thread sleeps until notified (nothing queued or in flight)
        self._remote_error: str | None = None
        self.threads = [threading.Thread(target=self._run, name=f"lmdisagg-nccl-link-{source_agent}", daemon=True)]
        self.threads[0].start()

    # --- called by the transport ---------------------------------------------------------------
    def submit(self, x: NcclTransfer) -> None:
        w = self.tx.window_nbytes
        x.windows = deque(windows(list(split_runs(byte_runs(x.desc.block_ids, x.dst_blocks, x.desc.block_nbytes), w)), w))
        with self._mu:
            err = self.broken
            if err is None and (not self.ready or self._jobs):  # the link thread posts it
                self._jobs.append(x)
                self._cv.notify_all()
                return
        if err is None:
            try:
                with self._post_lock:
                    self._post_from(x)
            except _FAILURES as e:
                self.cut(PeerLostError(f"nccl pull from {self.source} failed: {e}"))
                err = self.broken
            except Exception as e:  # never leave a pull that nobody drives
                log.exception("nccl pull from %s failed", self.source)
                self.cut(TransferError(f"nccl pull from {self.source} failed: {e!r}"))
                err = self.broken
            else:
                with self._mu:
                    if x.windows:  # no room for all of it: the link thread posts the rest first
                        self._jobs.appendleft(x)
                    if x.windows or self._idle:  # else the link thread is already looking
                        self._cv.notify_all()
                return
        x._fail(err)
        x._quiesce()

    def submit_expect(self, x: NcclExpect, block_nbytes: int, checksum: bool) -> None:
        """Number x, make its ticket and post its receives (inline if the pair is up and idle,
        else by the link thread), all under the posting lock: receives are posted in seq order,
        the order the source pushes in."""
        sizes = tuple(n for *_, n in x.windows[0])
        err = None
        with self._post_lock:
            with self._mu:
                err = self.broken
                if err is None:
                    x.seq, x.tag = self.seq, self.tag
                    self.seq += 1
                    self.tag = (self.tag + len(sizes)) % (1 << 30) or 1
                    x.ticket = PushTicket(self.source, self.tx.agent, self.epoch, x.seq, x.tag, block_nbytes,
                                          sizes, checksum)
                    inline = self.ready and not self._jobs
                    if not inline:
                        self._jobs.append(x)
                        self._cv.notify_all()
            if err is None and inline:
                try:
                    self._post_from(x)
                except _FAILURES as e:
                    self.cut(PeerLostError(f"nccl expect from {self.source} failed: {e}"))
                except Exception as e:
                    log.exception("nccl expect from %s failed", self.source)
                    self.cut(TransferError(f"nccl expect from {self.source} failed: {e!r}"))
                else:
                    with self._mu:
                        if self._idle:
                            self._cv.notify_all()
                return
        if err is not None:
            x._fail(err)
            x._quiesce()

    def cancel(self, x: NcclExpect) -> None:
        """x is being aborted: ask the source to send filler in place of what it has not pushed."""
        msg = {"op": "cancel", "seq": x.seq, "tag": x.tag, "sizes": list(x.ticket.sizes)}
        with self._mu:
            if self.broken is not None:
                return
            if not self._up:
                self._cancels.append(msg)
                return
        try:
            self.ch.send(msg)
        except ChannelClosed:
            pass  # the reader cuts the pair; the drain ends with it

    def stop(self) -> None:
        with self._mu:
            self._stopping = True
            self._cv.notify_all()

    def cut(self, err: TransferError) -> None:
        """Break the pair from any thread: queued and running pulls FAIL now (nothing more can
        land: the data plane is aborted, and the source drops its side when its control
        connection closes)."""
        with self._mu:
            if self.broken is None:
                self.broken = err
            victims = dict.fromkeys(list(self._jobs) + [w.x for w in self._inflight])
            self._jobs.clear()
            self._inflight.clear()
            self._cv.notify_all()
        if (plane := self.plane) is not None:  # the data plane first: see NcclTransport._close
            plane.abort()
        if self.ch is not None:
            self.ch.close()
        for x in victims:
            x._fail(self.broken)
            x._quiesce()

    # --- posting (under _post_lock) --------------------------------------------------------------
    def _post_from(self, x: NcclTransfer) -> None:
        """Post x's next windows while the pair has room."""
        if self.kind == "push":  # one window, posted even if x is aborting (the source fills it)
            win = x.windows.popleft()
            work = self.plane.post(x.dst.flat, [(d, n) for _, d, n in win], x.tag, send=False, after=x.after)
            with self._mu:
                self._inflight.append(_Window(x, work, sum(n for *_, n in win), True))
            return
        while x.windows:
            with self._mu:
                if self.broken is not None or len(self._inflight) >= self.tx.windows_in_flight:
                    return
            if not x._begin_io():  # aborting: post nothing more (abort waits for those in flight)
                x.windows.clear()
                return
            x._start()
            win = x.windows.popleft()
            tag = self.tag
            self.tag = (tag + len(win)) % (1 << 30)
            # ask first, then post the recvs (a torch NCCL group builds its communicator inside
            # the first recv, which blocks until the source, prompted by this message, joins)
            self.ch.send({"op": "send", "tag": tag, "buffer": x.desc.buffer.buffer_id,
                          "pieces": [[s, n] for s, _, n in win]})
            work = self.plane.post(x.dst.flat, [(d, n) for _, d, n in win], tag, send=False, after=x.after)
            with self._mu:
                self._inflight.append(_Window(x, work, sum(n for *_, n in win), not x.windows))

    def _post_queued(self) -> None:
        while True:
            with self._mu:
                if not self._jobs or self.broken is not None:
                    return
                x = self._jobs[0]
            self._post_from(x)
            if x.windows:
                return  # no room
            with self._mu:
                if self._jobs and self._jobs[0] is x:
                    self._jobs.popleft()

    # --- link thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        delay = 2e-4
        try:
            while True:
                with self._mu:
                    self._idle = True
                    while not (self._jobs or self._inflight or self._stopping or self.broken):
                        self._cv.wait()
                    self._idle = False
                    if self.broken is not None or (self._stopping and not self._jobs and not self._inflight):
                        break
                if self.plane is None:
                    self._connect()
                with self._post_lock:
                    self._post_queued()
                if not self._inflight:
                    continue
                if not self.plane.pollable:
                    self._reap_blocking()
                    continue
                # NCCL: pulling threads reap their own windows from poll / wait (no hand-off);
                # this thread is the backstop (for pulls nobody polls, and aborts): it looks
                # every 0.2 .. 1 ms, so as not to compete with them for the GIL
                with self._mu:
                    if self.broken is None and self._inflight:
                        self._cv.wait(delay)
                delay = 2e-4 if self._reap_done() else min(2 * delay, 1e-3)
        except TransferError as e:
            self.cut(e)
        except _FAILURES as e:
            if len(self.threads) > 1:  # let the reader report the source's own reason first
                self.threads[1].join(0.5)
            self.cut(self.broken or PeerLostError(f"nccl pull from {self.source} failed: {e}"))
        except Exception as e:  # a bug or a library's surprise: the pulls fail, never hang
            log.exception("nccl link to %s failed", self.source)
            self.cut(TransferError(f"nccl pull from {self.source} failed: {e!r}"))
        finally:
            if self.plane is not None:  # the data plane first: see NcclTransport._close
                self.plane.close()
            if self.ch is not None:
                self.ch.close()
            self.plane = None  # frees the group's gloo device / NCCL communicator

    def _connect(self) -> None:
        tx = self.tx
        if tx.device is not None:
            torch.cuda.set_device(tx.device)
        self.ch = Channel.connect(self.host, self.ctl_port, tx.connect_timeout_s, self.local)
        epoch = self.epoch
        self.ch.send({"op": "hello", "agent": tx.agent, "epoch": epoch, "backend": tx.backend,
                      "runtime": tx.runtime, "kind": self.kind, "registered": tx._registrable(),
                      "gpu": gpu_uuid(tx.device)})
        msg = self.ch.recv(timeout=tx.connect_timeout_s)  # the NCCL id (cupy), or "accept"
        if msg is None:
            raise PeerLostError(f"nccl: {self.source} did not answer within {tx.connect_timeout_s}s")
        if msg.get("op") not in ("nccl_id", "accept"):
            raise TransferError(f"nccl pair with {self.source} refused: {msg.get('msg')}")
        if tx.runtime == "cupy":
            # registered only if both ends are: the source says so with the id
            self.plane = _CupyPlane(tx.nccl, msg["id"], 1, tx.device, tx._mem if msg.get("registered") else None)
            log.info("nccl %s pair %s <- %s formed: %s", self.kind, tx.agent, self.source,
                     "registered (zero-copy)" if self.plane.registered else "staged through NCCL's buffers")
        else:
            store = dist.TCPStore(self.host, self.store_port, is_master=False,
                                  timeout=timedelta(seconds=tx.connect_timeout_s))
            pg = make_pair_group(tx.backend, dist.PrefixStore(f"{tx.agent}/{epoch}", store), 1, tx)
            self.plane = _TorchPlane(pg, 0, tx.backend)
        if self.kind == "push":
            # one message each way before any receive is posted ahead of its send: the pair's
            # first NCCL op connects it, and a receive posted before the source's first send
            # hung that send (2xH200); asked first, as pulls ask, it does not
            self.ch.send({"op": "warm"})
            _wait_work(self.plane.post(tx.scratch(1, self.plane), [(0, 1)], 0, send=False), self.plane,
                       tx.connect_timeout_s, f"nccl push pair with {self.source}: warm-up")
            self.ready = True
        reader = threading.Thread(target=self._read, name=f"lmdisagg-nccl-read-{self.source}", daemon=True)
        self.threads.append(reader)
        reader.start()
        if self.kind == "push":
            with self._mu:
                self._up = True
                cancels, self._cancels = self._cancels, []
            for msg in cancels:
                self.ch.send(msg)

    # --- reaping: finished windows, oldest first ---------------------------------------------------
    def advance(self) -> None:
        """From a pulling thread's poll / wait (NCCL planes): reap finished windows and post
        queued ones into the room they leave."""
        plane = self.plane
        if plane is None or not plane.pollable or self.broken is not None:
            return
        try:
            if self._reap_done() and self._jobs and self._post_lock.acquire(blocking=False):
                try:
                    self._post_queued()
                finally:
                    self._post_lock.release()
        except _FAILURES as e:
            self.cut(PeerLostError(f"nccl pull from {self.source} failed: {e}"))
        except Exception as e:
            log.exception("nccl pull from %s failed", self.source)
            self.cut(TransferError(f"nccl pull from {self.source} failed: {e!r}"))

    def _reap_done(self) -> bool:
        """Finish the windows whose events completed (one thread at a time); True if any."""
        if not self._reap_lock.acquire(blocking=False):
            return False
        reaped = False
        try:
            while True:
                with self._mu:
                    if not self._inflight or self.broken is not None:
                        return reaped
                    w = self._inflight[0]
                if not w.work.done():
                    return reaped
                w.work.wait()  # torch: the caller's stream orders after the recv
                self._finish(w)
                reaped = True
        finally:
            self._reap_lock.release()

    def _reap_blocking(self) -> None:
        """gloo: block on the oldest window; data, a pair error, or op_timeout_s ends it, and
        cut() fails the transfer meanwhile if the peer is lost."""
        with self._mu:
            w = self._inflight[0]
        w.work.wait()
        with self._reap_lock:
            self._finish(w)

    def _finish(self, w: _Window) -> None:
        x = w.x
        with self._mu:
            if self.broken is not None or not self._inflight or self._inflight[0] is not w:
                return  # cut meanwhile: cut() failed the pulls
            self._inflight.popleft()
            hdr = self._headers.pop(x.seq, None) if self.kind == "push" else None
        self.ready = True
        if self.kind == "push":
            self._finish_push(x, w.nbytes, hdr)
            return
        x.bytes_done += w.nbytes
        x._window_done(w.last)

    def _finish_push(self, x: NcclExpect, nbytes: int, hdr: dict | None) -> None:
        """x's receives completed: the source's "pushed" message (sent right after it posted the
        sends, so normally here long before they end) says whether they carried its blocks or
        filler, and brings their checksums."""
        if hdr is None:
            with self._mu:
                self._cv.wait_for(lambda: x.seq in self._headers or self.broken is not None, self.tx.connect_timeout_s)
                hdr = self._headers.pop(x.seq, None)
        if not x._aborting:
            if hdr is None:
                x._fail(self.broken or PeerLostError(f"nccl push from {self.source}: no word from the source "
                                                     f"within {self.tx.connect_timeout_s}s of the bytes"))
            elif not hdr["ok"]:
                x._fail(TransferAbortedError(f"nccl push from {self.source} aborted by the source"))
            else:
                if hdr.get("sums"):
                    x.desc = replace(x.desc, checksums=tuple(hdr["sums"]))
                x._window_done(True)
                return
        x._window_done()

    # --- reader thread -------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                msg = self.ch.recv()
                if msg.get("op") == "pushed":
                    with self._mu:
                        self._headers[msg["seq"]] = msg
                        self._cv.notify_all()
                elif msg.get("op") == "error":  # the source tears the pair down right after
                    self._remote_error = msg
        except ChannelClosed as e:
            with self._mu:
                stopping = self._stopping and not self._jobs and not self._inflight
            if stopping:
                return
            err = self._remote_error
            if err is None:
                self.cut(PeerLostError(f"nccl pair with {self.source} lost: the source died or closed ({e})"))
            else:
                cls = TransferCorruptError if err.get("kind") == "range" else TransferError
                self.cut(cls(f"nccl pull from {self.source} refused: {err['msg']}"))


# --- source side -------------------------------------------------------------------------------
class NcclPush(Transfer):
    """Source side of a push: DONE once its sends completed (the bytes left)."""

    peer: "_Peer"
    ticket: PushTicket
    work = None    # the posted sends
    base = None    # what they read: the source buffer, or a staged copy of scattered blocks
    pieces = ()    # (offset in base, nbytes), one per piece the destination posted
    sums = None    # xxh3 of the blocks, when the destination asked for them
    after = None   # CUDA: the caller's stream at push (the sends read after its queued work)

    @property
    def seq(self) -> int:
        return self.ticket.seq

    def _progress(self) -> None:
        self.peer.reap(self)

    def _cancel(self) -> bool:
        return self.peer.drop(self)


class _Peer:
    """Source side of one pair: the serving thread answering one destination's requests (pull
    pairs), or taking its cancels while callers' ``push`` posts the sends (push pairs)."""

    def __init__(self, tx: "NcclTransport", sock: socket.socket):
        self.tx = tx
        self.ch = Channel(sock)
        self.plane = None
        self.sends: deque = deque()
        self.key = None  # push pairs: (destination agent, its link's epoch)
        self.push_lock = threading.Lock()  # push state below, and posting on the pair
        self.next_seq = 0
        self.queued: dict[int, NcclPush] = {}     # pushes made before their turn
        self.dropped: dict[int, tuple] = {}       # seq -> (sizes, tag): filler goes in their place
        self.pushing: list[NcclPush] = []          # posted, not yet DONE
        self.lost: TransferError | None = None
        self.thread = threading.Thread(target=self._run, name="lmdisagg-nccl-serve", daemon=True)
        self.thread.start()

    # --- push pairs -------------------------------------------------------------------------------
    def push(self, job: NcclPush) -> None:
        with self.push_lock:
            if self.lost is not None:
                err = self.lost
            elif job.seq < self.next_seq or job.seq in self.queued:
                err = TransferAbortedError(f"push {job.seq} to {self.key[0]}: that expectation was "
                                           f"aborted or already pushed")
            else:
                self.queued[job.seq] = job
                try:
                    self._drain()
                except Exception as e:
                    err = PeerLostError(f"nccl push to {self.key[0]} failed: {e!r}")
                else:
                    return
        if err is not None:
            if isinstance(err, PeerLostError) and self.lost is None:
                self.lose(err)
            job._fail(err)
            job._quiesce()

    def cancel(self, seq: int, sizes, tag: int) -> None:
        with self.push_lock:
            if seq >= self.next_seq and self.lost is None:
                self.dropped[seq] = (tuple(sizes), tag)
                self._drain()

    def _drain(self) -> None:
        """Post every push whose turn has come (under push_lock): its sends, then its header
        (which says whether they carry the blocks or filler; the destination finishes a push
        only with it)."""
        while True:
            seq = self.next_seq
            if seq in self.dropped:
                sizes, tag = self.dropped.pop(seq)
                job = self.queued.pop(seq, None)
                if job is not None:
                    job._fail(TransferAbortedError(f"push {seq} to {self.key[0]}: the destination aborted it"))
                    job._quiesce()
                filler = self.tx.scratch(max(sizes), self.plane)
                work = self.plane.post(filler, [(0, n) for n in sizes], tag, send=True)
                work.keep = filler
                self.sends.append(work)
                self.ch.send({"op": "pushed", "seq": seq, "ok": False})
            elif seq in self.queued:  # the sends first: the header reaches the destination while they move
                job = self.queued.pop(seq)
                job.work = self.plane.post(job.base, job.pieces, job.ticket.tag, send=True, after=job.after)
                job._start()
                self.pushing.append(job)
                self.ch.send({"op": "pushed", "seq": seq, "ok": True, "sums": job.sums})
            else:
                return
            self.next_seq = seq + 1

    def reap(self, job: NcclPush) -> None:
        """From a pusher's poll / wait: DONE once its sends completed (gloo: blocks until then)."""
        work = job.work
        if work is None or job.state.terminal:
            return
        try:
            if self.plane is not None and self.plane.pollable and not work.done():
                return
            work.wait()
        except _FAILURES as e:
            self.lose(PeerLostError(f"nccl push to {self.key[0]} failed: {e}"))
            return
        with self.push_lock:
            if job in self.pushing:
                self.pushing.remove(job)
        job.base = job.work = None  # a torch work holds its process group (sockets, the store)
        job.bytes_done = job.nbytes
        job._set(TransferState.DONE)
        job._quiesce()

    def drop(self, job: NcclPush) -> bool:
        """Abort a push: one not yet posted becomes filler; a posted one is drained (else the
        pair is cut, which stops its sends)."""
        with self.push_lock:
            if self.queued.get(job.seq) is job:
                del self.queued[job.seq]
                self.dropped[job.seq] = (job.ticket.sizes, job.ticket.tag)
                try:
                    self._drain()
                except Exception as e:
                    log.debug("nccl push filler: %r", e)
                job._quiesce()
                return True
            posted = job.work is not None
        if not posted or job._quiet:
            return True
        deadline = time.monotonic() + job.drain_timeout_s
        while time.monotonic() < deadline:
            self.reap(job)
            if job.state.terminal:
                return True
            time.sleep(1e-4)
        self.lose(PeerLostError(f"nccl push to {self.key[0]}: the destination did not take a push within "
                                f"{job.drain_timeout_s}s; pair torn down"))
        return True

    def lose(self, err: TransferError) -> None:
        """Fail every push of the pair and stop its NCCL kernels (from any thread)."""
        with self.push_lock:
            if self.lost is not None:
                return
            self.lost = err
            victims = list(self.queued.values()) + self.pushing
            self.queued.clear()
            self.pushing = []
        if (plane := self.plane) is not None:  # the data plane first: see NcclTransport._close
            plane.abort()
        self.ch.close()
        for job in victims:
            job.base = job.work = None
            job._fail(err)
            job._quiesce()

    def _run(self) -> None:
        tx = self.tx
        try:
            hello = self.ch.recv(timeout=tx.connect_timeout_s)
            if not hello or hello.get("op") != "hello":
                return
            theirs, ours = (hello["backend"], hello.get("runtime")), (tx.backend, tx.runtime)
            if theirs != ours:
                self.ch.send({"op": "error", "tag": -1, "msg": f"the destination runs backend/runtime {theirs}, "
                                                              f"this source {ours}"})
                return
            if hello.get("gpu") is not None and hello["gpu"] == gpu_uuid(tx.device):
                self.ch.send({"op": "error", "tag": -1, "msg": (
                    f"{hello['agent']} and {tx.agent} both use GPU {hello['gpu']}, and NCCL cannot pair two "
                    f"processes of one GPU; move KV between workers that share a GPU with cuda_ipc")})
                return
            if tx.device is not None:
                torch.cuda.set_device(tx.device)
            if tx.runtime == "cupy":
                uid = tx.nccl.get_unique_id()
                registered = bool(hello.get("registered")) and tx._registrable()
                self.ch.send({"op": "nccl_id", "id": uid if isinstance(uid, bytes) else list(uid),
                              "registered": registered})
                self.plane = _CupyPlane(tx.nccl, uid, 0, torch.cuda.current_device(),
                                        tx._mem if registered else None)
                log.info("nccl %s pair %s -> %s formed: %s", hello.get("kind", "pull"), tx.agent, hello["agent"],
                         "registered (zero-copy)" if registered else "staged through NCCL's buffers")
            else:
                self.ch.send({"op": "accept"})
                pg = make_pair_group(tx.backend, dist.PrefixStore(f"{hello['agent']}/{hello['epoch']}", tx._store),
                                     0, tx)
                self.plane = _TorchPlane(pg, 1, tx.backend)
            if hello.get("kind") == "push":
                self._serve_push(hello)
                return
            while True:
                msg = self.ch.recv()
                if msg.get("op") == "send":
                    self._serve(msg)
                # reap finished windows; keep at most windows_in_flight posted (gloo completes
                # works only in wait(); a failed send raises: the pair is done)
                while self.sends and (len(self.sends) > tx.windows_in_flight
                                      or (self.plane.pollable and self.sends[0].done())):
                    self.sends.popleft().wait()
        except _FAILURES as e:
            log.debug("nccl serving thread for %s ends: %r", self.tx.agent, e)
        except Exception:  # the destination sees the connection close: its pulls fail
            log.exception("nccl serving thread for %s failed", self.tx.agent)
        finally:
            if self.key is not None:
                self.tx._forget_push_peer(self)
                self.lose(PeerLostError(f"nccl push pair with {self.key[0]} lost: the destination died or closed"))
            if self.plane is not None:  # the data plane first: see NcclTransport._close
                self.plane.close()
            self.ch.close()
            self.sends.clear()
            self.plane = None  # gloo closes the pair's sockets when the group is freed

    def _serve_push(self, hello) -> None:
        """A push pair: answer the warm-up, then take cancels until the destination leaves."""
        tx = self.tx
        while True:
            msg = self.ch.recv()
            op = msg.get("op")
            if op == "warm":
                with self.push_lock:
                    work = self.plane.post(tx.scratch(1, self.plane), [(0, 1)], 0, send=True)
                _wait_work(work, self.plane, tx.connect_timeout_s, f"nccl push pair with {hello['agent']}: warm-up")
                self.key = (hello["agent"], hello["epoch"])
                tx._add_push_peer(self)
            elif op == "cancel":
                self.cancel(msg["seq"], msg["sizes"], msg["tag"])
            while self.sends and (len(self.sends) > tx.windows_in_flight
                                  or (self.plane.pollable and self.sends[0].done())):
                self.sends.popleft().wait()  # filler sent

    def _serve(self, msg) -> None:
        buf = self.tx._buffers.get(msg["buffer"])
        bad = kind = None
        if buf is None:
            bad, kind = f"buffer {msg['buffer']} is not registered on {self.tx.agent}", "gone"
        elif any(off < 0 or off + n > buf.desc.nbytes for off, n in msg["pieces"]):
            bad, kind = (f"requested bytes lie outside buffer {msg['buffer']} ({buf.desc.nbytes} bytes) "
                         f"of {self.tx.agent}: truncated descriptor"), "range"
        elif self.plane.registered and self.tx._mem.segment_of(buf.flat) is None:
            bad, kind = (f"buffer {msg['buffer']} of {self.tx.agent} was registered after this registered pair "
                         f"formed and is not from the transport's allocate"), "unregistered"
        if bad is not None:  # reply, then tear the pair down: the peer's posted recvs must fail
            self.ch.send({"op": "error", "kind": kind, "tag": msg["tag"], "msg": bad})
            raise ChannelClosed(bad)
        self.sends.append(self.plane.post(buf.flat, msg["pieces"], msg["tag"], send=True))


class NcclTransport(Transport):
    name = "nccl"
    supports_push = True

    def __init__(self, *, backend: str = "auto", host: str = "127.0.0.1", checksum: bool = False,
                 drain_timeout_s: float = 10.0, window_nbytes: int | None = None, windows_in_flight: int = 4,
                 connect_timeout_s: float = 30.0, op_timeout_s: float = 30.0, device: int | None = None,
                 runtime: str = "auto", register_memory: bool | None = None):
        """``backend``: "nccl" (CUDA buffers), "gloo" (CPU buffers) or "auto" (nccl when CUDA is
        available). ``runtime`` (nccl backend): "cupy" (NCCL through cupy's bindings), "torch"
        (a torch.distributed group) or "auto" (cupy if it loads). ``host``: the address this
        worker serves on (loopback on one node). ``op_timeout_s`` bounds one window's send/recv
        on a torch group (a gloo receive from a dead peer ends only then, though its transfer
        FAILS at once); ``device``: the CUDA device of this worker's buffers (default: that of
        the first registered buffer). ``window_nbytes``: bytes per request window, the unit of
        abort, default 256 MiB on NCCL and 64 MiB on gloo; ``windows_in_flight``: windows a
        pair keeps posted, across pulls. ``register_memory`` (cupy runtime): ``allocate`` hands out
        NCCL's registrable memory and pairs whose both ends hold only such buffers move it
        zero-copy (see ``_nccl_mem``); None: when this NCCL (>= 2.23) and cupy allow it, True:
        required, False: never."""
        super().__init__(checksum=checksum, drain_timeout_s=drain_timeout_s)
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend not in ("nccl", "gloo"):
            raise TransferError(f"nccl transport: backend must be 'nccl' or 'gloo', not {backend!r}")
        if runtime not in ("auto", "cupy", "torch"):
            raise TransferError(f"nccl transport: runtime must be 'auto', 'cupy' or 'torch', not {runtime!r}")
        if windows_in_flight < 1:
            raise TransferError("nccl transport: windows_in_flight must be at least 1")
        self.nccl, why = cupy_nccl() if backend == "nccl" and runtime != "torch" else (None, "")
        if runtime == "cupy" and self.nccl is None:
            raise TransferError(f"nccl runtime='cupy' needs backend 'nccl' and cupy with NCCL (pip install "
                                f"'lmdisagg[cu12]' or 'lmdisagg[cu13]', matching torch's CUDA){'; ' + why if why else ''}")
        if backend == "nccl" and runtime == "auto" and self.nccl is None:
            warn_torch_path("nccl", why, "a torch.distributed group costs ~60-90 µs more per window on each "
                            "side (lone 64 MiB pulls on 2xH200: 0.42-0.43 of a peer copy against 0.48-0.58)")
        self.runtime = "cupy" if self.nccl is not None else "torch"
        self._mem = None  # NcclMemory: registrable memory, when pairs may run registered
        if self.runtime == "cupy" and register_memory is not False:
            from lmdisagg.transports._nccl_mem import NcclMemory, ub_lib
            lib, why = ub_lib()
            if lib is not None:
                self._mem = NcclMemory(lib)
            elif register_memory:
                raise TransferError(f"nccl register_memory=True: {why}")
            else:
                log.info("nccl: buffers move through NCCL's staging (no registration): %s", why)
        elif register_memory:
            raise TransferError("nccl register_memory=True needs backend 'nccl' with the cupy runtime")
        if backend == "nccl" and self.runtime == "torch":  # gloo and cupy's NCCL push
            self.supports_push = False
            self.why_no_push = ("a torch.distributed NCCL group's watchdog ends a receive that waits longer than "
                                "op_timeout_s, and a pushed receive waits for the source; push needs cupy's NCCL")
        self.backend, self.host, self.device = backend, host, device
        self.window_nbytes = window_nbytes or ((256 if backend == "nccl" else 64) << 20)
        self.windows_in_flight = windows_in_flight
        self.connect_timeout_s = connect_timeout_s
        self.op_timeout_s = op_timeout_s
        self._store_sock = socket.create_server((host, 0))
        self._store = dist.TCPStore(host, self._store_sock.getsockname()[1], is_master=True,
                                    master_listen_fd=self._store_sock.fileno(), wait_for_workers=False,
                                    timeout=timedelta(seconds=connect_timeout_s), use_libuv=True)
        self._server = socket.create_server((host, 0))
        # peers on this host connect to a Unix socket (named in the address) if this host has them
        self._local_server, token = local_listener()
        # host:control port:store port:Unix socket token ("" without one)
        self.address = f"{host}:{self._server.getsockname()[1]}:{self._store_sock.getsockname()[1]}:{token}"
        self._links: dict[str, _Link] = {}
        self._dead_links: list[_Link] = []  # broken or retired links whose threads may still run
        self._peers: list[_Peer] = []
        self._push_peers: dict[tuple, _Peer] = {}  # (destination agent, epoch) -> its warmed-up push pair
        self._gone_push_peers: set[tuple] = set()
        self._push_cv = threading.Condition()
        self._accepters = [threading.Thread(target=self._accept, args=(server,), name="lmdisagg-nccl-accept",
                                            daemon=True)
                           for server in (self._server, self._local_server) if server is not None]
        for t in self._accepters:
            t.start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                sock, _ = server.accept()
            except OSError:  # closed
                return
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._peers = [p for p in self._peers if p.thread.is_alive()]
                self._peers.append(_Peer(self, sock))

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """Zeroed memory NCCL can register (``ncclMemAlloc``) when pairs may run registered,
        else ordinary memory. NCCL memory whose tensor ends is freed at ``close`` (a communicator
        may hold its registration until then), or as the tensor ends if that is after close."""
        device = torch.device(device)
        if self._mem is None or device.type != "cuda":
            return super().allocate(shape, dtype, device)
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return self._mem.allocate(nbytes, index).view(dtype).view(tuple(shape))

    def _caller_stream(self, t: torch.Tensor):
        """The calling thread's current stream on ``t``'s device, as the pair's plane takes it:
        a raw handle for cupy (torch's Stream object costs ~8 µs a pull on 2xH200), else the
        torch stream."""
        if self.runtime == "cupy":
            return torch._C._cuda_getCurrentRawStream(t.get_device())
        return torch.cuda.current_stream(t.device)

    @property
    def registers_memory(self) -> bool:
        """Pairs of buffers from ``allocate`` run registered (zero-copy) on this transport."""
        return self._mem is not None

    def _registrable(self) -> bool:
        """This end can run a pair registered: every buffer it has registered is NCCL memory."""
        if self._mem is None:
            return False
        with self._lock:
            bufs = list(self._buffers.values())
        return all(self._mem.segment_of(b.flat) is not None for b in bufs)

    def _register(self, buf: Buffer, buffer_id: int) -> tuple[str, bytes]:
        want = "cuda" if self.backend == "nccl" else "cpu"
        if buf.flat.device.type != want:
            raise TransferError(f"nccl transport with backend {self.backend} moves {want} buffers, "
                                f"not {buf.flat.device.type}")
        if want == "cuda":  # a pair's communicator lives on one device
            with self._lock:
                if self.device is None:
                    self.device = buf.flat.device.index
            if buf.flat.device.index != self.device:
                raise TransferError(f"this nccl transport serves cuda:{self.device}; register buffers of "
                                    f"{buf.flat.device} with another transport instance")
        # the handle says whether the buffer is NCCL memory: a destination pulls (or takes pushes
        # of) any other buffer over a staged pair, never over a registered one
        registrable = self._mem is not None and self._mem.segment_of(buf.flat) is not None
        return self.address, NCCL_MEMORY if registrable else b""

    def _prepare(self, buf: Buffer, block_ids, block_nbytes) -> None:
        if buf.flat.device.type == "cuda":
            torch.cuda.synchronize(buf.flat.device)  # the engine's writes land before a peer reads

    def _pull(self, desc: ChunkDesc, dst: Buffer, dst_blocks: tuple[int, ...]) -> Transfer:
        b = desc.buffer
        if not self.peer_alive(b.host, b.pid, b.pid_start):
            return failed_transfer(desc, dst, dst_blocks, PeerLostError(f"source process {b.pid} ({b.agent}) is gone"))
        link = self._link_for(b.agent, b, dst, "pull")
        x = NcclTransfer(desc, dst, dst_blocks)  # no liveness read at the end (landing_proves_source)
        x.link = link
        if self.backend == "nccl":
            x.spin_s = 0.05  # a window lands within ms: poll for DONE rather than sleep
            x.after = self._caller_stream(dst.flat)  # windows may be posted by the link thread
        link.submit(x)
        return x

    def _link_for(self, key, source: BufferDesc, dst: Buffer, kind: str) -> _Link:
        """The pair's link: a new one if it broke, or if it runs registered and ``dst`` or the
        source's buffer is not NCCL memory (registered after the pair formed; the old link is not
        stopped, so what it has in flight finishes, and goes at close). The new pair forms
        staged, as the end holding that buffer no longer offers registration."""
        with self._lock:
            link = self._links.get(key)
            if link is not None and link.broken is None and (plane := link.plane) is not None \
                    and plane.registered and (source.handle != NCCL_MEMORY or self._mem.segment_of(dst.flat) is None):
                self._dead_links.append(link)
                link = None
            if link is None or link.broken is not None:
                if link is not None:
                    link.stop()
                    # kept until their threads end (close joins them), not for ever: a source
                    # that refuses every pair would otherwise add one per pull
                    self._dead_links = [d for d in self._dead_links if any(t.is_alive() for t in d.threads)]
                    self._dead_links.append(link)
                link = self._links[key] = _Link(self, source.agent, source.address, kind=kind,
                                                same_host=source.host == HOSTNAME)
            return link

    # --- push ------------------------------------------------------------------------------------
    def scratch(self, nbytes: int, plane=None) -> torch.Tensor:
        """Bytes to send as filler or receive a warm-up into, on this transport's device (from
        the registered pool if ``plane`` runs registered)."""
        if plane is not None and plane.registered:
            return self._mem.lend(nbytes, self.device)
        return torch.empty(nbytes, dtype=torch.uint8,
                           device=torch.device("cuda", self.device) if self.backend == "nccl" else "cpu")

    def _add_push_peer(self, peer: _Peer) -> None:
        with self._push_cv:
            self._push_peers[peer.key] = peer
            self._push_cv.notify_all()

    def _forget_push_peer(self, peer: _Peer) -> None:
        with self._push_cv:
            if self._push_peers.get(peer.key) is peer:
                del self._push_peers[peer.key]
            self._gone_push_peers.add(peer.key)

    def _expect(self, source: BufferDesc, dst: Buffer, dst_blocks: tuple[int, ...], block_nbytes: int,
                checksum: bool) -> Transfer:
        desc = ChunkDesc(source, dst_blocks, block_nbytes)  # block ids: the destination's (the source's
        #                                                     are not known yet)
        x = NcclExpect(desc, dst, dst_blocks)
        if not self.peer_alive(source.host, source.pid, source.pid_start):
            x._fail(PeerLostError(f"source process {source.pid} ({source.agent}) is gone"))
            x._quiesce()
            return x
        x.link = link = self._link_for((source.agent, "push"), source, dst, "push")
        x.windows = deque([[(d, d, n) for _, d, n in byte_runs(dst_blocks, dst_blocks, block_nbytes)]])
        if self.backend == "nccl":
            x.spin_s = 0.05
            x.after = self._caller_stream(dst.flat)
        link.submit_expect(x, block_nbytes, checksum)
        return x

    def _push(self, ticket: PushTicket, src: Buffer, block_ids: tuple[int, ...]) -> Transfer:
        bn = ticket.block_nbytes
        job = NcclPush(ChunkDesc(src.desc, block_ids, bn), None, ())
        job.ticket = ticket
        if self.backend == "nccl":
            job.spin_s = 0.05
            job.after = self._caller_stream(src.flat)
        # the destination posted one receive per run of its blocks: each must be read from one
        # run of ours, else the blocks are gathered (in order) into one staged copy first
        cuts, at = [], 0
        for n in ticket.sizes:
            cuts.append((at, at + n // bn))
            at += n // bn
        gather = None
        if all(block_ids[b:e] == tuple(range(block_ids[b], block_ids[b] + e - b)) for b, e in cuts):
            job.base, job.pieces = src.flat, [(block_ids[b] * bn, (e - b) * bn) for b, e in cuts]
        else:  # gathered below, once the pair (registered or not) is known
            gather = (src.flat[:src.desc.nbytes // bn * bn].view(-1, bn),
                      torch.tensor(block_ids, dtype=torch.int64, device=src.flat.device))
            job.pieces = [(b * bn, (e - b) * bn) for b, e in cuts]
        if ticket.checksum:
            from lmdisagg.transports._blocks import block_checksums
            job.sums = list(block_checksums(src.flat, block_ids, bn))
        key = (ticket.dest_agent, ticket.link)
        peer = self._push_peers.get(key)
        deadline = time.monotonic() + self.connect_timeout_s
        with self._push_cv if peer is None else contextlib.nullcontext():  # the destination connects at its first expect; wait for that pair
            while (peer := self._push_peers.get(key)) is None and key not in self._gone_push_peers \
                    and not self._closed and time.monotonic() < deadline:
                self._push_cv.wait(max(0.0, deadline - time.monotonic()))
        if peer is None:
            why = "is gone" if key in self._gone_push_peers else f"did not connect within {self.connect_timeout_s}s"
            job._fail(PeerLostError(f"nccl push: destination {ticket.dest_agent} {why}"))
            job._quiesce()
            return job
        if gather is not None:  # on the caller's stream: the sends read after it
            rows, index = gather
            if peer.plane is not None and peer.plane.registered:
                job.base = self._mem.lend(len(block_ids) * bn, self.device)
                torch.index_select(rows, 0, index, out=job.base.view(-1, bn))
            else:
                job.base = rows.index_select(0, index).view(-1)
        job.peer = peer
        peer.push(job)
        return job

    def _close(self) -> None:
        with self._push_cv:
            self._push_cv.notify_all()
        with self._lock:
            links, self._links = list(self._links.values()) + self._dead_links, {}
            peers, self._peers = list(self._peers), []
        for server in (self._server, self._local_server):
            if server is not None:
                _close_listener(server)
        # each pair's data plane goes before its control connection: the peer tears its side down
        # only on seeing the connection close, so a registered pair's deregistration (which goes
        # through the peer's NCCL proxy) finds the peer still up, and the two ends never abort a
        # communicator at the same time
        for link in links:
            link.stop()
            if (plane := link.plane) is not None:
                plane.abort()
            if link.ch is not None:
                link.ch.close()
        for p in peers:
            if (plane := p.plane) is not None:
                plane.abort()
            p.ch.close()
        for t in self._accepters:
            t.join(10)
        # a gloo receive whose peer died returns only after op_timeout_s
        for t in [t for link in links for t in link.threads] + [p.thread for p in peers]:
            t.join(self.op_timeout_s + 10)
        if self._mem is not None:  # every communicator is gone: registrable memory may be freed
            self._mem.close()
        del self._store  # stops the store's server thread
        self._store_sock.detach()  # the store owned (and closed) the listening socket
