"""KV events: what each worker tells the router's index about the chunks it holds.

Lifecycle (worker side → router side)::

    engine.drain_kv_events()   [("stored" | "evicted", key), ...] since the last drain, in order
    EventBatcher.add(events, tier)        coalesce per (key, tier): the last event wins
    EventBatcher.flush() -> KVEventBatch  numbered seq 0, 1, 2, ... per worker (None if empty)
        ... batch.to_msgpack() over Ray (the transport is the router's business) ...
    ChunkIndex.apply(KVEventBatch.from_msgpack(b))
        gap in seq  -> index marks the worker stale and answers need_resync
    EventBatcher.resync() -> KVEventBatch full snapshot (resync=True) with the next seq

A batch names each (key, tier) at most once, so the order of ``stored`` vs ``evicted`` inside a
batch does not matter. Tiers are named fastest first: gpu (the engine's pool, "l1"), cpu ("l2"),
disk ("l3"), remote ("l4", shared by every worker).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import msgpack

from lmdisagg.errors import InvalidRequestError

TIERS: tuple[str, ...] = ("gpu", "cpu", "disk", "remote")  # fastest first; index = tier code
TIER_ALIASES = {"l1": "gpu", "l2": "cpu", "l3": "disk", "l4": "remote"}
SHARED_TIERS = frozenset({"remote"})  # a chunk stored there is reachable from every worker


class EventDecodeError(InvalidRequestError):
    """A KV event message is not a well-formed ``KVEventBatch`` (wrong types, unknown tier)."""


def tier_code(name: str) -> int:
    """Code of a tier name or alias (0 = fastest); raises ``EventDecodeError`` when unknown."""
    t = TIER_ALIASES.get(name, name)
    try:
        return TIERS.index(t)
    except ValueError:
        raise EventDecodeError(f"unknown KV tier {name!r}; known: {list(TIERS)} or "
                               f"{sorted(TIER_ALIASES)}") from None


@dataclass
class KVEventBatch:
    """One numbered message of KV events from one worker."""

    worker_id: str                                                     # sender, as registered in the index
    seq: int                                                           # 0, 1, 2, ... per worker; gaps mean loss
    stored: list[tuple[bytes, str]] = field(default_factory=list)      # (chunk key, tier) now held
    evicted: list[tuple[bytes, str]] = field(default_factory=list)     # (chunk key, tier) no longer held
    resync: bool = False  # True: ``stored`` is the worker's whole holding; replaces what the index had

    def __len__(self) -> int:
        return len(self.stored) + len(self.evicted)

    def to_msgpack(self) -> bytes:
        return msgpack.packb([self.worker_id, self.seq, self.stored, self.evicted, self.resync],
                             use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes) -> "KVEventBatch":
        """Decode and validate; raises ``EventDecodeError`` on anything malformed."""
        try:
            worker_id, seq, stored, evicted, resync = msgpack.unpackb(data, raw=False)
        except Exception as e:  # msgpack raises several unrelated types, or unpacking fails
            raise EventDecodeError(f"undecodable KV event batch: {e}") from None
        if not isinstance(worker_id, str) or not isinstance(seq, int) or seq < 0 \
                or not isinstance(resync, bool):
            raise EventDecodeError("KV event batch header must be (str worker_id, int seq >= 0, ..., bool)")
        return cls(worker_id, seq, _pairs(stored, "stored"), _pairs(evicted, "evicted"), resync)


def _pairs(items, what: str) -> list[tuple[bytes, str]]:
    if not isinstance(items, list):
        raise EventDecodeError(f"KV event batch field {what!r} must be a list")
    out = []
    for it in items:
        if not (isinstance(it, list) and len(it) == 2 and isinstance(it[0], bytes) and isinstance(it[1], str)):
            raise EventDecodeError(f"KV event batch field {what!r} holds {it!r}, not (bytes key, str tier)")
        tier_code(it[1])
        out.append((it[0], it[1]))
    return out


class EventBatcher:
    """Worker side: drained engine (or tier) events in, numbered ``KVEventBatch`` messages out.

    Called from the worker's step-loop thread only (not thread-safe); never blocks. It mirrors what
    it has reported (``held``) so ``resync()`` needs nothing from the engine. Events must be
    enabled from the engine's start, otherwise the mirror misses what was cached before.
    """

    def __init__(self, worker_id: str, tier: str = "gpu"):
        self.worker_id = worker_id
        self.tier = TIERS[tier_code(tier)]
        self.seq = 0                                   # seq of the next batch
        self.held: dict[tuple[bytes, str], None] = {}  # (key, tier) reported stored, not evicted
        self._pending: dict[tuple[bytes, str], bool] = {}  # (key, tier) -> stored? (last event wins)

    def add(self, events: Iterable[tuple[str, bytes]], tier: str | None = None) -> None:
        """Queue ``("stored" | "evicted", key)`` events, e.g. ``engine.drain_kv_events()``."""
        t = self.tier if tier is None else TIERS[tier_code(tier)]
        for kind, key in events:
            if kind == "stored":
                self._pending[(key, t)] = True
            elif kind == "evicted":
                self._pending[(key, t)] = False
            else:
                raise EventDecodeError(f"unknown KV event kind {kind!r}; expected 'stored' or 'evicted'")

    def flush(self) -> KVEventBatch | None:
        """The next numbered batch with every net change since the last flush; None if none."""
        stored, evicted = [], []
        for kt, is_stored in self._pending.items():
            if is_stored and kt not in self.held:
                self.held[kt] = None
                stored.append(kt)
            elif not is_stored and kt in self.held:
                del self.held[kt]
                evicted.append(kt)
        self._pending.clear()
        if not stored and not evicted:
            return None
        return self._next(stored, evicted, False)

    def resync(self) -> KVEventBatch:
        """A full snapshot (``resync=True``) after folding in queued events; answers need_resync."""
        self.flush()  # consumes a seq only if something changed; the snapshot supersedes it anyway
        return self._next(list(self.held), [], True)

    def _next(self, stored, evicted, resync: bool) -> KVEventBatch:
        b = KVEventBatch(self.worker_id, self.seq, stored, evicted, resync)
        self.seq += 1
        return b
