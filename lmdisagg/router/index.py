"""The router's global chunk index: which worker holds which chunk key, in which tier.

Fed only by ``KVEventBatch`` messages (``apply``); read by placement policies (``match_all`` /
``matched_prefix``). Everything here is synchronous, non-blocking, and not thread-safe: call it
from the router's event loop (or the simulator's loop) only.

    add_worker(w)                        before its first batch; seq expected from 0
    apply(batch) -> ApplyResult          in-order batches update the index;
                                         unknown worker / old seq -> rejected and counted;
                                         a seq gap -> applied, worker marked stale, need_resync
    apply(resync batch)                  replaces the worker's whole holding, clears stale
    note_routed(w, keys)                 the router sent a prompt to w: its missing keys count as
                                         "pending" on w until w reports them or pending_ttl_s passes
    remove_worker(w)                     drops everything w held (dead or restarted worker)

Layout (sized for millions of keys): one dict per tier, ``key -> bitmask of worker slots`` (the
bit objects are shared, so a key held by one worker costs one dict entry and no new int), plus
one dict per worker, ``key -> bitmask of tiers``, for eviction, resync and ``remove_worker``.
Prefix matching walks the prompt's keys once for all workers with bitmask ANDs.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from lmdisagg.errors import InvalidRequestError
from lmdisagg.router.events import SHARED_TIERS, TIERS, KVEventBatch, tier_code

PENDING = "pending"  # pseudo-tier: routed to the worker, not yet reported stored
_SHARED_CODES = tuple(TIERS.index(t) for t in SHARED_TIERS)


@dataclass
class PrefixMatch:
    """What one worker holds of a prompt's leading chunks."""

    chunks: int                                             # leading chunks held (any tier or pending)
    by_tier: dict[str, int] = field(default_factory=dict)   # those chunks by their fastest tier
    stale: bool = False                                     # the worker's events had a gap; resync asked


@dataclass
class ApplyResult:
    accepted: bool
    reason: str = ""            # "" | "gap" | "resync" | "unknown_worker" | "out_of_order"
    need_resync: bool = False   # the worker is stale: ask it for ``EventBatcher.resync()``
    stored: int = 0             # (key, tier) entries added
    evicted: int = 0            # (key, tier) entries removed


