"""CUDA IPC: one-sided device-to-device pulls between processes of one node, same GPU or across
GPUs (over NVLink / PCIe peer access where the driver has it).

    source: register(kv)   storage._share_cuda_() → an IPC handle of the cudaMalloc block that
                           holds the cache (+ byte offset, device UUID) goes into the BufferDesc
            describe()     syncs the source's current stream: the engine's writes are visible
    dest:   pull()         open the handle once per (peer, buffer) and cache it (a first open
                           costs 0.15-0.22 s; later pulls ~tens of µs), then queue a copy of
                           each block run after the caller's current stream, record an event
            poll()         event.query(); then liveness + checksums → DONE

Launching: the copies and a completion event are queued on the caller's current stream of the
destination device, which orders them after the caller's queued work (a caller whose later work
must not wait for them pulls from a stream of its own, as decode workers do). With cupy
installed (``runtime="auto"`` or ``"cupy"``) through cupy's CUDA runtime bindings, a few µs per
call; without it (``runtime="auto"`` then logs a warning) or with ``runtime="torch"``, through
torch's copies and event objects (``torch._foreach_copy_`` for many runs on one device), whose
Python helpers cost more. Both move the same bytes.

Devices are matched by UUID, so workers may see GPUs under different indices
(CUDA_VISIBLE_DEVICES per actor); the source's GPU must be visible to the destination. Across
GPUs, peer access is enabled both ways (a copy out of IPC-opened memory goes peer to peer only if
the source's device may reach ours); GPUs without it get the driver's copies staged through host
memory, and a warning when their first buffer is opened (tested with torch told that the GPUs
do not peer: every lent GPU pair does, so the staged copies themselves are not).
Enqueued copies cannot be cancelled: ``abort`` waits for them (milliseconds). A transfer whose
source died before it completed is FAILED: IPC memory of a dead process is not to be trusted.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple

import msgpack
import torch

from lmdisagg.transports._blocks import byte_runs
from lmdisagg.transports.base import (
    Buffer, ChunkDesc, PeerLostError, Transfer, TransferCorruptError, TransferError, Transport,
    TransferState, failed_transfer, warn_torch_path,
)

log = logging.getLogger(__name__)


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


class _Mem(NamedTuple):
    """CUDA memory a pull reads or writes, with what the launch needs read off once (torch's
    ``.device`` / ``data_ptr()`` cost ~µs each, per pull): ``[nbytes]`` uint8 tensor, device
    index, address."""

    tensor: torch.Tensor
    index: int
    ptr: int
    nbytes: int

    @classmethod
    def of(cls, t: torch.Tensor) -> "_Mem":
        return cls(t, t.device.index, t.data_ptr(), t.numel())


class CudaIpcTransfer(Transfer):
    # poll the copy's event closely (a yield between polls lets other threads have the GIL): a
    # GiB takes 3 ms over NVLink, ~40 ms over PCIe; timed back-off sleeps would overshoot it by
    # up to 2 ms, and a blocking event wait wakes ~0.1 ms late
    spin_s = 0.05

    def __init__(self, *args):
        super().__init__(*args)
        self._done = None   # (synced) -> bool: the copies finished (an event query, skipped once synced)
        self._synced = False  # wait() synchronized on the copies' event
        self._sync = None   # () -> None: wait for them
        self._src = None    # keeps the opened source alive while copies are queued

    def wait(self, timeout: float) -> None:
        """Queued copies need no peer and run at >= 1 GB/s on any GPU link: when they fit the
        timeout at that rate, wait for them in the driver (a blocking event sync, GIL released),
        which sees the end ~15 µs sooner than polling from Python, and finish right here.
        The strict liveness read (/proc, 3-5 µs) is made while the copies run; once they have
        landed, the source's pidfd (~0.5 µs) says it had not exited by then."""
        sync = self._sync
        if sync is not None and self.nbytes <= timeout * 1e9:
            b = self.desc.buffer
            early = self.nbytes >= 1 << 20 and self._peer_alive(b.host, b.pid, b.pid_start, True)
            try:
                sync()
            except Exception:  # the event was recycled meanwhile (another thread finished us)
                pass
            else:
                self._synced = True  # finishing needs no event query
                self._progress(False if early else None)  # a dead or dying source: strict again, FAILED
                if self._state is TransferState.DONE:
                    return
        super().wait(timeout)  # FAILED raises there; else (another thread finishing) it waits

    def launched(self, src, done, sync) -> None:
        """Copies are queued. Called before the transfer is handed to anyone, so no other thread
        can be looking at it: the state moves without the lock."""
        self._src, self._done, self._sync = src, done, sync
        self._quiet = False
        self._state = TransferState.TRANSFERRING

    def _progress(self, strict: bool | None = None) -> None:
        with self._mu:
            done = self._done
            if done is None or self._state.terminal or not done(self._synced):
                return
            self._src = self._done = self._sync = None
            self._quiet = True  # nothing queued writes into dst any more
            if self._verify(strict):  # else FAILED, waiters woken
                self.bytes_done = self.nbytes
                self._state = TransferState.DONE
                self._cond.notify_all()  # they wake once this lock is free

    def _release(self) -> None:
        self._src = self._done = self._sync = None
        self._quiesce()

    def _cancel(self) -> bool:
        if self._sync is not None:
            self._sync()  # queued copies cannot be recalled; they take milliseconds
        self._release()
        return True


