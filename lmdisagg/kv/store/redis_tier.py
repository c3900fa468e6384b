"""L4: chunks in a Redis (or Valkey) server by URL, shared by every node that names it.

    redis://[:password@]host:port/db      rediss:// (TLS)      unix:///path/redis.sock?db=N

    key   = "lmdisagg:kv:<namespace>:<chunk key hex>"   namespace = "v<key scheme>-<model digest>"
    value = the chunk's raw bytes, written with SET .. EX ttl NX, read with GETEX .. EX ttl

TTL is sliding (a hit renews it); a pinned chunk is PERSISTed and gets its TTL back when the last
pin goes. The server's ``maxmemory`` + ``allkeys-lru`` bounds the shared total; ``budget_bytes``
(0 = none) additionally caps what this client keeps there, evicting its own least recently used
chunks. Every command has a socket timeout; a failure raises ``TierUnavailableError``.
"""
from __future__ import annotations

import threading
from typing import Sequence

import redis
import torch

from lmdisagg.kv.keys import ChunkKey
from lmdisagg.kv.store.base import StoreError, StoreTier, TierStats, TierUnavailableError
from lmdisagg.kv.store.buffers import as_bytes, copy_bytes, from_bytes, host_view, to_host
from lmdisagg.kv.store.index import ChunkIndex


class RedisTier(StoreTier):
    def __init__(self, url: str, namespace: str, *, budget_bytes: int = 0, ttl_s: float | None = None,
                 op_timeout_s: float = 2.0, connect_timeout_s: float = 1.0, max_connections: int = 16,
                 name: str = "redis"):
        self.name = name
        self.url = url
        self.prefix = f"lmdisagg:kv:{namespace}:"
        self.ttl = None if ttl_s is None else max(1, int(round(ttl_s)))
        self._pool = redis.ConnectionPool.from_url(
            url, socket_timeout=op_timeout_s, socket_connect_timeout=connect_timeout_s,
            max_connections=max_connections)
        self._r = redis.Redis(connection_pool=self._pool)
        self._index = ChunkIndex(budget_bytes)  # chunks this client wrote or read: its LRU view
        self._pins: dict[ChunkKey, int] = {}
        self._lock = threading.Lock()
        self._stats = TierStats(name, budget_bytes=budget_bytes)
        self._closed = False

    def _k(self, key: ChunkKey) -> str:
        return self.prefix + key.hex()

    def _call(self, fn, *args, **kw):
        if self._closed:
            raise StoreError(f"{self.name} tier is closed")
        try:
            return fn(*args, **kw)
        except redis.RedisError as e:
            with self._lock:
                self._stats.errors += 1
            raise TierUnavailableError(f"redis tier {self.url}: {type(e).__name__}: {e}") from e

    def _seen(self, key: ChunkKey, n: int) -> None:
        with self._lock:
            if self._index.touch(key) is None:
                self._index.remove(key)
                self._index.reserve(key, n, ready=True)

    # --- StoreTier ------------------------------------------------------------------------------
    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if not keys:
            return []
        pipe = self._r.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._k(k))
        return [bool(x) for x in self._call(pipe.execute)]

    def get(self, key: ChunkKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        pinned = key in self._pins
        if self.ttl is None or pinned:
            data = self._call(self._r.get, self._k(key))
        else:
            data = self._call(self._r.getex, self._k(key), ex=self.ttl)
        if data is None or (out is not None and len(data) != as_bytes(out).numel()):
            with self._lock:
                self._stats.misses += 1
                if data is not None:
                    self._stats.corrupt += 1
            if data is not None:  # another writer put other bytes under our key: drop them
                self._call(self._r.delete, self._k(key))
            return None
        src = from_bytes(data)  # redis-py's bytes, no further copy
        if out is None:
            out = src.clone()
        else:
            copy_bytes(out, src)
        with self._lock:
            self._stats.hits += 1
        self._seen(key, len(data))
        return out

    def put(self, key: ChunkKey, value: torch.Tensor) -> bool:
        src = to_host(value)
        n = src.numel()
        with self._lock:
            if not self._index.fits(n):
                self._stats.rejected += 1
                return False
            victims = self._index.victims(n)
            if victims is None:
                self._stats.rejected += 1
                return False
        if victims:
            self.evict(sum(self._index.entries[k].nbytes for k in victims if k in self._index.entries))
        pinned = key in self._pins
        ex = None if pinned else self.ttl
        created = self._call(self._r.set, self._k(key), host_view(src), ex=ex, nx=True)
        with self._lock:
            if created:
                self._stats.puts += 1
        self._seen(key, n)
        return True

    def pin(self, key: ChunkKey) -> bool:
        if not self._call(self._r.persist, self._k(key)) and not self._call(self._r.exists, self._k(key)):
            return False
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
            e = self._index.entries.get(key)
            if e is not None:
                e.pins += 1
        return True

    def unpin(self, key: ChunkKey) -> bool:
        with self._lock:
            c = self._pins.get(key, 0)
            if not c:
                return False
            if c == 1:
                del self._pins[key]
            else:
                self._pins[key] = c - 1
            e = self._index.entries.get(key)
            if e is not None and e.pins:
                e.pins -= 1
            last = c == 1
        if last and self.ttl is not None:
            self._call(self._r.expire, self._k(key), self.ttl)
        return True

    def remove(self, key: ChunkKey) -> bool:
        with self._lock:
            self._index.remove(key)
            self._pins.pop(key, None)
        return bool(self._call(self._r.delete, self._k(key)))

    def evict(self, nbytes: int) -> int:
        with self._lock:
            keys = self._index.lru_unpinned(nbytes)
            sizes = {k: self._index.remove(k).nbytes for k in keys}
            self._stats.evictions += len(keys)
        freed = 0
        for k in keys:
            if self.on_evict is not None:  # a tier below Redis: hand it down before deleting
                data = self._call(self._r.get, self._k(k))
                if data is not None:
                    self.on_evict(k, from_bytes(data))
            self._call(self._r.delete, self._k(k))
            freed += sizes[k]
        return freed

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**self._stats.as_dict())
            s.entries, s.bytes, s.pinned = len(self._index), self._index.used, len(self._pins)
            return s

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.disconnect()
