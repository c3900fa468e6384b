"""The Mooncake transfer engine: one-sided reads over TCP (here, CI) or RDMA (production).

    MooncakeTransport(protocol="tcp")    # "rdma" with device_name="mlx5_0,..." on real NICs

Each transport owns one ``mooncake.engine.TransferEngine`` with P2P-handshake metadata (no etcd
or metadata server): a peer is named by the engine's "host:rpc_port" session, which goes into the
BufferDesc together with the buffer's virtual address. ``register`` registers the whole buffer
once (``register_memory``); a pull submits one async read batch per piece
(``batch_transfer_async_read``) and ``poll`` checks each with ``transfer_check_status``, which
frees the batch once it completed or failed.

Mooncake cannot cancel a submitted batch: ``abort`` marks the transfer FAILED and returns once
every submitted piece has completed or failed (a dead peer fails them at once on TCP).
The engine listens on all interfaces; lmdisagg names itself 127.0.0.1 by default and sends only
to the sessions in descriptors it is given.
"""
from __future__ import annotations

import threading
import time

import msgpack

from lmdisagg.transports._blocks import byte_runs, split_runs
from lmdisagg.transports.base import (
    Buffer, ChunkDesc, PeerLostError, Transfer, TransferError, Transport, _uint8, failed_transfer,
)

_DONE, _PENDING, _FAILED, _TIMEOUT = 1, 0, -1, -2  # transfer_check_status results


def _engine_class():
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise TransferError(
            f"the mooncake transport needs the Mooncake transfer engine: "
            f"pip install 'lmdisagg[mooncake]' (mooncake-transfer-engine-non-cuda; it links "
            f"libibverbs1 even for TCP). Import failed with: {e}") from e
    return TransferEngine


class MooncakeTransfer(Transfer):
    """Submitted pieces, polled by whoever calls poll()/wait(). ``_cond`` guards the batch ids:
    the binding frees a batch once it reports it finished, so each id is checked until then only."""

    spin_s = 2e-4  # a small read over loopback TCP takes ~100 µs

    def __init__(self, desc, dst, dst_blocks, peer_alive, te):
        super().__init__(desc, dst, dst_blocks, peer_alive)
        self._te = te
        self._pending: dict[int, int] = {}  # batch id -> bytes
        self._error: TransferError | None = None  # first failure; reported once all pieces ended
        self._quiet = True

    def connect(self, te, scratch: int, src_addr: int) -> bool:
        """First contact with a session: the P2P handshake happens inside Mooncake's first read
        (blocking, up to its handshake timeout for a hung peer), so read 1 byte into a scratch
        buffer, never into dst. Runs on a helper thread; False if the transfer FAILED."""
        session = self.desc.buffer.address
        bid = te.batch_transfer_async_read(session, [scratch], [src_addr], [1])
        st = _FAILED
        while bid and (st := te.transfer_check_status(bid)) == _PENDING and not self._aborting:
            time.sleep(1e-3)
        if bid and st == _DONE:
            return True
        self._fail(PeerLostError(f"Mooncake handshake with {session} ({self.desc.buffer.agent}) failed"))
        self._te = None
        return False

    def submit(self, pieces: list[tuple[int, int, int]]) -> None:
        """Submit (dst address, src address, nbytes) reads; non-blocking once the session is known."""
        session = self.desc.buffer.address
        with self._mu:
            if self._aborting or self._state.terminal:
                return
            for dst_addr, src_addr, n in pieces:
                bid = self._te.batch_transfer_async_read(session, [dst_addr], [src_addr], [n])
                if bid == 0:
                    self._error = PeerLostError(f"Mooncake could not submit a read from {session}")
                    break
                self._pending[bid] = n
                self._quiet = False
            if self._pending:
                self._start()
            else:
                self._fail(self._error)
                self._te = None

    def _check(self) -> None:
        """Check every pending batch once; keep the first failure. A dead same-node source ends
        the wait at once: Mooncake may never report reads from it (seen with TCP)."""
        for bid, n in list(self._pending.items()):
            st = self._te.transfer_check_status(bid)
            if st == _PENDING:
                continue
            if st == _TIMEOUT:  # not freed by the binding: keep polling until it fails for good
                self._error = self._error or PeerLostError(f"Mooncake read from {self.desc.buffer.address} timed out")
                continue
            del self._pending[bid]
            if st == _DONE:
                self.bytes_done += n
            else:
                self._error = self._error or PeerLostError(
                    f"Mooncake read from {self.desc.buffer.address} failed (peer died or closed, or "
                    f"the range is not registered there)")
        b = self.desc.buffer
        if self._pending and not self._peer_alive(b.host, b.pid, b.pid_start):
            self._pending.clear()  # abandoned: nobody is left to write into dst
            self._error = PeerLostError(f"source process {b.pid} ({b.agent}) died during the transfer")
        if not self._pending:
            self._quiet = True
            self._cond.notify_all()

    def _progress(self) -> None:
        with self._mu:
            if self._state.terminal or not self._pending:
                return
            self._check()
            if self._pending:
                return
            if self._error is not None:
                self._fail(self._error)  # only once nothing more can land
            else:
                self._landed()
            self._te = None  # let close() free the engine even if callers keep this object

    def _cancel(self) -> bool:
        deadline = time.monotonic() + self.drain_timeout_s
        with self._mu:
            while self._pending and time.monotonic() < deadline:
                self._check()
                if self._pending:
                    self._cond.wait(1e-3)
            if self._pending:
                return False  # a hung peer: Mooncake keeps the reads; quarantine the blocks
            self._te = None
            return True


