"""Faults with a real engine: Redis stopped or frozen mid-run, a corrupt disk chunk, full budgets.
Every request must still succeed with the same tokens; nothing may hang or leak."""
from __future__ import annotations

import os
import signal
import time

import pytest

from lmdisagg.engine import SamplingParams
from lmdisagg.kv.store import StoreBridge, TieredStore, store_namespace
from lmdisagg.kv.store.disk import DiskTier
from lmdisagg.kv.store.host import HostTier
from lmdisagg.kv.store.redis_tier import RedisTier

from tests.store.conftest import make_prompt

T = 16                                   # small chunks: many of them, quick to compute
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(eng):
    ps = [make_prompt(eng, 8 * T + 2, seed=s) for s in range(10, 16)]
    refs = [r.token_ids for r in eng.generate(ps[0], PARAMS) + eng.generate(ps[1], PARAMS)]
    return ps, refs


def fill(bridge, p, q):
    """Compute p in this test's store (its chunks are offloaded), then evict it with q."""
    once(bridge, q)   # whatever the engine held before, p is not in it after this
    res, load = once(bridge, p)
    assert load.engine_chunks == 0
    once(bridge, q)


def once(bridge, prompt):
    (res, load), = bridge.generate([prompt], PARAMS, timeout_s=120)
    assert bridge.flush(30)
    return res, load


def test_redis_stopped_mid_run_recomputes_counts_and_recovers(eng, prompts, own_redis, namespace, no_thread_leak):
    (p, q), (p_ref, _) = prompts[0][:2], prompts[1]
    store = TieredStore([RedisTier(own_redis.url, namespace, op_timeout_s=1.0)], retry_after_s=0.5)
    bridge = StoreBridge(eng, store, load_timeout_s=5)
    fill(bridge, p, q)
    res, load = once(bridge, p)
    assert load.served == {"redis": 8} and res.token_ids == p_ref

    own_redis.stop()                                  # the server dies
    once(bridge, q)
    t0 = time.perf_counter()
    res, load = once(bridge, p)                       # recomputed: same tokens, no hang
    assert time.perf_counter() - t0 < 5
    assert res.token_ids == p_ref and load.served == {} and load.cached_chunks == 0
    st = store.stats()
    assert st.failures["redis"] >= 1 and st.tiers[0].errors >= 1
    assert bridge.offload_errors == 0                 # failures are absorbed by the store, not raised

    own_redis.start()                                 # back (empty): the tier is probed again
    time.sleep(0.6)
    once(bridge, q)
    res, load = once(bridge, p)                       # a miss on the empty server: recomputed ...
    assert load.cached_chunks == 0 and res.token_ids == p_ref
    once(bridge, q)                                   # ... and written to it
    res, load = once(bridge, p)
    assert load.served == {"redis": 8} and res.token_ids == p_ref
    assert store.stats().down == []
    bridge.close()
    store.close()
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert own_redis.num_clients() == 0


def test_frozen_redis_times_out_instead_of_hanging(eng, prompts, own_redis, namespace, no_thread_leak):
    (p, q), (p_ref, _) = prompts[0][:2], prompts[1]
    store = TieredStore([RedisTier(own_redis.url, namespace, op_timeout_s=1.5)], retry_after_s=60)
    bridge = StoreBridge(eng, store, load_timeout_s=0.3)
    fill(bridge, p, q)
    os.kill(own_redis.proc.pid, signal.SIGSTOP)       # accepts nothing, answers nothing
    try:
        t0 = time.perf_counter()
        (res, load), = bridge.generate([p], PARAMS, timeout_s=60)
        assert res.token_ids == p_ref and load.timed_out and load.cached_chunks == 0
        assert load.seconds < 1.0                     # the load gave up at its deadline
        assert time.perf_counter() - t0 < 10
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    assert bridge.flush(30)
    bridge.close()
    store.close()
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_corrupt_disk_chunk_is_caught_deleted_and_recomputed(eng, prompts, tmp_path, no_thread_leak):
    (p, q), (p_ref, _) = prompts[0][:2], prompts[1]
    disk = DiskTier(tmp_path, store_namespace(eng), 1 << 30)
    store = TieredStore([disk])
    bridge = StoreBridge(eng, store, load_timeout_s=10)
    fill(bridge, p, q)
    keys = eng.chunk_keys(p)
    bad = disk.path(keys[3])
    with open(bad, "r+b") as f:                       # flip one byte of chunk 3's payload
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    res, load = once(bridge, p)
    assert res.token_ids == p_ref
    assert load.failed == 1 and load.cached_chunks == 3  # chunks 0-2 reused, 3.. recomputed
    assert disk.stats().corrupt == 1
    # the recomputed chunk was offloaded again, intact: the next evicted hit is whole
    once(bridge, q)
    res, load = once(bridge, p)
    assert load.served == {"disk": 8} and res.token_ids == p_ref
    bridge.close()
    store.close()


def test_full_budgets_evict_and_demote_never_crash(eng, prompts, tmp_path, no_thread_leak):
    ps, (p_ref, q_ref) = prompts
    chunk = eng.layout.chunk_nbytes
    host = HostTier(5 * chunk)
    disk = DiskTier(tmp_path, store_namespace(eng), 12 * chunk)
    store = TieredStore([host, disk], write_through=False, io_threads=2)  # one writer: a fixed order
    bridge = StoreBridge(eng, store, load_timeout_s=10)
    cold = [once(bridge, p)[0].token_ids for p in ps]  # 6 prompts x 8 chunks >> 5 + 12 chunks
    h, d = host.stats(), disk.stats()
    assert h.bytes <= 5 * chunk and d.bytes <= 12 * chunk
    assert h.evictions > 0 and d.evictions > 0 and d.puts > 0  # L2 victims went down to L3
    res, load = once(bridge, ps[0])                   # long gone from every tier: recomputed
    assert res.token_ids == p_ref
    res, load = once(bridge, ps[-1])                  # the newest prompt: demoted, not dropped
    assert res.token_ids == cold[-1]
    assert load.cached_chunks == 8 and load.served.get("disk", 0) > 0
    bridge.close()
    store.close()
    assert eng.blocks.num_free == eng.blocks.num_blocks