@dataclass
class IndexStats:
    """Counters for the router's metrics endpoint (monotonic)."""

    batches: int = 0
    stored: int = 0
    evicted: int = 0
    unknown_evictions: int = 0        # evicted keys the index never had (harmless, counted)
    resyncs: int = 0
    gaps: int = 0
    rejected_unknown_worker: int = 0
    rejected_out_of_order: int = 0    # duplicate or older seq

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ChunkIndex:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, pending_ttl_s: float = 30.0):
        self.clock = clock                  # seconds; the simulator passes its virtual clock
        self.pending_ttl_s = pending_ttl_s
        self.stats = IndexStats()
        self._slot: dict[str, int] = {}
        self._wid: list[str | None] = []
        self._bit: list[int] = []           # 1 << slot, one shared object per slot
        self._free: list[int] = []
        self._all = 0                       # mask of registered workers
        self._tiers: list[dict[bytes, int]] = [{} for _ in TIERS]   # key -> worker mask
        self._wkeys: list[dict[bytes, int]] = []                      # slot -> {key: tier mask}
        self._expect: list[int] = []        # next seq per slot
        self._stale: list[bool] = []
        self._pend: dict[bytes, int] = {}   # key -> mask of workers it was routed to
        self._pend_until: list[dict[bytes, float]] = []  # slot -> {key: expiry} (GC-untracked)
        self._pend_q: deque[tuple[float, int, Sequence[bytes]]] = deque()

    # --- workers ------------------------------------------------------------------------------
    @property
    def workers(self) -> list[str]:
        return list(self._slot)

    def add_worker(self, worker_id: str) -> None:
        """Register a worker (no-op if known). A restarted worker: ``remove_worker`` first."""
        if worker_id in self._slot:
            return
        if self._free:
            s = self._free.pop()
        else:
            s = len(self._wid)
            self._wid.append(None)
            self._bit.append(1 << s)
            self._wkeys.append({})
            self._expect.append(0)
            self._stale.append(False)
            self._pend_until.append({})
        self._slot[worker_id], self._wid[s] = s, worker_id
        self._wkeys[s], self._expect[s], self._stale[s], self._pend_until[s] = {}, 0, False, {}
        self._all |= self._bit[s]

    def remove_worker(self, worker_id: str) -> int:
        """Forget a worker and everything it held; returns how many (key, tier) entries went."""
        s = self._slot.pop(worker_id, None)
        if s is None:
            return 0
        n = 0
        for key, tiers in self._wkeys[s].items():
            for code in _codes(tiers):
                self._clear_bit(self._tiers[code], key, s)
                n += 1
        for key in self._pend_until[s]:
            self._clear_bit(self._pend, key, s)
        self._wkeys[s], self._wid[s], self._pend_until[s] = {}, None, {}
        self._all &= ~self._bit[s]
        self._free.append(s)
        return n

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._slot

    def is_stale(self, worker_id: str) -> bool:
        return self._stale[self._slot[worker_id]]

    def num_keys(self, worker_id: str) -> int:
        """(key, any tier) entries the worker holds, per the index."""
        return len(self._wkeys[self._slot[worker_id]])

    def keys_of(self, worker_id: str) -> list[bytes]:
        """Every key the worker holds in some tier (for resync checks and tests)."""
        return list(self._wkeys[self._slot[worker_id]])

    def __len__(self) -> int:
        """Total (worker, key) entries."""
        return sum(len(self._wkeys[s]) for s in self._slot.values())

    # --- events -------------------------------------------------------------------------------
    def apply(self, batch: KVEventBatch) -> ApplyResult:
        s = self._slot.get(batch.worker_id)
        if s is None:
            self.stats.rejected_unknown_worker += 1
            return ApplyResult(False, "unknown_worker")
        expect = self._expect[s]
        if batch.seq < expect:
            self.stats.rejected_out_of_order += 1
            return ApplyResult(False, "out_of_order", need_resync=self._stale[s])
        codes_st = [tier_code(t) for _, t in batch.stored]   # validate before changing anything
        codes_ev = [tier_code(t) for _, t in batch.evicted]
        self.stats.batches += 1
        self._expect[s] = batch.seq + 1
        reason = ""
        if batch.resync:
            for key, tiers in self._wkeys[s].items():
                for code in _codes(tiers):
                    self._clear_bit(self._tiers[code], key, s)
            self._wkeys[s] = {}
            self._stale[s] = False
            self.stats.resyncs += 1
            reason = "resync"
        elif batch.seq > expect:
            self._stale[s] = True
            self.stats.gaps += 1
            reason = "gap"
        ev = sum(self._remove(s, key, c) for (key, _), c in zip(batch.evicted, codes_ev))
        st = sum(self._add(s, key, c) for (key, _), c in zip(batch.stored, codes_st))
        self.stats.stored += st
        self.stats.evicted += ev
        self.stats.unknown_evictions += len(batch.evicted) - ev
        return ApplyResult(True, reason, self._stale[s], st, ev)

    def _add(self, s: int, key: bytes, code: int) -> bool:
        wk = self._wkeys[s]
        tiers = wk.get(key, 0)
        if tiers >> code & 1:
            return False
        wk[key] = tiers | (1 << code)
        d = self._tiers[code]
        old = d.get(key)
        d[key] = self._bit[s] if old is None else old | self._bit[s]
        if self._pend_until[s].pop(key, None) is not None:  # pending became real
            self._clear_bit(self._pend, key, s)
        return True

    def _remove(self, s: int, key: bytes, code: int) -> bool:
        wk = self._wkeys[s]
        tiers = wk.get(key, 0)
        if not tiers >> code & 1:
            return False
        tiers &= ~(1 << code)
        if tiers:
            wk[key] = tiers
        else:
            del wk[key]
        self._clear_bit(self._tiers[code], key, s)
        return True

    def _clear_bit(self, d: dict[bytes, int], key: bytes, s: int) -> None:
        m = d.get(key, 0) & ~self._bit[s]
        if m:
            d[key] = m
        else:
            d.pop(key, None)

    # --- routed-but-not-yet-reported ----------------------------------------------------------
    def note_routed(self, worker_id: str, keys: Sequence[bytes]) -> None:
        """Count ``keys`` as pending on the worker (a prompt was just sent there), so a burst of
        requests sharing a new prefix follows the first one instead of scattering."""
        s = self._slot.get(worker_id)
        if s is None or not keys:
            return
        now = self.clock()
        self._expire(now)
        until = now + self.pending_ttl_s
        bit, wk, pu = self._bit[s], self._wkeys[s], self._pend_until[s]
        fresh = [k for k in keys if k not in wk]
        if not fresh:
            return
        for k in fresh:
            old = self._pend.get(k)
            self._pend[k] = bit if old is None else old | bit
            pu[k] = until
        self._pend_q.append((until, s, fresh))

    def _expire(self, now: float) -> None:
        q = self._pend_q
        while q and q[0][0] <= now:
            until, s, keys = q.popleft()
            pu = self._pend_until[s]
            for k in keys:
                if pu.get(k) == until:
                    del pu[k]
                    self._clear_bit(self._pend, k, s)

    # --- queries ------------------------------------------------------------------------------
    def match_all(self, keys: Sequence[bytes]) -> dict[str, PrefixMatch]:
        """Leading-prefix match of ``keys`` for every worker holding at least its first chunk.

        O(len(keys)) bitmask steps plus a per-key walk only for workers whose matched chunks are
        not all on GPU. Workers not in the result hold none of the prompt."""
        if self._pend_q:
            self._expire(self.clock())
        gpu = self._tiers[0]
        others = self._tiers[1:]
        shared = [self._tiers[c] for c in _SHARED_CODES]
        pend = self._pend
        alive, fast = self._all, self._all  # fast: every matched chunk so far is on GPU
        ends: list[tuple[int, int, bool]] = []  # (slot, depth, all on gpu)
        n = 0
        for k in keys:
            g = gpu.get(k, 0)
            if any(d.get(k) for d in shared):
                have = self._all
            else:
                have = g | pend.get(k, 0)
                for d in others:
                    have |= d.get(k, 0)
            dropped = alive & ~have
            if dropped:
                ends += [(s, n, bool(fast >> s & 1)) for s in _bits(dropped)]
                alive &= have
            fast &= g
            if not alive:
                break
            n += 1
        ends += [(s, n, bool(fast >> s & 1)) for s in _bits(alive)]
        out = {}
        for s, depth, all_gpu in ends:
            if depth:
                by_tier = {"gpu": depth} if all_gpu else self._breakdown(s, keys, depth)
                out[self._wid[s]] = PrefixMatch(depth, by_tier, self._stale[s])
        return out

    def matched_prefix(self, worker_id: str, keys: Sequence[bytes]) -> PrefixMatch:
        """Leading chunks of ``keys`` one worker holds (any tier, shared tiers, or pending)."""
        s = self._slot.get(worker_id)
        if s is None:
            raise InvalidRequestError(f"unknown worker {worker_id!r}", param="worker_id")
        if self._pend_q:
            self._expire(self.clock())
        by_tier: dict[str, int] = {}
        n = 0
        for k in keys:
            t = self._tier_of(s, k)
            if t is None:
                break
            by_tier[t] = by_tier.get(t, 0) + 1
            n += 1
        return PrefixMatch(n, by_tier, self._stale[s])

    def _breakdown(self, s: int, keys: Sequence[bytes], depth: int) -> dict[str, int]:
        by_tier: dict[str, int] = {}
        for k in keys[:depth]:
            t = self._tier_of(s, k)
            by_tier[t] = by_tier.get(t, 0) + 1
        return by_tier

    def _tier_of(self, s: int, k: bytes) -> str | None:
        tiers = self._wkeys[s].get(k, 0)
        if tiers:
            return TIERS[(tiers & -tiers).bit_length() - 1]
        if any(self._tiers[c].get(k) for c in _SHARED_CODES):
            return TIERS[_SHARED_CODES[0]]
        if self._pend.get(k, 0) >> s & 1:
            return PENDING
        return None

    def holders(self, key: bytes) -> dict[str, list[str]]:
        """worker_id -> tiers holding ``key`` (for debugging and tests)."""
        return {w: [TIERS[c] for c in _codes(self._wkeys[s].get(key, 0))]
                for w, s in self._slot.items() if key in self._wkeys[s]}


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _codes(tiers: int) -> list[int]:
    return [c for c in range(len(TIERS)) if tiers >> c & 1]
