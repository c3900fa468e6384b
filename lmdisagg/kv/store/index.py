"""LRU bookkeeping shared by the tiers: byte budget, pins, sliding TTL, in-flight writes.

    entries (OrderedDict, least recently used first)
        key -> Entry(nbytes, last_used, pins, ready)

A put reserves its entry first (``ready=False``: invisible to readers, never a victim), writes the
bytes outside the tier's lock, then marks it ready. Because TTL is sliding and use moves an entry
to the end, expired entries gather at the front, so sweeping costs only what it drops.
Not thread-safe: each tier calls it under its own lock.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from lmdisagg.kv.keys import ChunkKey


@dataclass
class Entry:
    nbytes: int
    last_used: float
    pins: int = 0
    ready: bool = True


class ChunkIndex:
    def __init__(self, budget_bytes: int, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.budget = budget_bytes  # 0 = unlimited
        self.ttl = ttl_s
        self.clock = clock
        self.entries: OrderedDict[ChunkKey, Entry] = OrderedDict()
        self.used = 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_pinned(self) -> int:
        return sum(1 for e in self.entries.values() if e.pins)

    def peek(self, key: ChunkKey) -> Entry | None:
        """The ready, unexpired entry of ``key`` without touching it."""
        e = self.entries.get(key)
        if e is None or not e.ready or self._expired(e):
            return None
        return e

    def touch(self, key: ChunkKey) -> Entry | None:
        e = self.peek(key)
        if e is not None:
            e.last_used = self.clock()
            self.entries.move_to_end(key)
        return e

    def reserve(self, key: ChunkKey, nbytes: int, last_used: float | None = None, ready: bool = False) -> None:
        self.entries[key] = Entry(nbytes, self.clock() if last_used is None else last_used, ready=ready)
        self.used += nbytes

    def pin(self, key: ChunkKey) -> bool:
        """One more pin on a present (unexpired) chunk; False if absent."""
        e = self.peek(key)
        if e is None:
            return False
        e.pins += 1
        return True

    def unpin(self, key: ChunkKey) -> bool:
        """Drop one pin; False if the chunk was absent or not pinned."""
        e = self.entries.get(key)
        if e is None or not e.pins:
            return False
        e.pins -= 1
        return True

    def remove(self, key: ChunkKey) -> Entry | None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.used -= e.nbytes
        return e

    def fits(self, nbytes: int) -> bool:
        return not self.budget or nbytes <= self.budget

    def victims(self, nbytes: int) -> list[ChunkKey] | None:
        """LRU unpinned ready keys whose removal makes room for ``nbytes`` more; None if even
        removing all of them would not (everything else is pinned or being written)."""
        if not self.budget:
            return []
        over = self.used + nbytes - self.budget
        out: list[ChunkKey] = []
        if over <= 0:
            return out
        for k, e in self.entries.items():
            if e.pins or not e.ready:
                continue
            out.append(k)
            over -= e.nbytes
            if over <= 0:
                return out
        return None

    def lru_unpinned(self, nbytes: int) -> list[ChunkKey]:
        """Oldest unpinned ready keys totalling at least ``nbytes`` (or all of them)."""
        out, freed = [], 0
        for k, e in self.entries.items():
            if freed >= nbytes:
                break
            if e.pins or not e.ready:
                continue
            out.append(k)
            freed += e.nbytes
        return out

    def expired_keys(self) -> list[ChunkKey]:
        """Unpinned ready entries past their TTL (they sit at the LRU front)."""
        if self.ttl is None:
            return []
        out = []
        for k, e in self.entries.items():
            if e.pins or not e.ready:
                continue
            if not self._expired(e):
                break
            out.append(k)
        return out

    def _expired(self, e: Entry) -> bool:
        return self.ttl is not None and not e.pins and self.clock() - e.last_used > self.ttl
