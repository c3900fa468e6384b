"""L3: chunks as files on local disk under a byte budget; they survive restarts.

    <root>/<namespace>/<key[:2]>/<key hex>.kv     header (32 bytes) | chunk bytes
    <root>/<namespace>/tmp/                       writes in progress (deleted on start)

    header = b"LMDKVCH1" | nbytes u64 | xxh3_64(chunk bytes) u64 | reserved u64   (little-endian)

A write goes to ``tmp/`` and is renamed into place, so a reader or a restarted process never sees
half a chunk. A read lands straight in its destination (an engine block or a pinned staging buffer)
and is checked against the header's checksum: a corrupt chunk is deleted, counted and reported
as a miss. On open the namespace directory is rescanned; file mtimes give the LRU order and the
sliding TTL across restarts (a hit touches its file). The budget counts this namespace only.
"""
from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Sequence

import torch
import xxhash

from lmdisagg.kv.keys import ChunkKey
from lmdisagg.kv.store.base import StoreError, StoreTier, TierStats, TierUnavailableError
from lmdisagg.kv.store.buffers import as_bytes, copy_bytes, host_buffer, host_view, to_host
from lmdisagg.kv.store.index import ChunkIndex

log = logging.getLogger(__name__)

_MAGIC = b"LMDKVCH1"
_HEADER = struct.Struct("<8sQQQ")