class _TorchLauncher:
    """Copies queued with torch ops on the caller's current stream of the destination device (a
    copy between two GPUs runs on the source device's current stream, which torch orders both
    ways with the destination's), then an event on the destination's stream."""

    name = "torch"

    def __init__(self):
        self._devices: set[int] = set()  # where copies were queued (close waits for them)

    def launch(self, src_mem: _Mem, dst_mem: _Mem, runs) -> tuple:
        src, dst = src_mem.tensor, dst_mem.tensor
        self._devices.update((src_mem.index, dst_mem.index))
        dsts = [dst[d:d + n] for _, d, n in runs]    # [n] uint8 views
        srcs = [src[s:s + n] for s, _, n in runs]
        if src_mem.index == dst_mem.index and len(runs) > 1:
            if all(s % 8 == 0 and d % 8 == 0 and n % 8 == 0 for s, d, n in runs):
                dsts = [t.view(torch.int64) for t in dsts]  # 8-byte elements: wide loads
                srcs = [t.view(torch.int64) for t in srcs]
            torch._foreach_copy_(dsts, srcs, non_blocking=True)  # few launches for many blocks
        else:
            for a, b in zip(dsts, srcs):
                a.copy_(b, non_blocking=True)  # peer copy when the devices differ
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(dst.device))
        return (lambda synced=False: synced or event.query()), event.synchronize

    def close(self) -> None:
        """Wait for copies still queued (pulls nobody waited for) before the sources are closed."""
        for index in self._devices:
            torch.cuda.synchronize(index)
        self._devices.clear()


