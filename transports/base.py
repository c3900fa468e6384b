"""The transport interface: how KV chunks move between workers, on any medium.

Lifecycle of one pull (source = the prefill worker that holds the chunks, destination = the
decode worker that wants them; ``desc`` travels between them in any message, it is small and
picklable / msgpack-able)::

    source                                         destination
    ------                                         -----------
    tx = create_transport("shm")                   tx = create_transport("shm")
    engine = Engine(..., kv_allocator=tx.allocate) # optional: the cache lives in the medium
    src = tx.register(engine.kv_buffer)            dst = tx.register(engine.kv_buffer)
    ids = engine.pin_chunks(keys)
    desc = tx.describe(src, ids, layout.chunk_nbytes)  ──desc──▶
                                                   blocks = engine.reserve_chunks(keys)
                                                   x = tx.pull(desc, dst, [blocks[k] for k in keys])
                                                   x.wait(timeout)       # or x.poll() in a loop
                                                   engine.commit_chunks(blocks)   # DONE
                                                   engine.release_reserved(blocks) # TransferError
    engine.unpin_chunks(ids)  ◀──"done"──
    tx.close()                                     tx.close()

A transfer is a small state machine (like SGLang's KVPoll)::

    PENDING ──▶ TRANSFERRING ──▶ DONE
       │              │
       └──────────────┴──▶ FAILED   (.error: a TransferError; also after abort() or a wait timeout)

DONE means every byte landed in the destination blocks, the source process was alive until then
(same-node peers are checked by pid; remote ones by the medium), and, with ``checksum=True``, every
block matched the xxh3 checksum taken by ``describe``. FAILED is final and says why; after FAILED
(or abort) the medium no longer writes into the destination blocks, so the caller may release them.
Nothing blocks without a timeout, and no failure is silent.

Transports move bytes of registered buffers, addressed as (buffer, block ids, bytes per block):
block b is at byte offset ``b * block_nbytes``. They never know what the bytes mean.
"""
from __future__ import annotations

import abc
import enum
import itertools
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

import msgpack

from lmdisagg.errors import LmdisaggError, TimeoutError_
from lmdisagg.transports._proc import HOSTNAME, ProcWatch, alive, self_identity

if TYPE_CHECKING:  # torch is imported by the transports that need it, never by this module
    import torch


# --- states and errors -------------------------------------------------------------------------
class TransferState(enum.Enum):
    PENDING = "pending"            # accepted; connecting / waiting for the medium
    TRANSFERRING = "transferring"  # bytes are moving
    DONE = "done"                  # every byte landed (and matched its checksum)
    FAILED = "failed"              # final; Transfer.error says why

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


class TransferError(LmdisaggError):
    """A KV transfer failed. The caller falls back deliberately (recompute, another peer)."""

    status = 502
    type = "kv_transfer_error"
    # True when abort could not make the medium stop (a hung peer on a medium that cannot cancel):
    # the destination blocks may still be written, so the caller must not reuse them
    quarantine: bool = False


class TransferTimeoutError(TransferError, TimeoutError_):
    """``wait(timeout)`` ran out; the transfer was aborted."""

    status = 504
    type = "timeout"


class TransferAbortedError(TransferError):
    status = 499
    type = "aborted"


class PeerLostError(TransferError):
    """The source process died or its connection broke before every byte landed."""


class TransferCorruptError(TransferError):
    """Bytes arrived but are not the ones described: checksum mismatch, truncated or
    out-of-range source."""


# --- descriptors (what peers exchange) -----------------------------------------------------------
@dataclass(frozen=True)
class BufferDesc:
    """A registered buffer as a peer sees it. Plain values only: picklable and msgpack-able."""

    transport: str       # registry name of the transport that registered it ("shm", "nccl", ...)
    agent: str           # the registering transport instance, unique across the cluster
    buffer_id: int       # id of the buffer within that agent
    nbytes: int          # size of the registered memory
    address: str         # where the medium finds it: shm segment, "host:port", ...
    handle: bytes        # medium-specific opaque bytes (e.g. a CUDA IPC handle), may be b""
    host: str            # hostname of the owner process
    pid: int             # owner process, with its start time: liveness checks on the same host
    pid_start: int


