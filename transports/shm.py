"""POSIX shared memory: one-sided pulls between processes of one node.

Memory (one segment per registered buffer, reused by every transfer)::

    source process                                   destination process
    /dev/shm/lmdisagg-<pid>-<start>-<id>  ◀── mmap once per segment, cached ──  pull: copy runs
    = the engine's KV cache itself when it was        straight from the mapping into the
      made by ``kv_allocator=tx.allocate``            destination blocks (no staging copy)
    = a mirror otherwise: ``describe`` copies the
      named blocks into it (CUDA caches: staging)

With CUDA on either side the segment is page-locked once (cudaHostRegister), so the staging
copies (D2H in ``describe``, H2D in ``pull``) run at pinned-copy speed. H2D copies run on a
stream of the transport, after the work queued on the caller's current stream at ``pull``.

The destination copies in pieces of ``piece_nbytes`` on a worker thread (payloads up to
``inline_nbytes`` are copied inside ``pull``), checking ``abort`` and the source's liveness between
pieces. A transfer whose source died before it finished is FAILED (PeerLostError) although the
bytes may survive in the segment: one contract for every medium.

Cleanup: a transport unlinks its segments on ``close``. Segments of a crashed process are unlinked
by the next ``ShmTransport`` created on the node, or by a destination that notices the death.
Mappings stay valid for tensors that still use them (the engine's cache outlives ``close``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import torch

from lmdisagg.transports._blocks import byte_runs, split_runs
from lmdisagg.transports._proc import HOSTNAME, alive
from lmdisagg.transports.base import (
    Buffer, ChunkDesc, PeerLostError, Transfer, TransferCorruptError, TransferError, Transport,
    failed_transfer,
)

log = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"
PREFIX = "lmdisagg-"


class Segment:
    """One named shared-memory segment, mapped read-write in this process. The mapping holds
    no file descriptor and is unmapped when the last tensor using it is freed."""

    def __init__(self, name: str, nbytes: int, create: bool):
        self.name = name
        path = os.path.join(SHM_DIR, name)
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)  # a full /dev/shm fails here, not with SIGBUS later
            except BaseException:
                os.unlink(path)
                raise
            finally:
                os.close(fd)
        else:
            nbytes = os.stat(path).st_size
            if nbytes == 0:
                raise ValueError(f"{path} is empty")
        self.nbytes = nbytes
        self.flat = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)  # [nbytes]
        self.pinned = False

    def pin(self) -> None:
        """Page-lock the mapping for CUDA copies (staging to or from a GPU); once per segment.
        If the driver refuses, copies still work, unpinned (slower)."""
        if self.pinned:
            return
        rc = torch.cuda.cudart().cudaHostRegister(self.flat.data_ptr(), self.nbytes, 0)
        self.pinned = int(rc) == 0
        if not self.pinned:
            log.warning("cudaHostRegister of %s (%d bytes) failed (%s): CUDA staging copies run unpinned",
                        self.name, self.nbytes, rc)

    def contains(self, t: torch.Tensor) -> int | None:
        """Byte offset of a CPU tensor's memory inside this segment, or None."""
        base = self.flat.data_ptr()
        ptr = t.data_ptr()
        if t.device.type == "cpu" and base <= ptr and ptr + t.numel() * t.element_size() <= base + self.nbytes:
            return ptr - base
        return None

    def unmap(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self.pinned = False
        self.flat = None  # tensors still using the memory (the engine's cache) keep it mapped


def segment_name(pid: int, start: int) -> str:
    return f"{PREFIX}{pid}-{start}-{uuid.uuid4().hex[:12]}"


def segment_owner(name: str) -> tuple[int, int] | None:
    parts = name[len(PREFIX):].split("-")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except (FileNotFoundError, PermissionError):  # gone already / another user's
        pass


def sweep_dead_segments() -> list[str]:
    """Unlink every lmdisagg segment whose owner process is gone. Returns their names."""
    swept = []
    for name in os.listdir(SHM_DIR):
        owner = name.startswith(PREFIX) and segment_owner(name)
        if owner and not alive(HOSTNAME, *owner):
            unlink(name)
            swept.append(name)
    return swept


class ShmTransfer(Transfer):
    """Copies pieces from a mapped source segment; run inline or on the transport's worker."""

    on_peer_lost = None  # set by the transport: drop the dead peer's mapping and segment
    stream = None        # CUDA destinations: (the transport's copy stream, an event on the caller's stream)

    def run(self, src: torch.Tensor, pieces: list[tuple[int, int, int]]) -> None:
        b = self.desc.buffer
        try:
            self._start()
            with torch.cuda.stream(self.stream[0]) if self.stream else contextlib.nullcontext():
                if self.stream:
                    self.stream[0].wait_event(self.stream[1])  # after the caller's queued work on dst
                for i, (s, d, n) in enumerate(pieces):
                    if self.aborting:
                        return
                    if i and not self._peer_alive(b.host, b.pid, b.pid_start, True):
                        self._fail(PeerLostError(f"source process {b.pid} ({b.agent}) died during the transfer"))
                        return
                    self._copy(src, s, d, n)
                    self.bytes_done += n
            self._sync()
            self._landed()
        except Exception as e:  # a medium error must end as FAILED, never escape into a thread
            self._fail(TransferError(f"shm copy from {b.agent} failed: {e!r}"))
        finally:
            self._sync()  # copies into a GPU are queued: quiet only once they ran
            self._quiesce()
            if isinstance(self.error, PeerLostError) and self.on_peer_lost is not None:
                self.on_peer_lost()

    def _sync(self) -> None:
        if self.stream:
            self.stream[0].synchronize()

    def _copy(self, src: torch.Tensor, s: int, d: int, n: int) -> None:
        self.dst.flat[d:d + n].copy_(src[s:s + n], non_blocking=self.dst.flat.device.type == "cuda")


class ShmTransport(Transport):
    name = "shm"

    def __init__(self, *, checksum: bool = False, drain_timeout_s: float = 10.0,
                 inline_nbytes: int = 1 << 20, piece_nbytes: int = 64 << 20, workers: int = 1):
        """``inline_nbytes``: pulls up to this size copy inside ``pull`` (lowest fixed cost).
        ``piece_nbytes``: unit of progress, abort and liveness checks for larger pulls. Each piece
        is one copy call: on the 2-core VM, 64 MiB-1 GiB pulls moved at 0.67-0.82 of memcpy with
        16 MiB pieces and 0.78-0.90 with 64 MiB ones (two runs each, alternated:
        benchmarks/results/transport_cpu-2core-shm-pieces{16,64}*.json); an abort waits for at
        most one piece (~5 ms there)."""
        super().__init__(checksum=checksum, drain_timeout_s=drain_timeout_s)
        self.inline_nbytes = inline_nbytes
        self.piece_nbytes = piece_nbytes
        self._owned: dict[str, Segment] = {}   # segments this process created
        self._peers: dict[str, Segment] = {}   # peers' segments mapped here, by name
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"lmdisagg-{self.name}")
        self._streams: dict[int, torch.cuda.Stream] = {}  # CUDA device -> the stream copies into it run on
        sweep_dead_segments()

    # --- memory --------------------------------------------------------------------------------
    def allocate(self, shape, dtype, device) -> torch.Tensor:
        """A zeroed tensor inside a new segment (CPU), so peers read the engine's cache directly."""
        device = torch.device(device)
        if device.type != "cpu":
            return super().allocate(shape, dtype, device)
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        seg = Segment(segment_name(*self._ident), nbytes, create=True)
        with self._lock:
            self._owned[seg.name] = seg
        return seg.flat.view(dtype).view(tuple(shape))

    def _register(self, buf: Buffer, buffer_id: int) -> tuple[str, bytes]:
        with self._lock:
            for seg in self._owned.values():
                off = seg.contains(buf.flat)
                if off is not None:
                    return seg.name, msgpack.packb(off)
        # not ours: a mirror segment, created on the first describe (a pure destination needs none)
        buf.state["mirror"] = segment_name(*self._ident)
        return buf.state["mirror"], msgpack.packb(0)

    def _prepare(self, buf: Buffer, block_ids, block_nbytes) -> None:
        name = buf.state.get("mirror")
        if name is None:
            return
        with self._lock:
            seg = self._owned.get(name)
            if seg is None:
                seg = self._owned[name] = Segment(name, buf.desc.nbytes, create=True)
            if buf.flat.device.type == "cuda":
                seg.pin()
        for s, _, n in byte_runs(block_ids, block_ids, block_nbytes):
            seg.flat[s:s + n].copy_(buf.flat[s:s + n])  # D2H for CUDA caches (synchronous)

    def _deregister(self, buf: Buffer) -> None:
        name = buf.state.get("mirror")
        with self._lock:
            seg = self._owned.pop(name, None) if name else None
        if seg is not None:
            unlink(seg.name)
            seg.unmap()

    # --- pulls -----------------------------------------------------------------------------------
    def _open(self, desc: ChunkDesc) -> Segment:
        name = desc.buffer.address
        with self._lock:
            seg = self._peers.get(name)
            if seg is not None:
                return seg
            for old in [n for n, s in self._peers.items() if not _owner_alive(n)]:
                self._peers.pop(old).unmap()  # a dead peer's memory: let it go
                unlink(old)
            seg = self._peers[name] = Segment(name, 0, create=False)
            return seg

    def _forget(self, name: str) -> None:
        with self._lock:
            seg = self._peers.pop(name, None)
        if seg is not None:
            seg.unmap()
        unlink(name)  # only called once its owner is known dead

    def _pull(self, desc: ChunkDesc, dst: Buffer, dst_blocks: tuple[int, ...]) -> Transfer:
        b = desc.buffer
        if not self.peer_alive(b.host, b.pid, b.pid_start):
            self._forget(b.address)
            return failed_transfer(desc, dst, dst_blocks, PeerLostError(
                f"source process {b.pid} ({b.agent}) is gone"))
        try:
            seg = self._open(desc)
        except FileNotFoundError:
            return failed_transfer(desc, dst, dst_blocks, PeerLostError(
                f"shared memory segment {b.address} of {b.agent} is gone (peer closed or died)"))
        except ValueError:  # an empty file cannot be mapped
            return failed_transfer(desc, dst, dst_blocks, TransferCorruptError(
                f"shared memory segment {b.address} of {b.agent} is empty (truncated)"))
        base = msgpack.unpackb(b.handle)
        runs = byte_runs(desc.block_ids, dst_blocks, desc.block_nbytes)
        end = base + max(s + n for s, _, n in runs)
        if end > seg.nbytes or base + b.nbytes > seg.nbytes:
            return failed_transfer(desc, dst, dst_blocks, TransferCorruptError(
                f"segment {b.address} holds {seg.nbytes} bytes; the descriptor needs {max(end, base + b.nbytes)} "
                f"(truncated)"))
        if dst.flat.device.type == "cuda":
            with self._lock:
                seg.pin()
        src = seg.flat[base:]
        pieces = list(split_runs(runs, self.piece_nbytes))
        t = self._new_transfer(desc, dst, dst_blocks)
        t.on_peer_lost = lambda: self._forget(b.address)
        if dst.flat.device.type == "cuda":  # copies go on a stream of ours, ordered after the caller's
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(dst.flat.device))
            t.stream = (self._copy_stream(dst.flat.device), after)
        if desc.nbytes <= self.inline_nbytes:
            t.run(src, pieces)
        else:
            self._pool.submit(t.run, src, pieces)
        return t

    def _copy_stream(self, device: torch.device) -> "torch.cuda.Stream":
        with self._lock:
            stream = self._streams.get(device.index)
            if stream is None:
                stream = self._streams[device.index] = torch.cuda.Stream(device)
            return stream

    def _new_transfer(self, desc, dst, dst_blocks) -> ShmTransfer:
        return ShmTransfer(desc, dst, dst_blocks, self.peer_alive)

    def _close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        with self._lock:
            owned, peers = list(self._owned.values()), list(self._peers.values())
            self._owned.clear()
            self._peers.clear()
        for seg in owned:
            unlink(seg.name)
            seg.unmap()
        for seg in peers:
            seg.unmap()


def _owner_alive(name: str) -> bool:
    owner = segment_owner(name)
    return owner is not None and alive(HOSTNAME, *owner)