class _CupyLauncher:
    """Copies queued with cupy's CUDA runtime bindings: cudaMemcpyAsync per run on the caller's
    current torch stream of the destination device, then a completion event. The stream orders
    them after the caller's queued work, with no event or query to pay per pull (a side stream
    would need one of those: ~2 µs each on an H200 host); the caller's later work on that
    stream runs after them, so a caller that must not wait (a decode worker) pulls from a stream
    of its own."""

    name = "cupy"

    def __init__(self):
        from cupy.cuda import runtime as rt  # ImportError: no cupy
        self.rt = rt
        self._lock = threading.Lock()
        self._free: dict[int, list[int]] = {}    # device -> idle completion events
        self._events: list[tuple[int, int]] = []  # every event made (device, handle)
        self._peers: set[tuple[int, int]] = set()

    def _on(self, index: int):
        prev = self.rt.getDevice()
        if prev != index:
            self.rt.setDevice(index)
        return prev

    def _setup(self, index: int, src_index: int) -> None:
        rt = self.rt
        with self._lock:
            self._free.setdefault(index, [])
            if src_index == index or (index, src_index) in self._peers:
                return
            prev = rt.getDevice()
            try:
                # Peer access both ways where the GPUs have it. The source's memory is opened into
                # the source device's context, and a copy out of it goes peer to peer only if that
                # device may reach ours; else the driver stages it through the host: 213 MB
                # serving pulls on 2xH200 took 6.2 ms (36 GB/s) with only our device reaching the
                # source, 0.72 ms (295 GB/s) with both. torch's copies enable the same direction.
                for a, b in ((index, src_index), (src_index, index)):
                    if not rt.deviceCanAccessPeer(a, b):
                        continue  # no P2P between them: the driver's staged copies
                    self._on(a)
                    try:
                        rt.deviceEnablePeerAccess(b)
                    except rt.CUDARuntimeError as e:
                        if "PeerAccessAlreadyEnabled" not in str(e):
                            raise
                self._peers.add((index, src_index))
            finally:
                rt.setDevice(prev)

    def launch(self, src: _Mem, dst: _Mem, runs) -> tuple:
        rt = self.rt
        index, src_index = dst.index, src.index
        free = self._free.get(index)
        if free is None or (src_index != index and (index, src_index) not in self._peers):
            self._setup(index, src_index)
            free = self._free[index]
        prev = self._on(index)
        try:
            stream = torch._C._cuda_getCurrentRawStream(index)  # the caller's
            sp, dp = src.ptr, dst.ptr
            for s, d, n in runs:
                rt.memcpyAsync(dp + d, sp + s, n, rt.memcpyDefault, stream)
            try:  # (the copies run meanwhile)
                done_ev = free.pop()
            except IndexError:
                done_ev = rt.eventCreateWithFlags(rt.eventDisableTiming)
                with self._lock:
                    self._events.append((index, done_ev))
            rt.eventRecord(done_ev, stream)
        finally:
            if prev != index:
                rt.setDevice(prev)

        def done(synced: bool = False) -> bool:
            if not synced and rt.eventQuery(done_ev) != 0:
                return False
            free.append(done_ev)  # called once (the transfer then drops this closure); atomic
            return True

        return done, lambda: rt.eventSynchronize(done_ev)

    def close(self) -> None:
        rt = self.rt
        with self._lock:
            for _, ev in self._events:
                try:
                    rt.eventSynchronize(ev)  # copies still queued (pulls nobody waited for) end first
                    rt.eventDestroy(ev)
                except rt.CUDARuntimeError as e:  # a broken context: nothing left to release
                    log.debug("cuda_ipc: event release failed: %r", e)
            self._events.clear()
            self._free.clear()