class DiskTier(StoreTier):
    def __init__(self, root: str | os.PathLike, namespace: str, budget_bytes: int, *,
                 ttl_s: float | None = None, pin_memory: bool | None = None, name: str = "disk"):
        if budget_bytes <= 0:
            raise StoreError("DiskTier needs a positive byte budget (0 means: do not create the tier)")
        self.name = name
        self.dir = Path(root) / namespace
        self.tmp = self.dir / "tmp"
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._index = ChunkIndex(budget_bytes, ttl_s, clock=time.time)  # wall clock: mtimes
        self._lock = threading.Lock()
        self._stats = TierStats(name, budget_bytes=budget_bytes)
        self._closed = False
        try:
            self._rescan()
        except OSError as e:
            raise TierUnavailableError(f"disk tier at {self.dir}: {e}") from e

    def path(self, key: ChunkKey) -> Path:
        h = key.hex()
        return self.dir / h[:2] / f"{h}.kv"

    def _rescan(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # writes a dead process left half done
        self.tmp.mkdir(parents=True, exist_ok=True)
        found = []
        for sub in os.scandir(self.dir):
            if not sub.is_dir() or sub.name == "tmp":
                continue
            for f in os.scandir(sub.path):
                if not f.name.endswith(".kv"):
                    continue
                try:
                    key = bytes.fromhex(f.name[:-3])
                    st = f.stat()
                except (ValueError, OSError):
                    continue
                if len(key) == 16 and st.st_size >= _HEADER.size:
                    found.append((st.st_mtime, key, st.st_size - _HEADER.size))
        for mtime, key, n in sorted(found):
            self._index.reserve(key, n, last_used=mtime, ready=True)
        stale = self._index.expired_keys()
        over = self._index.victims(0) or []
        for k in dict.fromkeys(stale + over):  # over budget (a smaller budget than last run)
            self._unlink(k)
            self._index.remove(k)
        log.info("disk tier %s: %d chunks, %d bytes after rescan", self.dir, len(self._index), self._index.used)

    def _unlink(self, key: ChunkKey) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.name} tier is closed")

    def _sweep(self) -> None:
        for k in self._index.expired_keys():
            self._index.remove(k)
            self._unlink(k)
            self._stats.expired += 1

    def _evict_keys(self, keys: list[ChunkKey]) -> int:
        """Demote then delete victims already removed from the index; outside the lock."""
        freed = 0
        for k in keys:
            if self.on_evict is not None:
                try:
                    buf = self._read(k, None)
                except (OSError, StoreError):
                    buf = None
                if buf is not None:
                    self.on_evict(k, buf)
            try:
                freed += self.path(k).stat().st_size - _HEADER.size
            except OSError:
                pass
            self._unlink(k)
        return freed

    # --- file I/O (no lock) ---------------------------------------------------------------------
    def _read(self, key: ChunkKey, out: torch.Tensor | None) -> torch.Tensor | None:
        """Read and verify one chunk; None if missing or corrupt (a corrupt file is deleted)."""
        try:
            f = open(self.path(key), "rb")
        except FileNotFoundError:
            return None
        with f:
            magic, n, checksum, _ = _HEADER.unpack(f.read(_HEADER.size).ljust(_HEADER.size, b"\0"))
            if magic != _MAGIC or (out is not None and as_bytes(out).numel() != n):
                return self._corrupt(key, "bad header or size")
            direct = out is not None and not out.is_cuda
            buf = as_bytes(out) if direct else host_buffer(n, self.pin_memory and out is not None)
            if f.readinto(host_view(buf)) != n or f.read(1):
                return self._corrupt(key, "truncated or overlong")
        if xxhash.xxh3_64_intdigest(host_view(buf)) != checksum:
            return self._corrupt(key, "checksum mismatch")
        if out is None or direct:
            return out if direct else buf
        copy_bytes(out, buf)
        return out

    def _corrupt(self, key: ChunkKey, why: str) -> None:
        log.warning("disk tier: chunk %s is corrupt (%s); deleted", key.hex(), why)
        with self._lock:
            self._stats.corrupt += 1
            self._index.remove(key)
        self._unlink(key)
        return None

    # --- StoreTier ------------------------------------------------------------------------------
    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            self._check_open()
            return [self._index.peek(k) is not None for k in keys]

    def get(self, key: ChunkKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        with self._lock:
            self._check_open()
            self._sweep()
            hit = self._index.touch(key) is not None
        if hit:
            try:
                got = self._read(key, out)
                if got is not None:
                    os.utime(self.path(key))  # LRU order and TTL across restarts
            except OSError as e:
                with self._lock:
                    self._stats.errors += 1
                raise TierUnavailableError(f"disk tier read of {key.hex()}: {e}") from e
        else:
            got = None
        with self._lock:
            if got is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
        return got

    def put(self, key: ChunkKey, value: torch.Tensor) -> bool:
        src = to_host(value)  # a view for host tensors; one copy from CUDA
        n = src.numel()
        with self._lock:
            self._check_open()
            self._sweep()
            if self._index.touch(key) is not None or key in self._index.entries:
                return True
            victims = self._index.victims(n) if self._index.fits(n) else None
            if victims is None:
                self._stats.rejected += 1
                return False
            for k in victims:
                self._index.remove(k)
            self._stats.evictions += len(victims)
            self._index.reserve(key, n)
        self._evict_keys(victims)
        tmp = self.tmp / f"{key.hex()}.{uuid.uuid4().hex[:8]}"
        try:
            view = host_view(src)
            dst = self.path(key)
            dst.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, n, xxhash.xxh3_64_intdigest(view), 0))
                f.write(view)
            os.replace(tmp, dst)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._index.remove(key)
                self._stats.errors += 1
            raise TierUnavailableError(f"disk tier write of {key.hex()}: {e}") from e
        with self._lock:
            e = self._index.entries.get(key)
            if e is None:  # removed or closed meanwhile
                self._unlink(key)
                return False
            e.ready = True
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
            held = self._index.remove(key) is not None
        self._unlink(key)
        return held

    def evict(self, nbytes: int) -> int:
        with self._lock:
            self._check_open()
            keys = self._index.lru_unpinned(nbytes)
            for k in keys:
                self._index.remove(k)
            self._stats.evictions += len(keys)
        return self._evict_keys(keys)

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**self._stats.as_dict())
            s.entries = sum(1 for e in self._index.entries.values() if e.ready)
            s.bytes, s.pinned = self._index.used, self._index.num_pinned
            return s

    def close(self) -> None:
        with self._lock:
            self._closed = True  # files stay: that is the point of this tier
