"""FakeTier: an in-memory tier with latency and bandwidth knobs and a kill switch.

It passes the same contract suite as the real tiers and walks the same paths (hits, misses,
eviction, failures), so policies can be tested against "a remote store 20 ms and 1 GB/s away" or
"a store that is down" without the remote store. URL form (registry): ``fake://?latency_ms=20&gbps=1``.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import torch

from lmdisagg.kv.keys import ChunkKey
from lmdisagg.kv.store.base import StoreTier, TierStats, TierUnavailableError
from lmdisagg.kv.store.buffers import as_bytes
from lmdisagg.kv.store.host import HostTier


class FakeTier(StoreTier):
    def __init__(self, budget_bytes: int = 1 << 30, *, latency_s: float = 0.0, bandwidth_bps: float | None = None,
                 ttl_s: float | None = None, name: str = "fake"):
        self.name = name
        self.latency_s = latency_s          # added to every call
        self.bandwidth_bps = bandwidth_bps  # bytes/s of reads (one at a time); None = instant
        self.down = False                   # True: every call raises TierUnavailableError
        self._link = threading.Lock()
        self._mem = HostTier(budget_bytes, ttl_s=ttl_s, pin_memory=False, name=name)

    @property
    def on_evict(self):
        return self._mem.on_evict

    @on_evict.setter
    def on_evict(self, fn) -> None:
        self._mem.on_evict = fn

    def _wire(self, nbytes: int = 0) -> None:
        """One round trip, then ``nbytes`` over a link shared by all calls (one transfer at a time)."""
        if self.down:
            raise TierUnavailableError(f"{self.name} tier is down (FakeTier.down)")
        if self.latency_s:
            time.sleep(self.latency_s)
        if nbytes and self.bandwidth_bps:
            with self._link:
                time.sleep(nbytes / self.bandwidth_bps)

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self._wire()
        return self._mem.contains_many(keys)

    def get(self, key: ChunkKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        self._wire()
        got = self._mem.get(key, out)
        if got is not None:
            self._wire(as_bytes(got).numel())
        return got

    def put(self, key: ChunkKey, value: torch.Tensor) -> bool:
        self._wire()  # writes are off the critical path: only reads pay the link's bandwidth
        return self._mem.put(key, value)

    def pin(self, key: ChunkKey) -> bool:
        self._wire()
        return self._mem.pin(key)

    def unpin(self, key: ChunkKey) -> bool:
        return self._mem.unpin(key)

    def remove(self, key: ChunkKey) -> bool:
        self._wire()
        return self._mem.remove(key)

    def evict(self, nbytes: int) -> int:
        return self._mem.evict(nbytes)

    def stats(self) -> TierStats:
        return self._mem.stats()

    def close(self) -> None:
        self._mem.close()