class CudaIpcTransport(Transport):
    name = "cuda_ipc"

    def __init__(self, *, checksum: bool = False, drain_timeout_s: float = 10.0, runtime: str = "auto"):
        """``runtime``: how copies are launched: "cupy", "torch", or "auto" (cupy if installed)."""
        if not torch.cuda.is_available():
            raise TransferError("the cuda_ipc transport needs CUDA devices")
        if runtime not in ("auto", "cupy", "torch"):
            raise TransferError(f"cuda_ipc runtime must be 'auto', 'cupy' or 'torch', not {runtime!r}")
        super().__init__(checksum=checksum, drain_timeout_s=drain_timeout_s)
        self._opened: dict[tuple[str, int], _Mem] = {}  # (agent, buffer id) -> the source's memory
        self.launcher = None
        if runtime != "torch":
            try:
                self.launcher = _CupyLauncher()
            except (ImportError, OSError) as e:
                why = f"cupy does not load ({type(e).__name__}: {e})"
                if runtime == "cupy":
                    raise TransferError(f"cuda_ipc runtime='cupy' needs cupy (pip install 'lmdisagg[cu12]' "
                                        f"or 'lmdisagg[cu13]', matching torch's CUDA): {why}") from None
                warn_torch_path("cuda_ipc", why, "torch's copies and events cost more host time per pull "
                                "(a 4 KiB pull, probed on 2xH200: ~40-50 µs against ~20-30 µs through cupy)")
        if self.launcher is None:
            self.launcher = _TorchLauncher()
        self._uuids = {device_uuid(i): i for i in range(torch.cuda.device_count())}

    def _register(self, buf: Buffer, buffer_id: int) -> tuple[str, bytes]:
        t = buf.flat
        if t.device.type != "cuda":
            raise TransferError("cuda_ipc registers CUDA tensors only")
        storage = t.untyped_storage()
        dev, handle, size, offset, ref_h, ref_off, ev_h, ev_sync = storage._share_cuda_()
        byte_off = t.data_ptr() - storage.data_ptr()
        uuid = device_uuid(t.device.index)
        meta = [uuid, handle, size, offset, ref_h, ref_off, ev_h, ev_sync, byte_off]
        buf.state["cuda_ipc"] = _LOCAL[(self.agent, buffer_id)] = _Mem.of(t)
        return uuid, msgpack.packb(meta, use_bin_type=True)

    def _deregister(self, buf: Buffer) -> None:
        _LOCAL.pop((self.agent, buf.desc.buffer_id), None)

    def _prepare(self, buf: Buffer, block_ids, block_nbytes) -> None:
        torch.cuda.current_stream(buf.flat.device).synchronize()

    def _open(self, desc: ChunkDesc, dst_index: int) -> _Mem:
        b = desc.buffer
        key = (b.agent, b.buffer_id)
        src = self._opened.get(key)
        if src is not None:
            return src
        if b.pid == os.getpid():  # CUDA cannot open its own handles: use the tensor itself
            local = _LOCAL.get(key)
            if local is None:
                raise TransferError(f"buffer {key} is from this process but not registered here")
            return local
        uuid, handle, size, offset, ref_h, ref_off, ev_h, ev_sync, byte_off = msgpack.unpackb(b.handle, raw=False)
        index = self._uuids.get(uuid)
        if index is None:
            raise TransferError(f"source GPU {uuid} of {b.agent} is not visible here "
                                f"(check CUDA_VISIBLE_DEVICES of both workers)")
        if byte_off + b.nbytes > size:
            raise TransferCorruptError(f"descriptor of {b.agent} claims {b.nbytes} bytes at offset {byte_off} "
                                       f"of a {size}-byte allocation (truncated)")
        if index != dst_index and not torch.cuda.can_device_access_peer(index, dst_index):
            log.warning("cuda_ipc: GPU %d (source %s) has no peer access to GPU %d: its pulls are staged "
                        "through host memory by the driver, far below the GPU link's rate", index, b.agent, dst_index)
        with torch.cuda.device(index):
            storage = torch.UntypedStorage._new_shared_cuda(index, handle, size, offset, ref_h, ref_off, ev_h, ev_sync)
            src = _Mem.of(torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(storage, byte_off, (b.nbytes,)))
        self._opened[key] = src
        return src

    def _forget(self, agent: str) -> None:
        with self._lock:
            for key in [k for k in self._opened if k[0] == agent]:
                del self._opened[key]

    def _pull(self, desc: ChunkDesc, dst: Buffer, dst_blocks: tuple[int, ...]) -> Transfer:
        b = desc.buffer
        dst_mem = dst.state.get("cuda_ipc")  # read off by register
        if dst_mem is None:  # registered by another medium
            if dst.flat.device.type != "cuda":
                raise TransferError("cuda_ipc pulls into CUDA buffers only")
            dst_mem = _Mem.of(dst.flat)
        if not self.peer_alive(b.host, b.pid, b.pid_start):
            self._forget(b.agent)
            return failed_transfer(desc, dst, dst_blocks, PeerLostError(f"source process {b.pid} ({b.agent}) is gone"))
        src = self._opened.get((b.agent, b.buffer_id))  # opened before: no lock needed to read it
        try:
            if src is None:
                with self._lock:
                    src = self._open(desc, dst_mem.index)
        except TransferError as e:
            return failed_transfer(desc, dst, dst_blocks, e)
        runs = byte_runs(desc.block_ids, dst_blocks, desc.block_nbytes)
        if (max(s + n for s, _, n in runs) if len(runs) > 1 else runs[0][0] + runs[0][2]) > src.nbytes:
            return failed_transfer(desc, dst, dst_blocks, TransferCorruptError(
                f"descriptor of {b.agent} reaches past its {src.nbytes}-byte buffer (truncated)"))
        done, sync = self.launcher.launch(src, dst_mem, runs)  # the copy starts before our bookkeeping
        t = CudaIpcTransfer(desc, dst, dst_blocks, self.peer_alive)
        t.launched(src, done, sync)
        return t

    def _close(self) -> None:
        self.launcher.close()
        with self._lock:
            self._opened.clear()  # frees the storages: torch closes the IPC handles
        for key in [k for k in _LOCAL if k[0] == self.agent]:
            del _LOCAL[key]
        torch.cuda.ipc_collect()  # shared blocks whose consumers are done are freed now


_LOCAL: dict[tuple[str, int], _Mem] = {}  # this process's registered buffers, by (agent, id)