@dataclass(frozen=True)
class ChunkDesc:
    """Blocks of a registered buffer, to be pulled by a peer. Made by ``Transport.describe``."""

    buffer: BufferDesc
    block_ids: tuple[int, ...]    # block b = bytes [b * block_nbytes, (b + 1) * block_nbytes)
    block_nbytes: int
    checksums: tuple[int, ...] = ()  # xxh3_64 per block (same order), () = unchecked

    @property
    def nbytes(self) -> int:
        return len(self.block_ids) * self.block_nbytes

    def pack(self) -> bytes:
        d = asdict(self)
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> "ChunkDesc":
        d = msgpack.unpackb(data, raw=False)
        return cls(BufferDesc(**d["buffer"]), tuple(d["block_ids"]), d["block_nbytes"],
                   tuple(d["checksums"]))


@dataclass(eq=False)
class Buffer:
    """A local registration (never sent): the descriptor peers see plus the memory itself."""

    desc: BufferDesc
    flat: "torch.Tensor"  # [nbytes] uint8 view of the registered tensor (CPU or CUDA)
    state: dict = field(default_factory=dict)  # the transport's private bookkeeping


# --- one transfer ------------------------------------------------------------------------------
class Transfer:
    """One pull of ``desc`` into ``dst_blocks`` of ``dst``. Made by ``Transport.pull``.

    ``poll``, ``wait`` and ``abort`` may be called from any thread. Implementations drive the
    state with ``_start`` / ``_landed`` / ``_fail`` and either run a worker (it calls ``_quiesce``
    when it stops touching the destination) or override ``_progress`` (polled media)."""

    drain_timeout_s = 10.0  # abort(): longest wait for the medium to stop (set by the transport)
    spin_s = 0.0  # polled media: wait() polls without sleeping this long first (timed sleeps
    #               cost ~60 µs of latency each; worker-driven media wake wait() directly)

    def __init__(self, desc: ChunkDesc, dst: Buffer, dst_blocks: tuple[int, ...], peer_alive=alive):
        self.desc = desc
        self.dst = dst
        self.dst_blocks = dst_blocks
        self.nbytes = desc.nbytes
        self.bytes_done = 0  # progress, updated by the medium (read-only for callers)
        self.error: TransferError | None = None
        self._state = TransferState.PENDING
        self._cond = threading.Condition()
        self._aborting = False   # set by abort(): media check it between pieces
        self._quiet = False      # set when the medium no longer touches dst
        self._peer_alive = peer_alive  # (host, pid, start) -> bool

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self._state.value} {self.bytes_done}/{self.nbytes}B "
                f"from {self.desc.buffer.agent}>")

    @property
    def state(self) -> TransferState:
        return self._state

    @property
    def aborting(self) -> bool:
        return self._aborting

    def poll(self) -> TransferState:
        """Non-blocking: advance the medium if it is polled, return the state."""
        if not self._state.terminal:
            self._progress()
        return self._state

    def wait(self, timeout: float) -> None:
        """Block until DONE (return) or FAILED (raise its TransferError). After ``timeout``
        seconds the transfer is aborted and ``TransferTimeoutError`` raised."""
        now = time.monotonic()
        deadline, spin_until = now + timeout, now + self.spin_s
        delay = 0.0
        while True:
            st = self.poll()
            if st is TransferState.DONE:
                return
            if st is TransferState.FAILED:
                raise self.error
            now = time.monotonic()
            if now < spin_until:
                time.sleep(0)  # yield the GIL to the process's other threads
                continue
            left = deadline - now
            if left <= 0:
                self._stop(TransferTimeoutError(
                    f"KV transfer from {self.desc.buffer.agent} timed out after {timeout:.3g}s "
                    f"({self.bytes_done}/{self.nbytes} bytes)"))
                continue
            with self._cond:
                if not self._state.terminal:
                    self._cond.wait(min(left, delay))
            delay = min(max(2 * delay, 2e-5), 2e-3)

    def abort(self) -> None:
        """Fail the transfer now (no-op once terminal). Returns once the medium has stopped
        writing into the destination blocks, so the caller may release them."""
        self._stop(TransferAbortedError(f"KV transfer from {self.desc.buffer.agent} aborted"))

    # --- for implementations ---------------------------------------------------------------------
    def _progress(self) -> None:
        """Polled media advance here (called by poll); worker-driven media need nothing."""

    def _cancel(self) -> bool:
        """Stop the medium; return True once it no longer writes into dst, False if it did not
        stop within ``drain_timeout_s``. Default: wait for the worker to call ``_quiesce``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._quiet, self.drain_timeout_s)

    def _stop(self, err: TransferError) -> None:
        with self._cond:
            if self._state.terminal:
                return
            self._aborting = True
            self._cond.notify_all()
        if not self._cancel():
            err.quarantine = True
            err.message = err.args[0] + (f"; the medium did not stop within {self.drain_timeout_s}s, "
                                         f"so the destination blocks must not be reused")
            err.args = (err.message,)
        self._fail(err)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless aborted; True if aborted (for media that pace or back off)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._aborting, seconds)

    def _set(self, state: TransferState, error: TransferError | None = None) -> bool:
        with self._cond:
            if self._state.terminal:
                return False
            self._state = state
            self.error = error
            self._cond.notify_all()
            return True

    def _start(self) -> None:
        self._set(TransferState.TRANSFERRING)

    def _fail(self, err: TransferError) -> None:
        self._set(TransferState.FAILED, err)

    def _quiesce(self) -> None:
        with self._cond:
            self._quiet = True
            self._cond.notify_all()

    def _landed(self) -> None:
        """Every byte is in dst: check the source was alive throughout, then the checksums."""
        b = self.desc.buffer
        if not self._peer_alive(b.host, b.pid, b.pid_start, self.nbytes >= 1 << 20):
            self._fail(PeerLostError(f"source process {b.pid} ({b.agent}) died during the transfer"))
            return
        if self.desc.checksums:
            from lmdisagg.transports._blocks import block_checksums
            got = block_checksums(self.dst.flat, self.dst_blocks, self.desc.block_nbytes)
            for i, (want, have) in enumerate(zip(self.desc.checksums, got)):
                if want != have:
                    self._fail(TransferCorruptError(
                        f"block {self.desc.block_ids[i]} from {b.agent} arrived corrupt "
                        f"(xxh3 {have:016x}, expected {want:016x})"))
                    return
        self.bytes_done = self.nbytes
        self._set(TransferState.DONE)


# --- the transport -----------------------------------------------------------------------------
_agents = itertools.count()


class Transport(abc.ABC):
    """One medium. One instance per worker process; thread-safe for describe / pull.

    Implementations provide ``_register`` (make memory reachable by peers), ``_pull`` (start
    moving bytes; return a Transfer at once) and ``_close``; ``_prepare`` runs in ``describe``
    before checksums are taken (staging copies, stream syncs)."""

    name: ClassVar[str]

    def __init__(self, *, checksum: bool = False, drain_timeout_s: float = 10.0):
        self.checksum = checksum  # describe() takes xxh3 of every block; pulls verify them
        self.drain_timeout_s = drain_timeout_s  # abort: longest wait for the medium to stop
        pid, start = self_identity()
        self._ident = (pid, start)
        self.agent = f"{self.name}-{HOSTNAME}-{pid}-{next(_agents)}"
        self._buffers: dict[int, Buffer] = {}
        self._buffer_ids = itertools.count()
        self._live: weakref.WeakSet[Transfer] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        self._watch = ProcWatch()  # liveness of same-node peers (one pidfd each)

    def peer_alive(self, host: str, pid: int, start: int, strict: bool = False) -> bool:
        return self._watch.alive(host, pid, start, strict)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- memory --------------------------------------------------------------------------------
    def allocate(self, shape: tuple[int, ...], dtype: "torch.dtype", device) -> "torch.Tensor":
        """A zeroed contiguous tensor in memory this medium moves best; fits
        ``Engine(kv_allocator=transport.allocate)``. Default: ordinary memory (on CPU calloc'd,
        so pages are zeroed lazily, as the engine's own allocator does)."""
        import numpy as np
        import torch
        device = torch.device(device)
        if device.type != "cpu":
            return torch.zeros(tuple(shape), dtype=dtype, device=device)
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(tuple(shape))

    def register(self, tensor: "torch.Tensor") -> Buffer:
        """Make a contiguous tensor (typically ``engine.kv_buffer``) reachable by peers: as a
        source to describe, as a destination to pull into. Call once per buffer, at startup."""
        self._check_open()
        if not tensor.is_contiguous():
            raise TransferError("register: the tensor must be contiguous")
        flat = tensor.reshape(-1).view(_uint8())
        with self._lock:
            buffer_id = next(self._buffer_ids)
        buf = Buffer(None, flat)  # type: ignore[arg-type]
        address, handle = self._register(buf, buffer_id)
        buf.desc = BufferDesc(self.name, self.agent, buffer_id, flat.numel(), address, handle,
                              HOSTNAME, *self._ident)
        with self._lock:
            self._buffers[buffer_id] = buf
        return buf

    def deregister(self, buf: Buffer) -> None:
        with self._lock:
            self._buffers.pop(buf.desc.buffer_id, None)
        self._deregister(buf)

    # --- source side -----------------------------------------------------------------------------
    def describe(self, buf: Buffer, block_ids: Sequence[int], block_nbytes: int,
                 checksum: bool | None = None) -> ChunkDesc:
        """Name blocks of a registered buffer for a peer to pull. Blocks until the bytes are
        ready to be read (staging copies, device syncs). The caller keeps the blocks unchanged
        (pinned) until the peer reports its transfer finished. ``checksum`` overrides the
        transport's default for this descriptor (the puller verifies whatever it carries)."""
        self._check_open()
        ids = tuple(int(b) for b in block_ids)
        _check_blocks(ids, block_nbytes, buf.desc.nbytes, "describe")
        self._prepare(buf, ids, block_nbytes)
        sums = ()
        if self.checksum if checksum is None else checksum:
            from lmdisagg.transports._blocks import block_checksums
            sums = block_checksums(buf.flat, ids, block_nbytes)
        return ChunkDesc(buf.desc, ids, block_nbytes, sums)

    # --- destination side ------------------------------------------------------------------------
    def pull(self, desc: ChunkDesc, dst: Buffer, dst_block_ids: Sequence[int]) -> Transfer:
        """Start copying ``desc``'s blocks into ``dst_block_ids`` of ``dst`` (same order).
        Returns at once (small copies may already be DONE); medium failures show as FAILED.
        Raises TransferError only for misuse: closed transport, foreign descriptor, bad ids."""
        self._check_open()
        if desc.buffer.transport != self.name:
            raise TransferError(f"descriptor from transport {desc.buffer.transport!r} "
                                f"given to {self.name!r}")
        ids = tuple(int(b) for b in dst_block_ids)
        if len(ids) != len(desc.block_ids):
            raise TransferError(f"pull: {len(desc.block_ids)} source blocks but {len(ids)} destination blocks")
        _check_blocks(ids, desc.block_nbytes, dst.desc.nbytes, "pull (destination)")
        if desc.checksums and len(desc.checksums) != len(desc.block_ids):
            raise TransferError("pull: descriptor has a checksum count that does not match its blocks")
        t = self._pull(desc, dst, ids)
        t.drain_timeout_s = self.drain_timeout_s
        self._live.add(t)
        return t

    def close(self) -> None:
        """Abort in-flight transfers, then release every resource (segments, handles, sockets,
        threads). Idempotent. Buffers the engine still uses stay valid memory."""
        if self._closed:
            return
        self._closed = True
        for t in list(self._live):
            t.abort()
        self._close()
        self._buffers.clear()
        self._watch.close()

    # --- hooks -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def _register(self, buf: Buffer, buffer_id: int) -> tuple[str, bytes]:
        """Return (address, handle) for the BufferDesc."""

    @abc.abstractmethod
    def _pull(self, desc: ChunkDesc, dst: Buffer, dst_blocks: tuple[int, ...]) -> Transfer: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def _prepare(self, buf: Buffer, block_ids: tuple[int, ...], block_nbytes: int) -> None:
        pass

    def _deregister(self, buf: Buffer) -> None:
        pass

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"transport {self.agent} is closed")


def _check_blocks(ids: tuple[int, ...], block_nbytes: int, nbytes: int, what: str) -> None:
    if block_nbytes <= 0:
        raise TransferError(f"{what}: block_nbytes must be positive")
    for b in ids:
        if b < 0 or (b + 1) * block_nbytes > nbytes:
            raise TransferError(f"{what}: block {b} of {block_nbytes} bytes lies outside the "
                                f"{nbytes}-byte buffer")


def _uint8():
    import torch
    return torch.uint8


def failed_transfer(desc: ChunkDesc, dst: Buffer, dst_blocks: tuple[int, ...], err: TransferError) -> Transfer:
    """A transfer that is FAILED from the start (the medium refused it before any byte moved)."""
    t = Transfer(desc, dst, dst_blocks)
    t._fail(err)
    t._quiesce()
    return t
