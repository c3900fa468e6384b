"""The store-tier interface: one small contract every KV tier below the engine implements.

Tiers (the engine's paged pool is L1 and is not a tier object here)::

    L2 HostTier   host memory (pinned on CUDA), byte budget          lmdisagg/kv/store/host.py
    L3 DiskTier   local files, xxhash per chunk, survives restarts   lmdisagg/kv/store/disk.py
    L4 RedisTier  a Redis/Valkey server by URL, shared by nodes      lmdisagg/kv/store/redis_tier.py

A chunk value is the raw bytes of one chunk (``KVLayout.chunk_nbytes``, layout in
lmdisagg/kv/layout.py). ``put`` takes any contiguous tensor (an engine block ``[L, 2, T, H_kv, D]``,
a uint8 buffer, on any device) and stores its bytes; ``get`` writes the bytes into ``out`` (a
contiguous tensor of exactly that many bytes, on any device: e.g. an engine block reserved for an
import) or, without ``out``, returns a new CPU ``uint8 [nbytes]`` tensor.

Contract for every tier:
  * Thread-safe; every method blocks the caller (TieredStore runs them on its I/O threads, never
    on the engine's step loop). Keys name immutable bytes, so ``put`` of a key already held is a
    no-op that counts as a use.
  * A miss is ``None``/``False``, never an exception. A backend failure (server down, disk
    error) raises ``TierUnavailableError``; TieredStore logs it, counts it and treats it as a miss.
  * LRU within a byte budget; ``put`` evicts least recently used unpinned chunks to make room and
    hands each victim to ``on_evict(key, value)`` (TieredStore demotes it to the next tier) before
    dropping it. Pinned chunks are never evicted and never expire. With ``ttl_s`` a chunk unused
    for that long is dropped (sliding TTL).
  * ``close`` releases every thread, file and connection the tier holds; calls after it raise.
"""
from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from lmdisagg.errors import LmdisaggError
from lmdisagg.kv.keys import ChunkKey


class StoreError(LmdisaggError):
    """A KV store misuse (bad URL, closed tier, value of the wrong size)."""

    status = 500
    type = "kv_store_error"


class TierUnavailableError(StoreError):
    """A tier's backend failed (Redis down, disk I/O error). Callers treat it as a miss."""

    status = 503
    type = "kv_store_unavailable"


@dataclass
class TierStats:
    """Counters of one tier since it was opened (``entries``/``bytes`` are current)."""

    name: str
    entries: int = 0
    bytes: int = 0
    budget_bytes: int = 0      # 0 = no client-side limit
    pinned: int = 0            # chunks pinned now
    hits: int = 0
    misses: int = 0
    puts: int = 0              # chunks written (not counting no-op puts of held keys)
    evictions: int = 0         # chunks dropped for room (each offered to on_evict first)
    expired: int = 0           # chunks dropped by TTL
    rejected: int = 0          # puts refused: larger than the budget, or everything pinned
    corrupt: int = 0           # chunks that failed their checksum or size check (deleted)
    errors: int = 0            # backend failures raised as TierUnavailableError

    def as_dict(self) -> dict:
        return asdict(self)


OnEvict = Callable[[ChunkKey, torch.Tensor], None]  # (key, CPU uint8 [nbytes]) while still valid


class StoreTier(abc.ABC):
    name: str                      # "cpu" | "disk" | "redis" | ...: how stats and reports call it
    on_evict: OnEvict | None = None  # set by TieredStore to demote victims

    def contains(self, key: ChunkKey) -> bool:
        return self.contains_many([key])[0]

    @abc.abstractmethod
    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys the tier holds now (one round trip for remote tiers); no side effects."""

    @abc.abstractmethod
    def get(self, key: ChunkKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The chunk's bytes written into ``out`` (returned) or a new CPU uint8 tensor; ``None`` on
        a miss (``out`` is then unspecified). A hit counts as a use (LRU, TTL)."""

    @abc.abstractmethod
    def put(self, key: ChunkKey, value: torch.Tensor) -> bool:
        """Store the bytes of ``value``; False if refused (too large, all pinned)."""

    @abc.abstractmethod
    def pin(self, key: ChunkKey) -> bool:
        """Hold the chunk (no eviction, no expiry) until a matching ``unpin``; counted. False if absent."""

    @abc.abstractmethod
    def unpin(self, key: ChunkKey) -> bool:
        """Drop one pin; False if the chunk was not pinned."""

    @abc.abstractmethod
    def remove(self, key: ChunkKey) -> bool:
        """Drop the chunk now (even if pinned), without demotion; False if absent."""

    @abc.abstractmethod
    def evict(self, nbytes: int) -> int:
        """Evict LRU unpinned chunks (demoting each) until ``nbytes`` are freed or none is left;
        returns the bytes freed."""

    @abc.abstractmethod
    def stats(self) -> TierStats: ...

    @abc.abstractmethod
    def close(self) -> None: ...
