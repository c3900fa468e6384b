"""The bridge as a worker drives it: add_request → poll → step → after_step, abort, stats."""
from __future__ import annotations

import time

import pytest

from lmdisagg.engine import SamplingParams
from lmdisagg.errors import InvalidRequestError
from lmdisagg.kv.store import StoreBridge, TieredStore, store_namespace
from lmdisagg.kv.store.disk import DiskTier
from lmdisagg.kv.store.fake import FakeTier
from lmdisagg.kv.store.host import HostTier

from tests.store.conftest import make_prompt

PARAMS = SamplingParams(max_tokens=3, ignore_eos=True)


def drive(bridge, rids, timeout_s=120):
    """A worker's loop until the given requests finish; -> {rid: (tokens, cached_tokens)}."""
    got = {r: ([], 0) for r in rids}
    done = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for r in bridge.poll():
            assert r.error is None
        outs = bridge.engine.step()
        if not outs:
            time.sleep(0.001)
        for o in outs:
            toks, _ = got[o.request_id]
            got[o.request_id] = (toks + o.new_token_ids, o.cached_tokens)
            if o.finished:
                done.add(o.request_id)
        bridge.after_step()
        if done == set(rids):
            return got
    raise AssertionError("requests did not finish")


def test_worker_loop_admits_after_load_and_abort_drops_a_loading_request(eng, tmp_path, no_thread_leak):
    store = TieredStore([HostTier(1 << 28), DiskTier(tmp_path, store_namespace(eng), 1 << 28)])
    bridge = StoreBridge(eng, store, load_timeout_s=10)
    p = make_prompt(eng, 8 * 16 + 5, seed=31)
    q = make_prompt(eng, 8 * 16 + 5, seed=32)
    with pytest.raises(InvalidRequestError):
        bridge.add_request("bad", [], PARAMS)          # validated at once, nothing queued
    bridge.add_request("p1", p, PARAMS)
    with pytest.raises(InvalidRequestError):
        bridge.add_request("p1", p, PARAMS)
    cold = drive(bridge, ["p1"])["p1"]
    assert bridge.flush(30)
    bridge.add_request("q1", q, PARAMS)
    drive(bridge, ["q1"])                              # evicts p from the 9-block engine
    assert bridge.flush(30)
    bridge.add_request("p2", p, PARAMS)
    bridge.add_request("gone", q, PARAMS)
    assert bridge.abort("gone")                        # aborted while its chunks load
    warm = drive(bridge, ["p2"])["p2"]
    assert warm == (cold[0], 8 * 16)
    assert "gone" not in eng.seqs and not bridge.abort("gone")
    st = bridge.stats()
    assert st["loads"] == 4 and st["served_chunks"] == {"cpu": 8} and st["offloaded"] >= 16
    assert st["store"].tiers[0].hits == 8
    bridge.close()
    store.close()
    assert eng.blocks.num_free == eng.blocks.num_blocks


@pytest.mark.parametrize("bps, used", [(1e6, False), (1e10, True)])
def test_a_tier_slower_than_recompute_is_skipped(eng, bps, used, no_thread_leak):
    """This CPU engine recomputes KV at some MB/s; a FakeTier link of 1 MB/s is slower, so once
    a load has measured it the bridge recomputes instead; at 10 GB/s it keeps loading."""
    store = TieredStore([FakeTier(latency_s=0.001, bandwidth_bps=bps)])
    bridge = StoreBridge(eng, store, load_timeout_s=60)
    p = make_prompt(eng, 2 * 16 + 5, seed=41)          # 2 chunks (1.5 MB each)
    q = make_prompt(eng, 8 * 16 + 5, seed=42)          # fills the 9-block engine: evicts p
    drive_one(bridge, q)
    cold, _ = drive_one(bridge, p)
    drive_one(bridge, q)
    tokens, load = drive_one(bridge, p)                # by now a load went through the tier
    assert tokens == cold and "fake" in bridge.speed.tier_bps
    drive_one(bridge, q)
    tokens, load = drive_one(bridge, p)
    assert tokens == cold
    if used:
        assert load.served == {"fake": 2} and load.skipped_slow == 0
    else:
        assert load.served == {} and load.skipped_slow == 2, (load, bridge.stats())
    st = bridge.stats()
    assert st["prefill_tokens_per_s"] > 0 and st["tier_bytes_per_s"]["fake"] > 0
    bridge.close()
    store.close()


def drive_one(bridge, *prompts):
    """Run prompts one after another through the bridge; -> (tokens, LoadResult) of the last."""
    for prompt in prompts:
        (res, load), = bridge.generate([prompt], PARAMS, timeout_s=120)
        assert bridge.flush(60)
    return res.token_ids, load


def test_config_pinned_prefix_survives_a_full_l2(eng, no_thread_leak):
    """StoreConfig.bridge pins a system prompt's chunks: a tiny L2 evicts everything else."""
    from lmdisagg.kv.store import StoreConfig
    system = ("You are a careful assistant. Answer briefly, cite the provided documents, and say so "
              "plainly when the documents do not contain the answer to the question.")
    sys_ids = eng.encode(system)
    n_sys = len(sys_ids) // 16
    assert n_sys >= 1
    chunk = eng.layout.chunk_nbytes
    bridge = StoreConfig(cpu_bytes=(n_sys + 3) * chunk, pinned_prefixes=[system]).bridge(eng)
    prompts = [sys_ids + make_prompt(eng, 6 * 16, seed=60 + i) for i in range(3)]
    for p in prompts:                                 # (n_sys + 6) chunks each, L2 holds n_sys + 3
        drive_one(bridge, p)
    host = bridge.store.tiers[0]
    keys = eng.chunk_keys(sys_ids)
    st = host.stats()
    assert st.pinned == n_sys and st.evictions > 0 and st.bytes <= (n_sys + 3) * chunk
    assert host.contains_many(keys) == [True] * n_sys
    bridge.close()
    bridge.store.close()
