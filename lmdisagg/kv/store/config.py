"""StoreConfig: what a user writes to turn the tiered KV store on (embedded in ClusterConfig).

    store:
      cpu_bytes: 8589934592        # L2 host memory, 8 GiB (0 = off)
      disk_path: /var/cache/lmdisagg/kv
      disk_bytes: 100000000000     # L3 (0 = off)
      remote_url: redis://cache:6379/0
      ttl_s: 86400
      pinned_prefixes: ["You are a helpful assistant."]

``build(namespace)`` makes the TieredStore; the worker wraps it in a StoreBridge.
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmdisagg.kv.store.registry import REMOTE_TIERS


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu_bytes: int = Field(0, ge=0, description="L2 byte budget in host memory (page-locked on CUDA); 0 turns L2 off.")
    disk_path: Optional[str] = Field(None, description="L3 directory for chunk files; chunks there survive restarts. None turns L3 off.")
    disk_bytes: int = Field(0, ge=0, description="L3 byte budget for this model's chunks on disk; 0 turns L3 off.")
    remote_url: Optional[str] = Field(None, description="L4 remote store, chosen by scheme: redis://host:port/db, rediss://, unix://, file:///shared/dir. None turns L4 off.")
    remote_bytes: int = Field(0, ge=0, description="Cap on the bytes this worker keeps in the remote store (its own LRU); 0 leaves it to the server's maxmemory policy. Required for file://.")
    ttl_s: Optional[float] = Field(None, gt=0, description="Sliding TTL: a chunk unused this long is dropped from every tier (Redis: EX). None keeps chunks until evicted.")
    write_through: bool = Field(True, description="Write each new chunk to every tier at once (survives restarts, visible to other nodes); if false, chunks reach lower tiers only when evicted from higher ones.")
    pinned_prefixes: list[str] = Field(default_factory=list, description="Prompt prefixes (e.g. system prompts, as the model sees them after templating) whose chunks are never evicted and never expire.")
    load_timeout_s: float = Field(2.0, gt=0, description="Longest a request waits for its cached chunks before it recomputes whatever has not arrived.")
    op_timeout_s: float = Field(2.0, gt=0, description="Socket timeout of one remote-store operation.")
    retry_after_s: float = Field(5.0, gt=0, description="After a tier fails, it is skipped (treated as a miss) for this long before one call probes it again.")
    io_threads: int = Field(4, ge=1, description="Threads reading chunks from the tiers (half as many write them).")
    skip_slow_tiers: bool = Field(True, description="Recompute instead of loading from a tier that delivers tokens slower than this engine computes them (both measured as it runs).")
    max_inflight_offloads: int = Field(64, ge=1, description="Chunks at most held in the engine while being copied out; beyond that new chunks are not offloaded.")

    @field_validator("remote_url")
    @classmethod
    def _known_scheme(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            scheme = v.split("://", 1)[0] if "://" in v else ""
            if scheme not in REMOTE_TIERS:
                raise ValueError(f"remote_url scheme {scheme!r} is not one of {sorted(REMOTE_TIERS)}")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.cpu_bytes or (self.disk_path and self.disk_bytes) or self.remote_url)

    def build(self, namespace: str):
        """The TieredStore this config describes (``namespace`` from ``store_namespace(engine)``)."""
        from lmdisagg.kv.store.tiered import TieredStore
        return TieredStore.create(
            namespace, cpu_bytes=self.cpu_bytes, disk_path=self.disk_path, disk_bytes=self.disk_bytes,
            remote_url=self.remote_url, remote_bytes=self.remote_bytes, ttl_s=self.ttl_s,
            write_through=self.write_through, io_threads=self.io_threads,
            retry_after_s=self.retry_after_s, op_timeout_s=self.op_timeout_s)

    def bridge(self, engine, wake=None):
        """Store + bridge for an engine, pinned prefixes applied: what a worker holds. ``wake``
        (optional, called from I/O threads) tells an idle step loop that a load or offload ended."""
        from lmdisagg.kv.store.bridge import StoreBridge, store_namespace
        b = StoreBridge(engine, self.build(store_namespace(engine)), load_timeout_s=self.load_timeout_s,
                        max_inflight_offloads=self.max_inflight_offloads, skip_slow_tiers=self.skip_slow_tiers,
                        wake=wake)
        for text in self.pinned_prefixes:
            b.pin_prefix(engine.encode(text))
        return b
