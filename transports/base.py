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

Media with ``supports_push`` (two-sided ones: nccl) can also push, the destination posting its
receives before the source has the bytes (as SGLang's and Mooncake's decode sides reserve
blocks before the prefill runs)::

    source                                         destination
    ------                                         -----------
                                                   blocks = engine.reserve_chunks(keys)
                                     ◀──ticket──   x = tx.expect(src.desc, dst, blocks, nbytes)
    y = tx.push(ticket, src, ids)  # after queueing the work that writes ids
    y.wait(timeout)  # the bytes left               x.wait(timeout)  # the bytes landed

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
import itertools
import logging
import threading
import weakref
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

import msgpack

from lmdisagg.transports._blocks import check_blocks
from lmdisagg.transports._proc import HOSTNAME, ProcWatch, self_identity
from lmdisagg.transports.transfer import (  # re-exported: the whole interface is importable from here
    PeerLostError, Transfer, TransferAbortedError, TransferCorruptError, TransferError, TransferState,
    TransferTimeoutError, failed_transfer,
)

if TYPE_CHECKING:  # torch is imported by the transports that need it, never by this module
    import torch

__all__ = [
    "Buffer", "BufferDesc", "ChunkDesc", "PeerLostError", "PushTicket", "Transfer", "TransferAbortedError",
    "TransferCorruptError", "TransferError", "TransferState", "TransferTimeoutError", "Transport",
    "failed_transfer",
]


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


