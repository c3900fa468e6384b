"""One contract, every tier: L2 host memory, L3 disk, L4 a real Redis server."""
from __future__ import annotations

import os
import time

import pytest
import torch

from lmdisagg.kv.store.base import StoreError
from lmdisagg.kv.store.disk import DiskTier
from lmdisagg.kv.store.fake import FakeTier
from lmdisagg.kv.store.host import HostTier
from lmdisagg.kv.store.redis_tier import RedisTier

N = 4096  # bytes per test chunk


def chunk(seed: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.fixture(params=["cpu", "disk", "redis", "fake"])
def make_tier(request, tmp_path, namespace):
    kind = request.param
    made = []

    def make(budget_bytes: int = 0, ttl_s: float | None = None):
        if kind == "cpu":
            t = HostTier(budget_bytes or 1 << 30, ttl_s=ttl_s)
        elif kind == "fake":
            t = FakeTier(budget_bytes or 1 << 30, ttl_s=ttl_s, latency_s=0.001, bandwidth_bps=1e9)
        elif kind == "disk":
            t = DiskTier(tmp_path / "kv", namespace, budget_bytes or 1 << 30, ttl_s=ttl_s)
        else:
            srv = request.getfixturevalue("redis_server")
            t = RedisTier(srv.url, namespace, budget_bytes=budget_bytes, ttl_s=ttl_s)
        made.append(t)
        return t

    make.kind = kind
    yield make
    for t in made:
        t.close()


def test_put_get_contains_roundtrip(make_tier):
    t = make_tier()
    values = {key(i): chunk(i, N + 64 * i) for i in range(3)}
    assert t.contains_many(list(values)) == [False] * 3
    assert t.get(key(0)) is None
    for k, v in values.items():
        assert t.put(k, v)
    assert t.contains_many([key(0), key(99), key(2)]) == [True, False, True]
    for k, v in values.items():
        got = t.get(k)
        assert got.dtype == torch.uint8 and torch.equal(got, v)
        out = torch.zeros_like(v)
        assert t.get(k, out) is out and torch.equal(out, v)
    # any dtype/shape goes in and comes out as the same bytes (an engine block is [L, 2, T, H, D])
    block = torch.randn(2, 2, 4, 2, 8, generator=torch.Generator().manual_seed(7))
    assert t.put(key(10), block)
    back = torch.empty_like(block)
    assert t.get(key(10), back) is back and torch.equal(back, block)
    s = t.stats()
    assert s.entries == 4 and s.puts == 4 and s.hits == 7 and s.misses == 1
    assert s.bytes == sum(v.numel() for v in values.values()) + block.numel() * 4


def test_put_of_held_key_is_a_noop(make_tier):
    t = make_tier()
    assert t.put(key(1), chunk(1))
    assert t.put(key(1), chunk(1))
    assert t.stats().puts == 1 and t.stats().entries == 1


def test_lru_eviction_demotes_victims_in_order(make_tier):
    t = make_tier(budget_bytes=3 * N)
    demoted = []
    t.on_evict = lambda k, buf: demoted.append((k, buf.clone()))
    for i in range(3):
        assert t.put(key(i), chunk(i))
    assert t.get(key(0)) is not None            # 0 is now the most recently used
    assert t.put(key(3), chunk(3))              # evicts 1, the least recently used
    assert [k for k, _ in demoted] == [key(1)]
    assert torch.equal(demoted[0][1], chunk(1))  # the victim's bytes, still valid in the callback
    assert t.contains_many([key(0), key(1), key(2), key(3)]) == [True, False, True, True]
    s = t.stats()
    assert s.evictions == 1 and s.bytes <= 3 * N and s.entries == 3


def test_pinned_chunks_are_never_evicted(make_tier):
    t = make_tier(budget_bytes=2 * N)
    t.put(key(0), chunk(0))
    t.put(key(1), chunk(1))
    assert t.pin(key(0)) and t.pin(key(1))
    assert not t.pin(key(42))                    # absent
    assert t.put(key(2), chunk(2)) is False      # all pinned: refused, not a crash
    assert t.stats().rejected == 1 and t.stats().pinned == 2
    assert t.evict(10 * N) == 0
    assert t.unpin(key(0)) and not t.unpin(key(0))
    assert t.put(key(2), chunk(2))               # 0 (unpinned) gives way
    assert t.contains_many([key(0), key(1), key(2)]) == [False, True, True]
    assert t.put(key(3), chunk(3, 3 * N)) is False  # larger than the whole budget


def test_ttl_expires_unused_but_not_pinned(make_tier):
    t = make_tier(ttl_s=1.0)
    t.put(key(0), chunk(0))
    t.put(key(1), chunk(1))
    t.pin(key(1))
    time.sleep(1.6)
    assert t.get(key(0)) is None
    assert t.contains_many([key(0), key(1)]) == [False, True]
    assert torch.equal(t.get(key(1)), chunk(1))
    t.unpin(key(1))                              # expiry restarts from now
    assert t.contains(key(1))


def test_remove_and_evict(make_tier):
    t = make_tier()
    for i in range(4):
        t.put(key(i), chunk(i))
    assert t.remove(key(0)) and not t.remove(key(0))
    t.pin(key(1))
    t.remove(key(1))                             # remove drops even a pinned chunk
    assert t.evict(N) == N                       # key 2, the oldest left
    assert t.contains_many([key(2), key(3)]) == [False, True]
    assert t.stats().entries == 1


def test_close_releases_everything(make_tier, request):
    fds = open_fds()
    t = make_tier()
    for i in range(3):
        t.put(key(i), chunk(i))
        t.get(key(i))
    t.close()
    with pytest.raises(StoreError):
        t.get(key(0))
    with pytest.raises(StoreError):
        t.put(key(5), chunk(5))
    assert open_fds() <= fds
    if make_tier.kind == "redis":
        assert request.getfixturevalue("redis_server").num_clients() == 0