class MooncakeTransport(Transport):
    name = "mooncake"

    def __init__(self, *, protocol: str = "tcp", hostname: str = "127.0.0.1",
                 metadata_server: str = "P2PHANDSHAKE", device_name: str = "",
                 checksum: bool = False, drain_timeout_s: float = 10.0, piece_nbytes: int = 16 << 20):
        """``protocol``: "tcp" or "rdma" (then ``device_name`` lists the NICs, e.g. "mlx5_0").
        ``hostname``: the name peers use to reach this engine (127.0.0.1 on one node).
        ``metadata_server``: "P2PHANDSHAKE" (no server) or an etcd/http URL."""
        super().__init__(checksum=checksum, drain_timeout_s=drain_timeout_s)
        self.protocol = protocol
        self.piece_nbytes = piece_nbytes
        self._te = _engine_class()()
        if self._te.initialize(hostname, metadata_server, protocol, device_name) != 0:
            self._te = None
            raise TransferError(f"Mooncake TransferEngine.initialize({hostname!r}, {metadata_server!r}, "
                                f"{protocol!r}, {device_name!r}) failed (see its log above)")
        self.session = f"{hostname}:{self._te.get_rpc_port()}"
        self._known: set[str] = set()  # sessions whose handshake is done
        self._scratch = self.allocate((64,), _uint8(), "cpu")  # first-contact reads land here
        if self._te.register_memory(self._scratch.data_ptr(), 64, "cpu:0") != 0:
            raise TransferError("Mooncake register_memory of a 64-byte scratch buffer failed")

    def _register(self, buf: Buffer, buffer_id: int) -> tuple[str, bytes]:
        ptr, n = buf.flat.data_ptr(), buf.flat.numel()
        location = "cpu:0" if buf.flat.device.type == "cpu" else f"cuda:{buf.flat.device.index or 0}"
        rc = self._te.register_memory(ptr, n, location)
        if rc != 0:
            raise TransferError(f"Mooncake register_memory({n} bytes at {location}) failed with {rc}")
        buf.state["ptr"] = ptr
        return self.session, msgpack.packb(ptr)

    def _deregister(self, buf: Buffer) -> None:
        self._te.unregister_memory(buf.state["ptr"])

    def _pull(self, desc: ChunkDesc, dst: Buffer, dst_blocks: tuple[int, ...]) -> Transfer:
        b = desc.buffer
        if not self.peer_alive(b.host, b.pid, b.pid_start):
            return failed_transfer(desc, dst, dst_blocks, PeerLostError(f"source process {b.pid} ({b.agent}) is gone"))
        src_base, dst_base = msgpack.unpackb(b.handle), dst.flat.data_ptr()
        runs = byte_runs(desc.block_ids, dst_blocks, desc.block_nbytes)
        pieces = [(dst_base + d, src_base + s, n) for s, d, n in split_runs(runs, self.piece_nbytes)]
        t = MooncakeTransfer(desc, dst, dst_blocks, self.peer_alive, self._te)
        if b.address in self._known:
            t.submit(pieces)
        else:  # the handshake may block: never in pull(), never into dst
            threading.Thread(target=self._first_contact, args=(t, self._te, src_base, pieces),
                             name="lmdisagg-mooncake-connect", daemon=True).start()
        return t

    def _first_contact(self, t: MooncakeTransfer, te, src_base: int, pieces) -> None:
        if t.connect(te, self._scratch.data_ptr(), src_base):
            self._known.add(t.desc.buffer.address)
            t.submit(pieces)

    def _close(self) -> None:
        for buf in list(self._buffers.values()):
            self._deregister(buf)
        self._te.unregister_memory(self._scratch.data_ptr())
        self._te = None  # the engine's destructor stops its threads and closes its sockets
