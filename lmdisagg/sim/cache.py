"""One simulated worker's KV cache: a GPU pool like the engine's BlockManager, plus a CPU tier.

    GPU  capacity C chunks = pinned (ref > 0, running requests) + lru (ref 0, cached, evictable)
         allocation past C evicts the least recently used ref-0 chunk -> it moves to the CPU tier
    CPU  capacity C2 chunks, LRU; a hit there is copied back up to the GPU (both keep it)

Every change is reported to the worker's ``EventBatcher`` as the engine / tiered store would:
("stored" | "evicted", key) with tier "gpu" or "cpu". Keys chain (a key names its prefix), so
only leading matches count, as in the engine.
"""
from __future__ import annotations

from collections import OrderedDict

from lmdisagg.router.events import EventBatcher


class SimCache:
    def __init__(self, gpu_chunks: int, cpu_chunks: int, events: EventBatcher):
        self.gpu_chunks = gpu_chunks
        self.cpu_chunks = cpu_chunks
        self.events = events
        self.lru: OrderedDict[bytes, None] = OrderedDict()   # GPU, ref 0, oldest first
        self.pinned: dict[bytes, int] = {}                    # GPU, key -> ref count
        self.cpu: OrderedDict[bytes, None] = OrderedDict()   # CPU tier, oldest first
        self.overflow = 0  # allocations with every GPU chunk pinned (the pool ran over capacity)

    @property
    def free_blocks(self) -> int:
        return max(self.gpu_chunks - len(self.pinned), 0)

    def lookup(self, keys: list[bytes]) -> tuple[int, int]:
        """Leading chunks held, split (on GPU, only on CPU). No side effects."""
        gpu = cpu = 0
        for k in keys:
            if k in self.lru or k in self.pinned:
                gpu += 1
            elif k in self.cpu:
                cpu += 1
            else:
                break
        return gpu, cpu

    def acquire(self, keys: list[bytes]) -> None:
        """Pin every chunk of a prompt on GPU (hits revive, CPU hits and misses are allocated)."""
        stored = []
        for k in keys:
            ref = self.pinned.get(k)
            if ref is not None:
                self.pinned[k] = ref + 1
                continue
            if k in self.lru:
                del self.lru[k]
            else:
                self._make_room()
                stored.append(("stored", k))
                if k in self.cpu:
                    self.cpu.move_to_end(k)
            self.pinned[k] = 1
        self.events.add(stored, "gpu")

    def release(self, keys: list[bytes]) -> None:
        """Unpin; the tail goes back to the LRU first so a prompt's shared head outlives it."""
        for k in reversed(keys):
            ref = self.pinned[k] - 1
            if ref:
                self.pinned[k] = ref
            else:
                del self.pinned[k]
                self.lru[k] = None

    def _make_room(self) -> None:
        if len(self.lru) + len(self.pinned) < self.gpu_chunks:
            return
        if not self.lru:
            self.overflow += 1
            return
        k, _ = self.lru.popitem(last=False)
        self.events.add([("evicted", k)], "gpu")
        if self.cpu_chunks <= 0:
            return
        if k in self.cpu:
            self.cpu.move_to_end(k)
            return
        if len(self.cpu) >= self.cpu_chunks:
            old, _ = self.cpu.popitem(last=False)
            self.events.add([("evicted", old)], "cpu")
        self.cpu[k] = None
        self.events.add([("stored", k)], "cpu")