@dataclass(frozen=True)
class PushTicket:
    """What a source needs to push into blocks a destination is expecting (``Transport.expect``).
    Plain values: it travels in any message, as descriptors do."""

    source_agent: str              # the transport that must push (it checks it is addressed)
    dest_agent: str
    link: int                      # the destination's connection to the source (an epoch)
    seq: int                       # pushes of one link land in seq order
    tag: int                       # medium-specific match key of the first piece
    block_nbytes: int
    sizes: tuple[int, ...]         # bytes of each piece the destination posted, in order
    checksum: bool = False         # the source sends xxh3 of its blocks; the destination checks

    @property
    def nblocks(self) -> int:
        return sum(self.sizes) // self.block_nbytes

    def pack(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> "PushTicket":
        d = msgpack.unpackb(data, raw=False)
        return cls(**{**d, "sizes": tuple(d["sizes"])})


@dataclass(eq=False)
class Buffer:
    """A local registration (never sent): the descriptor peers see plus the memory itself."""

    desc: BufferDesc
    flat: "torch.Tensor"  # [nbytes] uint8 view of the registered tensor (CPU or CUDA)
    state: dict = field(default_factory=dict)  # the transport's private bookkeeping


# --- the transport -----------------------------------------------------------------------------
_agents = itertools.count()


class Transport(abc.ABC):
    """One medium. One instance per worker process; thread-safe for describe / pull.

    Implementations provide ``_register`` (make memory reachable by peers), ``_pull`` (start
    moving bytes; return a Transfer at once) and ``_close``; ``_prepare`` runs in ``describe``
    before checksums are taken (staging copies, stream syncs)."""

    name: ClassVar[str]
    supports_push: bool = False  # expect / push (two-sided media whose receiver can post first)
    why_no_push = "its destinations pull"

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
        ids = check_blocks(block_ids, block_nbytes, buf.desc.nbytes, "describe")
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
        Raises TransferError only for misuse: closed transport, foreign descriptor, bad ids.
        CUDA destinations: the bytes land after the work queued on the caller's current stream
        (of ``dst``'s device) when ``pull`` is called, and wait for no other stream; once DONE
        they are visible to any stream. A medium may queue the copies on that stream itself
        (cuda_ipc does), so work queued on it after ``pull`` may wait for them. A caller whose
        blocks have no queued work (a decode worker's freshly claimed blocks) pulls from an idle
        stream of its own, so that the copy neither waits for the engine's steps nor holds them up."""
        self._check_open()
        if desc.buffer.transport != self.name:
            raise TransferError(f"descriptor from transport {desc.buffer.transport!r} "
                                f"given to {self.name!r}")
        ids = check_blocks(dst_block_ids, desc.block_nbytes, dst.desc.nbytes, "pull (destination)")
        if len(ids) != len(desc.block_ids):
            raise TransferError(f"pull: {len(desc.block_ids)} source blocks but {len(ids)} destination blocks")
        if desc.checksums and len(desc.checksums) != len(desc.block_ids):
            raise TransferError("pull: descriptor has a checksum count that does not match its blocks")
        if not ids:  # nothing to move: DONE now (if the source lives), on every medium
            t = Transfer(desc, dst, ids, self.peer_alive)
            t._landed()
            t._quiesce()
            return t
        t = self._pull(desc, dst, ids)
        t.drain_timeout_s = self.drain_timeout_s
        self._live.add(t)
        return t

    # --- push: the destination posts first, the source sends when its bytes are ready ------------
    def expect(self, source: BufferDesc, dst: Buffer, dst_block_ids: Sequence[int], block_nbytes: int,
               checksum: bool | None = None) -> Transfer:
        """Get ready to receive ``len(dst_block_ids)`` blocks that the transport of ``source`` (a
        registered buffer's descriptor: it names the peer) will push, before that peer has them.
        Returns a PENDING transfer at once (FAILED, with no ticket, if that peer is known dead);
        hand ``transfer.ticket`` (a ``PushTicket``) to the source, whose ``push`` sends the bytes. DONE, FAILED, ``wait``, ``abort`` and the CUDA
        stream order are as for ``pull``; an abort tells the source, and returns once nothing
        more lands. Pushes between two transports land in the order of their ``expect`` calls: a
        push whose turn has not come waits on the source until the earlier ones are pushed or
        aborted. ``checksum``: the source sends xxh3 of every block, checked on arrival (default:
        this transport's setting). Media without ``supports_push`` raise TransferError."""
        self._check_open()
        if not self.supports_push:
            raise TransferError(f"transport {self.name!r} cannot push: {self.why_no_push}")
        if source.transport != self.name:
            raise TransferError(f"expect: source from transport {source.transport!r} given to {self.name!r}")
        ids = check_blocks(dst_block_ids, block_nbytes, dst.desc.nbytes, "expect (destination)")
        if not ids:
            raise TransferError("expect: no destination blocks")
        t = self._expect(source, dst, ids, block_nbytes, self.checksum if checksum is None else checksum)
        t.drain_timeout_s = self.drain_timeout_s
        self._live.add(t)
        return t

    def push(self, ticket: "PushTicket | bytes", src: Buffer, block_ids: Sequence[int]) -> Transfer:
        """Send blocks of ``src`` into the blocks a destination is expecting (its ``expect``'s
        ticket, as a PushTicket or packed bytes). Returns at once; the transfer is DONE once
        every byte has left (the destination's own transfer says when they landed), FAILED if
        the destination aborted that expectation or was lost. CUDA sources: the bytes are read
        after the work queued on the caller's current stream when ``push`` is called. Raises
        TransferError only for misuse: a ticket for another transport, a block count other than
        the one expected, bad ids."""
        self._check_open()
        if not self.supports_push:
            raise TransferError(f"transport {self.name!r} cannot push: {self.why_no_push}")
        if isinstance(ticket, (bytes, bytearray)):
            ticket = PushTicket.unpack(bytes(ticket))
        if ticket.source_agent != self.agent:
            raise TransferError(f"push: the ticket is for {ticket.source_agent}, not {self.agent}")
        if self._buffers.get(src.desc.buffer_id) is not src:
            raise TransferError(f"push: buffer {src.desc.buffer_id} is not registered with {self.agent}")
        ids = check_blocks(block_ids, ticket.block_nbytes, src.desc.nbytes, "push (source)")
        if len(ids) != ticket.nblocks:
            raise TransferError(f"push: {len(ids)} source blocks but the destination expects {ticket.nblocks}")
        t = self._push(ticket, src, ids)
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

    def _expect(self, source: BufferDesc, dst: Buffer, dst_blocks: tuple[int, ...], block_nbytes: int,
                checksum: bool) -> Transfer:
        raise NotImplementedError  # supports_push media

    def _push(self, ticket: PushTicket, src: Buffer, block_ids: tuple[int, ...]) -> Transfer:
        raise NotImplementedError

    def _deregister(self, buf: Buffer) -> None:
        pass

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"transport {self.agent} is closed")


def warn_torch_path(medium: str, why: str, cost: str) -> None:
    """A CUDA medium left on ``runtime="auto"`` found no cupy and launches through torch: say so,
    with the cost and the fix, instead of falling back silently (slow paths nobody noticed are
    what users of other KV connectors trip on). Choosing ``runtime="torch"`` says nothing."""
    import torch
    cuda = torch.version.cuda
    extra = (f"'lmdisagg[cu{cuda.split('.')[0]}]' (cupy for torch's CUDA {cuda})" if cuda
             else "'lmdisagg[cu12]' or 'lmdisagg[cu13]' (cupy matching torch's CUDA)")
    logging.getLogger(__name__).warning(
        "%s: %s, so it launches through torch (runtime='torch'): %s. pip install %s for the cupy "
        "path, or pass runtime='torch' to choose this one", medium, why, cost, extra)


def _uint8():
    import torch
    return torch.uint8
