"""One transfer as a small state machine (like SGLang's KVPoll), and the ways it fails.

    PENDING ──▶ TRANSFERRING ──▶ DONE
       │              │
       └──────────────┴──▶ FAILED   (.error: a TransferError; also after abort() or a wait timeout)

States only move forward; DONE and FAILED are final. The medium drives a transfer through
``_start`` / ``_landed`` / ``_fail``; callers only ``poll``, ``wait`` and ``abort``. ``_landed``
is where every medium gets the same end checks: the source still alive (unless the medium's own
completion proves it was: ``landing_proves_source``), checksums matching.
"""
from __future__ import annotations

import enum
import os
import threading
import time
from typing import TYPE_CHECKING

from lmdisagg.errors import LmdisaggError, TimeoutError_
from lmdisagg.transports._proc import alive

if TYPE_CHECKING:
    from lmdisagg.transports.base import Buffer, ChunkDesc


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


class Transfer:
    """One pull of ``desc`` into ``dst_blocks`` of ``dst``. Made by ``Transport.pull``.

    ``poll``, ``wait`` and ``abort`` may be called from any thread. Implementations drive the
    state with ``_start`` / ``_landed`` / ``_fail`` and either run a worker (it calls ``_quiesce``
    when it stops touching the destination) or override ``_progress`` (polled media)."""

    drain_timeout_s = 10.0  # abort(): longest wait for the medium to stop (set by the transport)
    landing_proves_source = False  # the medium's completion proves the source lived until every
    #                                byte had left (two-sided media): _landed reads no liveness
    spin_s = 0.0  # polled media: wait() polls without sleeping this long first (timed sleeps
    #               cost ~60 µs of latency each; worker-driven media wake wait() directly)

    def __init__(self, desc: "ChunkDesc", dst: "Buffer", dst_blocks: tuple[int, ...], peer_alive=alive):
        self.desc = desc
        self.dst = dst
        self.dst_blocks = dst_blocks
        self.nbytes = desc.nbytes
        self.bytes_done = 0  # progress, updated by the medium (read-only for callers)
        self.error: TransferError | None = None
        self._state = TransferState.PENDING
        # plain critical sections take the lock itself: a Condition's ``with`` runs two Python
        # calls, and a finished transfer passes through several of them on its way to DONE
        self._mu = threading.RLock()
        self._cond = threading.Condition(self._mu)
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
                os.sched_yield()  # let the process's other threads have the GIL (~1 µs; a
                #                   sleep(0) sleeps the timer slack: ~50-70 µs on Linux)
                continue
            left = deadline - now
            if left <= 0:
                self._stop(TransferTimeoutError(
                    f"KV transfer from {self.desc.buffer.agent} timed out after {timeout:.3g}s "
                    f"({self.bytes_done}/{self.nbytes} bytes)"))
                continue
            with self._mu:
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
        with self._mu:
            return self._cond.wait_for(lambda: self._quiet, self.drain_timeout_s)

    def _stop(self, err: TransferError) -> None:
        with self._mu:
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
        with self._mu:
            return self._cond.wait_for(lambda: self._aborting, seconds)

    def _set(self, state: TransferState, error: TransferError | None = None) -> bool:
        with self._mu:
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
        with self._mu:
            self._quiet = True
            self._cond.notify_all()

    def _landed(self, strict: bool | None = None) -> None:
        """Every byte is in dst: check the source was alive throughout, then the checksums; DONE.
        ``strict``: also see a source that is dying but not yet gone (a /proc read, µs; default:
        for pulls from 1 MiB up, long enough for a source to start dying during them)."""
        if self._verify(strict):
            self.bytes_done = self.nbytes
            self._set(TransferState.DONE)

    def _verify(self, strict: bool | None = None) -> bool:
        """The end checks of ``_landed`` (FAILED if one fails); True if they pass."""
        b = self.desc.buffer
        if not self.landing_proves_source and not self._peer_alive(
                b.host, b.pid, b.pid_start, self.nbytes >= 1 << 20 if strict is None else strict):
            self._fail(PeerLostError(f"source process {b.pid} ({b.agent}) died during the transfer"))
            return False
        if self.desc.checksums:
            from lmdisagg.transports._blocks import block_checksums
            got = block_checksums(self.dst.flat, self.dst_blocks, self.desc.block_nbytes)
            for i, (want, have) in enumerate(zip(self.desc.checksums, got)):
                if want != have:
                    self._fail(TransferCorruptError(
                        f"block {self.desc.block_ids[i]} from {b.agent} arrived corrupt "
                        f"(xxh3 {have:016x}, expected {want:016x})"))
                    return False
        return True


def failed_transfer(desc: "ChunkDesc", dst: "Buffer", dst_blocks: tuple[int, ...], err: TransferError) -> Transfer:
    """A transfer that is FAILED from the start (the medium refused it before any byte moved)."""
    t = Transfer(desc, dst, dst_blocks)
    t._fail(err)
    t._quiesce()
    return t
