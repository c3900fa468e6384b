"""TieredStore composition (lookup across tiers, demotion, promotion, sticky pins) and StoreConfig."""
from __future__ import annotations

import pydantic
import pytest
import torch

from lmdisagg.kv.store import StoreConfig, StoreError, TieredStore
from lmdisagg.kv.store.disk import DiskTier
from lmdisagg.kv.store.host import HostTier
from lmdisagg.kv.store.redis_tier import RedisTier
from lmdisagg.kv.store.registry import remote_tier

from tests.store.test_tier_contract import N, chunk, key


def test_lookup_returns_the_unbroken_run_and_who_holds_it(tmp_path, namespace, redis_server, no_thread_leak):
    store = TieredStore([HostTier(1 << 20), DiskTier(tmp_path, namespace, 1 << 20),
                         RedisTier(redis_server.url, namespace)], write_through=False)
    cpu, disk, red = store.tiers
    cpu.put(key(0), chunk(0))
    disk.put(key(1), chunk(1))
    red.put(key(2), chunk(2))
    cpu.put(key(4), chunk(4))                         # after a gap: useless for a prefix
    keys = [key(i) for i in range(6)]
    assert store.lookup(keys) == [0, 1, 2]
    assert store.lookup(keys[1:]) == [1, 2]
    assert store.lookup([key(9)]) == []
    # get falls through to the tier below when the named one lost the chunk, and promotes the hit
    name, got = store.get(key(2), start=0)
    assert name == "redis" and torch.equal(got, chunk(2))
    assert cpu.contains(key(2)) and disk.contains(key(2))
    out = torch.empty(N, dtype=torch.uint8)
    assert store.get(key(1), out, start=1, promote=False)[0] == "disk" and torch.equal(out, chunk(1))
    assert store.get(key(7)) is None
    store.close()


def test_write_through_and_demotion(tmp_path, namespace, no_thread_leak):
    wt = TieredStore([HostTier(2 * N), DiskTier(tmp_path / "a", namespace, 10 * N)], write_through=True)
    assert wt.put(key(0), chunk(0)) == ["cpu", "disk"]
    wt.close()
    store = TieredStore([HostTier(2 * N), DiskTier(tmp_path / "b", namespace, 10 * N)], write_through=False)
    cpu, disk = store.tiers
    for i in range(4):
        assert store.put(key(i), chunk(i)) == ["cpu"]
    assert not cpu.contains(key(0)) and disk.contains(key(0)) and disk.contains(key(1))
    assert torch.equal(disk.get(key(0)), chunk(0))    # demoted intact
    assert cpu.stats().evictions == 2 and disk.stats().puts == 2
    store.close()


def test_pins_apply_now_and_to_chunks_that_arrive_later(tmp_path, namespace, no_thread_leak):
    store = TieredStore([HostTier(2 * N), DiskTier(tmp_path, namespace, 2 * N)])
    cpu, disk = store.tiers
    store.put(key(0), chunk(0))
    store.pin([key(0), key(1)])                       # key 1 is not there yet
    store.put(key(1), chunk(1))
    assert cpu.stats().pinned == 2 and disk.stats().pinned == 2
    assert store.put(key(2), chunk(2)) == []          # both tiers full of pinned chunks: refused
    store.unpin([key(0)])
    assert store.put(key(2), chunk(2)) == ["cpu", "disk"]
    assert store.lookup([key(1)]) == [0] and not cpu.contains(key(0))
    store.close()


def test_async_puts_flush_and_close_leave_no_threads(tmp_path, namespace, no_thread_leak):
    store = TieredStore([HostTier(1 << 20), DiskTier(tmp_path, namespace, 1 << 20)], io_threads=4)
    futs = [store.submit_put(key(i), chunk(i)) for i in range(16)]
    assert store.flush(10) and all(f.result() == ["cpu", "disk"] for f in futs)
    assert store.submit_fetch(store.lookup, [key(i) for i in range(16)]).result(10) == [0] * 16
    assert store.stats().pending_puts == 0
    store.close()


def test_store_config_builds_the_tiers_it_names(tmp_path, namespace, redis_server, no_thread_leak):
    cfg = StoreConfig(cpu_bytes=1 << 20, disk_path=str(tmp_path), disk_bytes=1 << 20,
                      remote_url=redis_server.url, ttl_s=60)
    store = cfg.build(namespace)
    assert [t.name for t in store.tiers] == ["cpu", "disk", "redis"]
    assert store.put(key(0), chunk(0)) == ["cpu", "disk", "redis"]
    store.close()
    only_cpu = StoreConfig(cpu_bytes=5).build(namespace)
    assert [t.name for t in only_cpu.tiers] == ["cpu"]
    only_cpu.close()
    assert not StoreConfig().enabled
    with pytest.raises(pydantic.ValidationError):
        StoreConfig(remote_url="mooncakestore://127.0.0.1:50051")
    with pytest.raises(pydantic.ValidationError):
        StoreConfig(cpu_bytes=-1)
    with pytest.raises(pydantic.ValidationError):
        StoreConfig(cpu_gb=1)                          # unknown fields are errors, not ignored
    with pytest.raises(StoreError):
        remote_tier("s3://bucket/x", namespace)
    assert all(f.description for f in StoreConfig.model_fields.values())
