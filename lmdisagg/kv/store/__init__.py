"""The tiered KV store: L2 host memory → L3 local disk → L4 remote (Redis), below the engine's
own prefix cache (L1), and the bridge a worker calls around its step loop.

    from lmdisagg.kv.store import StoreConfig            # pydantic (user config)
    bridge = StoreConfig(cpu_bytes=8 << 30, disk_path="/var/kv", disk_bytes=100 << 30,
                         remote_url="redis://127.0.0.1:6379/0").bridge(engine)

Nothing here imports redis-py or pydantic until used (bare GPU hosts run the benchmark).
"""
from lmdisagg.kv.store.base import StoreError, StoreTier, TierStats, TierUnavailableError
from lmdisagg.kv.store.bridge import LoadResult, StoreBridge, store_namespace
from lmdisagg.kv.store.tiered import TieredStats, TieredStore

__all__ = ["StoreError", "StoreTier", "TierStats", "TierUnavailableError", "LoadResult", "StoreBridge",
           "store_namespace", "TieredStats", "TieredStore", "StoreConfig"]


def __getattr__(name):
    if name == "StoreConfig":
        from lmdisagg.kv.store.config import StoreConfig
        return StoreConfig
    raise AttributeError(name)
