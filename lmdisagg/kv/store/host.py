"""L2: chunks in host memory (page-locked when CUDA is present) under a byte budget.

Each chunk is its own ``uint8 [nbytes]`` tensor; torch's caching host allocator recycles the
page-locked memory of evicted chunks, so steady-state puts do not call cudaHostAlloc. Readers
copy out of a chunk tensor they hold a reference to, so eviction never pulls memory from under
a copy in flight.
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch

from lmdisagg.kv.keys import ChunkKey
from lmdisagg.kv.store.base import StoreError, StoreTier, TierStats
from lmdisagg.kv.store.buffers import as_bytes, copy_bytes, host_buffer
from lmdisagg.kv.store.index import ChunkIndex


class HostTier(StoreTier):
    def __init__(self, budget_bytes: int, *, ttl_s: float | None = None, pin_memory: bool | None = None,
                 name: str = "cpu"):
        if budget_bytes <= 0:
            raise StoreError("HostTier needs a positive byte budget (0 means: do not create the tier)")
        self.name = name
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._index = ChunkIndex(budget_bytes, ttl_s)
        self._data: dict[ChunkKey, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._stats = TierStats(name, budget_bytes=budget_bytes)
        self._closed = False

    # --- helpers (call under the lock) ----------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.name} tier is closed")

    def _drop(self, key: ChunkKey) -> torch.Tensor | None:
        self._index.remove(key)
        return self._data.pop(key, None)

    def _sweep(self) -> None:
        for k in self._index.expired_keys():
            self._drop(k)
            self._stats.expired += 1

    def _demote(self, victims: list[tuple[ChunkKey, torch.Tensor]]) -> None:
        """Offer victims to the next tier; outside the lock (it may write a file or a socket)."""
        if self.on_evict is not None:
            for k, buf in victims:
                self.on_evict(k, buf)

    # --- StoreTier ------------------------------------------------------------------------------
    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            self._check_open()
            return [self._index.peek(k) is not None for k in keys]

    def get(self, key: ChunkKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        with self._lock:
            self._check_open()
            self._sweep()
            e = self._index.touch(key)
            if e is None:
                self._stats.misses += 1
                return None
            self._stats.hits += 1
            buf = self._data[key]  # our reference keeps it valid even if evicted meanwhile
        if out is None:
            return buf.clone()
        copy_bytes(out, buf)
        return out

    def put(self, key: ChunkKey, value: torch.Tensor) -> bool:
        src = as_bytes(value)
        n = src.numel()
        with self._lock:
            self._check_open()
            self._sweep()
            if self._index.touch(key) is not None or key in self._index.entries:
                return True  # held, or being written by another thread
            victims = self._index.victims(n) if self._index.fits(n) else None
            if victims is None:
                self._stats.rejected += 1
                return False
            dropped = [(k, self._drop(k)) for k in victims]
            self._stats.evictions += len(dropped)
            self._index.reserve(key, n)
        self._demote(dropped)
        try:
            buf = host_buffer(n, self.pin_memory)
            copy_bytes(buf, src)
        except BaseException:
            with self._lock:
                self._index.remove(key)
            raise
        with self._lock:
            if key not in self._index.entries:  # removed or closed while we copied
                return False
            self._data[key] = buf
            self._index.entries[key].ready = True
            self._stats.puts += 1
        return True

    def pin(self, key: ChunkKey) -> bool:
        with self._lock:
            self._check_open()
            return self._index.pin(key)

    def unpin(self, key: ChunkKey) -> bool:
        with self._lock:
            return self._index.unpin(key)

    def remove(self, key: ChunkKey) -> bool:
        with self._lock:
            self._check_open()
            return self._index.remove(key) is not None and self._data.pop(key, None) is not None

    def evict(self, nbytes: int) -> int:
        with self._lock:
            self._check_open()
            keys = self._index.lru_unpinned(nbytes)
            dropped = [(k, self._drop(k)) for k in keys]
            self._stats.evictions += len(dropped)
        self._demote(dropped)
        return sum(b.numel() for _, b in dropped)

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**self._stats.as_dict())
            s.entries, s.bytes, s.pinned = len(self._data), self._index.used, self._index.num_pinned
            return s

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._data.clear()
            self._index.entries.clear()
            self._index.used = 0
