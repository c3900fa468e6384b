"""A real engine (SmolLM2, CPU fp32) reusing a ~2K-token prompt's KV from every tier.

L1 (the engine's own pool) holds 9 blocks of 256 tokens: exactly one request, so running another
~2K prompt evicts the first from the engine and its next hit must come from the store.
"""
from __future__ import annotations

import pytest

from lmdisagg.engine import Engine, SamplingParams
from lmdisagg.kv.store import StoreBridge, TieredStore, store_namespace
from lmdisagg.kv.store.disk import DiskTier
from lmdisagg.kv.store.host import HostTier
from lmdisagg.kv.store.redis_tier import RedisTier

from tests.store.conftest import make_prompt

T = 256
PROMPT = 8 * T + 37            # 8 full chunks + a tail
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


def tiny_engine() -> Engine:
    return Engine(model="smollm2-135m", num_blocks=9, max_model_len=9 * T)


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_server):
    """One tiny-L1 engine; P and Q computed cold once, their chunks written through to every tier."""
    import uuid
    e = tiny_engine()
    ns = store_namespace(e)
    disk = tmp_path_factory.mktemp("kvdisk")
    redis_ns = f"{ns}-{uuid.uuid4().hex[:6]}"
    store = TieredStore([HostTier(1 << 30), DiskTier(disk, ns, 1 << 30), RedisTier(redis_server.url, redis_ns)])
    bridge = StoreBridge(e, store, load_timeout_s=30)
    P, Q = make_prompt(e, PROMPT, seed=1), make_prompt(e, PROMPT, seed=2)
    (p_ref, p_load), = bridge.generate([P], PARAMS)
    assert p_load.cached_chunks == 0 and p_load.served == {} and p_ref.cached_tokens == 0
    assert bridge.flush(60)
    (q_ref, _), = bridge.generate([Q], PARAMS)
    assert bridge.flush(60)
    w = dict(engine=e, store=store, bridge=bridge, disk=disk, redis_ns=redis_ns, P=P, Q=Q,
             p_ref=p_ref, q_ref=q_ref)
    yield w
    w["bridge"].close()
    w["store"].close()


def run(w, bridge, prompt, ref):
    """One request through the bridge; checks same tokens; -> (LoadResult, prompt tokens computed)."""
    e = w["engine"]
    before = e.stats.computed_prompt_tokens
    (res, load), = bridge.generate([prompt], PARAMS)
    assert bridge.flush(60)
    assert res.token_ids == ref.token_ids
    assert res.cached_tokens == load.cached_chunks * T
    return load, e.stats.computed_prompt_tokens - before


def swap_store(w, tiers):
    w["bridge"].close()
    w["store"].close()
    w["store"] = TieredStore(tiers)
    w["bridge"] = StoreBridge(w["engine"], w["store"], load_timeout_s=30)
    return w["bridge"]


def test_second_request_computes_only_the_tail(world):
    w = world
    load, computed = run(w, w["bridge"], w["Q"], w["q_ref"])  # Q was the last one: still in L1
    assert load.engine_chunks == 8 and load.served == {} and load.cached_chunks == 8
    assert computed == PROMPT - 8 * T


def test_evicted_hit_is_served_by_each_tier_in_turn(world, redis_server):
    w = world
    e = w["engine"]
    ns = store_namespace(e)
    stages = [
        ("cpu", None),
        ("disk", [DiskTier(w["disk"], ns, 1 << 30), RedisTier(redis_server.url, w["redis_ns"])]),  # L2 off
        ("redis", [RedisTier(redis_server.url, w["redis_ns"])]),                                  # L3 off too
    ]
    for tier, tiers in stages:
        bridge = w["bridge"] if tiers is None else swap_store(w, tiers)
        # Q (served from the store itself) pushes P out of the 9-block engine ...
        q_load, _ = run(w, bridge, w["Q"], w["q_ref"])
        assert e.cached_prefix(e.chunk_keys(w["P"])) == 0
        # ... so P's 8 chunks must come from `tier`, and only the tail is computed
        load, computed = run(w, bridge, w["P"], w["p_ref"])
        assert load.engine_chunks == 0
        assert load.served == {tier: 8}, (tier, load)
        assert load.cached_chunks == 8 and not load.timed_out and load.failed == 0
        assert computed == PROMPT - 8 * T
        hits = {s.name: s.hits for s in w["store"].stats().tiers}
        assert hits[tier] >= 8


def test_restarted_process_reuses_disk_and_redis(world, redis_server):
    w = world
    ns = store_namespace(w["engine"])
    for name, make in [("disk", lambda: DiskTier(w["disk"], ns, 1 << 30)),
                       ("redis", lambda: RedisTier(redis_server.url, w["redis_ns"]))]:
        fresh = tiny_engine()                       # a new process: empty L1, new store objects
        assert store_namespace(fresh) == ns
        store = TieredStore([make()])
        bridge = StoreBridge(fresh, store, load_timeout_s=30)
        before = fresh.stats.computed_prompt_tokens
        (res, load), = bridge.generate([w["P"]], PARAMS)
        assert load.served == {name: 8} and res.cached_tokens == 8 * T
        assert res.token_ids == w["p_ref"].token_ids
        assert fresh.stats.computed_prompt_tokens - before == PROMPT - 8 * T
        bridge.close()
        store.close()
        assert fresh.blocks.num_free == fresh.blocks.num_blocks  # no engine pins left behind
