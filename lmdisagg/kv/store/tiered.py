"""TieredStore: the store tiers below the engine composed into one cache, with async I/O.

    put(key, bytes) ──▶ L2 host ──evict──▶ L3 disk ──evict──▶ L4 remote      (demotion)
                        └── write_through: also L3 and L4 at once (restarts, other nodes)
    lookup(keys)    ──▶ for each leading key, the highest tier holding it; stops at the first
                        key no tier holds (a prefix is only useful unbroken)
    get(key, out)   ──▶ that tier, else the ones below it; a hit below L2 is copied up (promotion)

Every tier call runs on this object's I/O threads when it comes through ``submit_*`` (the engine
bridge never calls a tier from the step loop). A tier that raises ``TierUnavailableError`` is
logged once, counted, and skipped for ``retry_after_s`` (its lookups are misses, its puts are
dropped); then one call probes it again. So a dead Redis costs a request nothing but its hits.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lmdisagg.kv.keys import ChunkKey
from lmdisagg.kv.store.base import StoreTier, TierStats, TierUnavailableError
from lmdisagg.kv.store.buffers import to_host

log = logging.getLogger(__name__)


@dataclass
class TieredStats:
    tiers: list[TierStats]                              # L2 first
    down: list[str]                                     # tiers skipped right now after a failure
    failures: dict[str, int] = field(default_factory=dict)  # TierUnavailableErrors seen, per tier
    skipped: dict[str, int] = field(default_factory=dict)   # calls not made while a tier was down
    pending_puts: int = 0


class TieredStore:
    def __init__(self, tiers: Sequence[StoreTier], *, write_through: bool = True, io_threads: int = 4,
                 retry_after_s: float = 5.0):
        """``tiers`` fastest first (L2, L3, L4; any may be absent). Owns them: ``close`` closes them."""
        self.tiers = list(tiers)
        self.write_through = write_through
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._down_until = [0.0] * len(self.tiers)
        self._failures = {t.name: 0 for t in self.tiers}
        self._skipped = {t.name: 0 for t in self.tiers}
        self._pinned: dict[ChunkKey, int] = {}
        self._pinned_in: list[set[ChunkKey]] = [set() for _ in self.tiers]
        self._fetch_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvstore-fetch")
        self._put_pool = ThreadPoolExecutor(max(1, io_threads // 2), thread_name_prefix="kvstore-put")
        self._puts: set[Future] = set()
        self._closed = False
        for i, t in enumerate(self.tiers):
            t.on_evict = (lambda k, buf, i=i: self._demote(i, k, buf))

    @classmethod
    def create(cls, namespace: str, *, cpu_bytes: int = 0, disk_path: str | os.PathLike | None = None,
               disk_bytes: int = 0, remote_url: str | None = None, remote_bytes: int = 0,
               ttl_s: float | None = None, write_through: bool = True, io_threads: int = 4,
               retry_after_s: float = 5.0, op_timeout_s: float = 2.0,
               pin_memory: bool | None = None) -> "TieredStore":
        """Build the tiers a config asks for (a budget of 0, or no path/URL, leaves a tier out).
        ``namespace`` comes from ``store_namespace(engine)``. Plain arguments, no pydantic, so
        benchmarks on bare GPU hosts can call it."""
        from lmdisagg.kv.store.disk import DiskTier
        from lmdisagg.kv.store.host import HostTier
        from lmdisagg.kv.store.registry import remote_tier
        tiers: list[StoreTier] = []
        if cpu_bytes:
            tiers.append(HostTier(cpu_bytes, ttl_s=ttl_s, pin_memory=pin_memory))
        if disk_bytes and disk_path:
            tiers.append(DiskTier(disk_path, namespace, disk_bytes, ttl_s=ttl_s, pin_memory=pin_memory))
        if remote_url:
            tiers.append(remote_tier(remote_url, namespace, budget_bytes=remote_bytes, ttl_s=ttl_s,
                                     op_timeout_s=op_timeout_s))
        return cls(tiers, write_through=write_through, io_threads=io_threads, retry_after_s=retry_after_s)

    # --- failure handling -------------------------------------------------------------------------
    def _guard(self, i: int, fn: Callable, *args, default=None, **kw):
        """Call a tier; on TierUnavailableError log (once), count, mark it down, return default."""
        name = self.tiers[i].name
        with self._lock:
            down = self._down_until[i]
            if down and time.monotonic() < down:
                self._skipped[name] += 1
                return default
        try:
            out = fn(*args, **kw)
        except TierUnavailableError as e:
            with self._lock:
                was_up = not self._down_until[i]
                self._down_until[i] = time.monotonic() + self.retry_after_s
                self._failures[name] += 1
            if was_up:
                log.warning("KV store tier %s failed; skipping it for %.1fs (requests recompute): %s",
                            name, self.retry_after_s, e)
            return default
        if down:
            with self._lock:
                self._down_until[i] = 0.0
            log.info("KV store tier %s is back", name)
        return out

    # --- blocking operations (I/O threads, tests) ---------------------------------------------
    def lookup(self, keys: Sequence[ChunkKey]) -> list[int]:
        """Tier index holding each leading key, up to the first key no tier holds."""
        where = [-1] * len(keys)
        for i, tier in enumerate(self.tiers):
            todo = [j for j, w in enumerate(where) if w < 0]
            if not todo:
                break
            flags = self._guard(i, tier.contains_many, [keys[j] for j in todo], default=None)
            for j, f in zip(todo, flags or ()):
                if f:
                    where[j] = i
        run = next((j for j, w in enumerate(where) if w < 0), len(where))
        return where[:run]

    def get(self, key: ChunkKey, out: torch.Tensor | None = None, start: int = 0,
            promote: bool = True) -> tuple[str, torch.Tensor] | None:
        """(tier name, bytes) from the first tier at or below ``start`` that has ``key``, else None.
        With ``promote`` a hit below L2 is copied into the tiers above it (the engine bridge
        passes False: chunks it imports come back through the engine's stored events)."""
        for i in range(start, len(self.tiers)):
            got = self._guard(i, self.tiers[i].get, key, out)
            if got is not None:
                if promote:
                    for j in range(i):
                        self._put_one(j, key, got)
                return self.tiers[i].name, got
        return None

    def put(self, key: ChunkKey, value: torch.Tensor) -> list[str]:
        """Write the chunk to L2 (and, with write_through, every tier); names of tiers holding it."""
        held = []
        if value.is_cuda and self.write_through and len(self.tiers) > 1:
            value = to_host(value)  # one device-to-host copy feeds every tier
        for i in range(len(self.tiers)):
            if i and not self.write_through and held:
                break
            if self._put_one(i, key, value):
                held.append(self.tiers[i].name)
        return held

    def _put_one(self, i: int, key: ChunkKey, value: torch.Tensor) -> bool:
        tier = self.tiers[i]
        if self._guard(i, tier.contains, key, default=False):
            return True  # never resend bytes a tier (maybe remote) already holds
        ok = self._guard(i, tier.put, key, value, default=False)
        if ok:
            self._apply_pin(i, key)
        return bool(ok)

    def _apply_pin(self, i: int, key: ChunkKey) -> None:
        with self._lock:  # pins come from I/O threads of both pools
            if key not in self._pinned or key in self._pinned_in[i]:
                return
            self._pinned_in[i].add(key)
        if not self._guard(i, self.tiers[i].pin, key, default=False):
            with self._lock:
                self._pinned_in[i].discard(key)

    def _demote(self, i: int, key: ChunkKey, value: torch.Tensor) -> None:
        """A victim of tier i goes to the first lower tier that holds or takes it."""
        for j in range(i + 1, len(self.tiers)):
            if self._put_one(j, key, value):
                return

    def pin(self, keys: Sequence[ChunkKey]) -> None:
        """Pin chunks in every tier now and whenever they arrive later (system prompts)."""
        for k in keys:
            with self._lock:
                self._pinned[k] = self._pinned.get(k, 0) + 1
            for i in range(len(self.tiers)):
                self._apply_pin(i, k)

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        for k in keys:
            with self._lock:
                c = self._pinned.get(k, 0)
                if c > 1:
                    self._pinned[k] = c - 1
                    continue
                self._pinned.pop(k, None)
                held = [i for i in range(len(self.tiers)) if k in self._pinned_in[i]]
                for i in held:
                    self._pinned_in[i].discard(k)
            for i in held:
                self._guard(i, self.tiers[i].unpin, k)

    def remove(self, key: ChunkKey) -> None:
        for i, t in enumerate(self.tiers):
            self._guard(i, t.remove, key)

    # --- async ------------------------------------------------------------------------------------
    def submit_fetch(self, fn: Callable, *args, **kw) -> Future:
        """Run a lookup/get on the fetch threads (latency-critical; never behind offloads)."""
        return self._fetch_pool.submit(fn, *args, **kw)

    def submit_put(self, key: ChunkKey, value: torch.Tensor) -> Future:
        """``put`` on the offload threads; ``value`` must stay valid until the future is done."""
        f = self._put_pool.submit(self.put, key, value)
        with self._lock:
            self._puts.add(f)
        f.add_done_callback(self._put_done)
        return f

    def _put_done(self, f: Future) -> None:
        with self._lock:
            self._puts.discard(f)
        if not f.cancelled() and f.exception() is not None:
            log.error("KV store offload failed", exc_info=f.exception())

    def flush(self, timeout: float) -> bool:
        """Wait until every submitted put is done; False on timeout."""
        with self._lock:
            pending = set(self._puts)
        return not wait(pending, timeout=timeout).not_done

    def stats(self) -> TieredStats:
        now = time.monotonic()
        with self._lock:
            down = [t.name for t, d in zip(self.tiers, self._down_until) if d and now < d]
            pending = len(self._puts)
        return TieredStats([t.stats() for t in self.tiers], down, dict(self._failures),
                           dict(self._skipped), pending)

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued puts (up to ``timeout``), stop the threads, close every tier."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        self._fetch_pool.shutdown(wait=True, cancel_futures=True)
        self._put_pool.shutdown(wait=True, cancel_futures=True)
        for t in self.tiers:
            t.close()
