"""A fake medium for tests and simulation: shared memory underneath (so it really moves bytes
between processes and walks the real states), with knobs for latency, bandwidth and failures.

    PENDING ──(latency_s)──▶ TRANSFERRING ──(pieces paced at bandwidth_gbps)──▶ DONE
                                  └── fail_prob: FAILED at a random piece
                                  └── corrupt_prob: one byte flipped after the copy (only
                                      ``checksum=True`` catches it: that is what it is for)

Every pull runs on a worker thread (never inline), so states are observable. Waits are on the
transfer's abort event, so abort and close cut them short. Randomness comes from ``seed``.
"""
from __future__ import annotations

import random
import threading
import time

import torch

from lmdisagg.transports.base import TransferError
from lmdisagg.transports.shm import ShmTransfer, ShmTransport


class FakeTransfer(ShmTransfer):
    knobs: "FakeTransport"

    def run(self, src, pieces) -> None:
        k = self.knobs
        with k._rng_lock:
            fail_at = k._rng.randrange(len(pieces)) if k._rng.random() < k.fail_prob else None
            corrupt = k._rng.random() < k.corrupt_prob
        if k.latency_s and self._sleep(k.latency_s):
            self._quiesce()
            return
        self._fail_at, self._corrupt, self._piece = fail_at, corrupt, 0
        super().run(src, pieces)

    def _copy(self, src, s, d, n) -> None:
        if self._piece == self._fail_at:
            raise TransferError("injected failure (fake transport, fail_prob)")
        t0 = time.perf_counter()
        super()._copy(src, s, d, n)
        self._piece += 1
        bw = self.knobs.bandwidth_gbps
        if bw:
            self._sleep(max(0.0, n / (bw * 1e9) - (time.perf_counter() - t0)))
        if self._corrupt and self._piece == 1:
            view = self.dst.flat[d:d + 1]
            view.copy_(view ^ torch.ones_like(view))


class FakeTransport(ShmTransport):
    name = "fake"

    def __init__(self, *, latency_s: float = 0.0, bandwidth_gbps: float | None = None,
                 fail_prob: float = 0.0, corrupt_prob: float = 0.0, seed: int = 0,
                 checksum: bool = False, drain_timeout_s: float = 10.0, piece_nbytes: int = 4 << 20,
                 workers: int = 4):
        """``latency_s`` before the first byte; ``bandwidth_gbps`` paces each piece (None: as
        fast as memory); ``fail_prob`` / ``corrupt_prob`` per transfer, drawn from ``seed``."""
        super().__init__(checksum=checksum, drain_timeout_s=drain_timeout_s, inline_nbytes=-1,
                         piece_nbytes=piece_nbytes, workers=workers)
        self.latency_s = latency_s
        self.bandwidth_gbps = bandwidth_gbps
        self.fail_prob = fail_prob
        self.corrupt_prob = corrupt_prob
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def _new_transfer(self, desc, dst, dst_blocks) -> FakeTransfer:
        t = FakeTransfer(desc, dst, dst_blocks, self.peer_alive)
        t.knobs = self
        return t
