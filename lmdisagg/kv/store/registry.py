"""Remote tiers chosen by URL scheme (like LMCache's connectors); imported only when named.

    redis://host:port/db  rediss://...  unix:///path.sock   -> RedisTier (redis-py)
    file:///shared/path                                     -> DiskTier on a shared filesystem
    fake://?latency_ms=20&gbps=1                            -> FakeTier (tests, simulations)

``mooncakestore://`` is not offered: see README "KV store" for why (its master and client bind
every interface, which this project's single-host tests may not do).
"""
from __future__ import annotations

import importlib
from urllib.parse import parse_qs, urlparse

from lmdisagg.kv.store.base import StoreError, StoreTier

REMOTE_TIERS = {
    "redis": "lmdisagg.kv.store.redis_tier:RedisTier",
    "rediss": "lmdisagg.kv.store.redis_tier:RedisTier",
    "unix": "lmdisagg.kv.store.redis_tier:RedisTier",
    "file": "lmdisagg.kv.store.disk:DiskTier",
    "fake": "lmdisagg.kv.store.fake:FakeTier",
}


def _load(path: str):
    module, cls = path.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise StoreError(f"the remote tier {path} needs a package that is not installed ({e}); "
                         f"install lmdisagg[serve]") from e


def remote_tier(url: str, namespace: str, *, budget_bytes: int = 0, ttl_s: float | None = None,
                op_timeout_s: float = 2.0) -> StoreTier:
    """The L4 tier for ``url``; raises StoreError for an unknown scheme."""
    scheme = urlparse(url).scheme
    if scheme not in REMOTE_TIERS:
        raise StoreError(f"unknown remote KV store URL scheme {scheme!r} in {url!r}; "
                         f"choose one of {sorted(REMOTE_TIERS)}")
    cls = _load(REMOTE_TIERS[scheme])
    if scheme == "fake":
        q = {k: float(v[0]) for k, v in parse_qs(urlparse(url).query).items()}
        return cls(budget_bytes or 1 << 30, ttl_s=ttl_s, latency_s=q.get("latency_ms", 0.0) / 1e3,
                   bandwidth_bps=q["gbps"] * 1e9 if "gbps" in q else None)
    if scheme == "file":
        if not budget_bytes:
            raise StoreError("a file:// remote tier needs a byte budget")
        return cls(urlparse(url).path, namespace, budget_bytes, ttl_s=ttl_s, name="remote-file")
    return cls(url, namespace, budget_bytes=budget_bytes, ttl_s=ttl_s, op_timeout_s=op_timeout_s,
               connect_timeout_s=min(1.0, op_timeout_s))
