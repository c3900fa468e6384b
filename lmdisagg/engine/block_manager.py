"""The KV block pool and its prefix cache.

One block holds one chunk: ``chunk_tokens`` tokens of every layer's K and V. A full block gets
the chunk key of its tokens (lmdisagg.kv.keys) and is then findable by that key. Blocks are
reference-counted: a running sequence holds a reference on each block of its table.

    free list (LRU order, oldest first) ── holds every block with ref_count 0.
        A free block may still carry a key: it is *cached* and can be revived by a hit.
        Allocation takes the oldest free block and drops its key (eviction).

Invariant: ``num_free == num_blocks`` once no sequence runs and nothing is pinned, whatever was
cached. Tests assert it after aborts.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmdisagg.kv.keys import ChunkKey


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: ChunkKey | None = None


class BlockManager:
    def __init__(self, num_blocks: int, chunk_tokens: int):
        self.num_blocks = num_blocks
        self.chunk_tokens = chunk_tokens
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_key: dict[ChunkKey, int] = {}
        # KV events for whoever drains them (workers: the router's index, the tiered store).
        # Recorded only when ``record_events`` is set, so an engine nobody drains never grows.
        self.record_events = False
        self.events: list[tuple[str, ChunkKey]] = []  # ("stored" | "evicted", key), in order

    # --- queries ----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.by_key)

    def lookup(self, keys: list[ChunkKey]) -> int:
        """How many leading keys are cached (no side effects)."""
        n = 0
        for k in keys:
            if k not in self.by_key:
                break
            n += 1
        return n

    def block_of(self, key: ChunkKey) -> int | None:
        return self.by_key.get(key)

    # --- reference counting -------------------------------------------------------------------
    def acquire(self, block_id: int) -> None:
        b = self.blocks[block_id]
        if b.ref_count == 0:
            del self.free[block_id]
        b.ref_count += 1

    def release(self, block_id: int) -> None:
        b = self.blocks[block_id]
        assert b.ref_count > 0, f"block {block_id} released more often than acquired"
        b.ref_count -= 1
        if b.ref_count == 0:
            self.free[block_id] = None  # most recently used end

    def allocate(self) -> int:
        """A fresh block (ref 1), evicting the least recently used cached one if needed."""
        if not self.free:
            raise MemoryError("no free KV blocks")
        block_id, _ = self.free.popitem(last=False)
        b = self.blocks[block_id]
        if b.key is not None:
            del self.by_key[b.key]
            if self.record_events:
                self.events.append(("evicted", b.key))
            b.key = None
        b.ref_count = 1
        return block_id

    def register(self, block_id: int, key: ChunkKey) -> None:
        """Name a full block by its chunk key. If the key is already held by another block the
        older one stays the canonical copy and this block stays anonymous."""
        b = self.blocks[block_id]
        if b.key is not None or key in self.by_key:
            return
        b.key = key
        self.by_key[key] = block_id
        if self.record_events:
            self.events.append(("stored", key))

    # --- whole sequences ----------------------------------------------------------------------
    def acquire_prefix(self, keys: list[ChunkKey]) -> list[int]:
        """Take a reference on each leading cached block of ``keys``; returns their ids."""
        ids = []
        for k in keys:
            bid = self.by_key.get(k)
            if bid is None:
                break
            self.acquire(bid)
            ids.append(bid)
        return ids

    def free_table(self, block_table: list[int]) -> None:
        # release in reverse so a sequence's tail is evicted before its (more shareable) head
        for bid in reversed(block_table):
            self.release(bid)
        block_table.clear()
