"""The global chunk index: ordering of event batches, tiers, pending routes, worker removal."""
from __future__ import annotations

import random

import pytest

from lmdisagg.errors import InvalidRequestError
from lmdisagg.router.events import EventBatcher, EventDecodeError, KVEventBatch
from lmdisagg.router.index import ChunkIndex


def keys(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


def stored(worker: str, seq: int, ks, tier: str = "gpu", **kw) -> KVEventBatch:
    return KVEventBatch(worker, seq, [(k, tier) for k in ks], [], **kw)


def test_prefix_match_is_leading_and_exact():
    ix = ChunkIndex()
    ix.add_worker("a"), ix.add_worker("b")
    p = keys(6)
    assert ix.apply(stored("a", 0, p[:4])).accepted
    assert ix.apply(stored("b", 0, p[:2] + p[3:6])).accepted   # b misses chunk 2
    assert ix.matched_prefix("a", p).chunks == 4
    assert ix.matched_prefix("b", p).chunks == 2              # leading run only
    every = ix.match_all(p)
    assert {w: m.chunks for w, m in every.items()} == {"a": 4, "b": 2}
    assert ix.match_all(keys(3, seed=9)) == {}                 # nobody holds an unknown prompt
    with pytest.raises(InvalidRequestError):
        ix.matched_prefix("nobody", p)


def test_unknown_worker_duplicates_and_old_batches_are_rejected_and_counted():
    ix = ChunkIndex()
    ix.add_worker("a")
    p = keys(3)
    r = ix.apply(stored("ghost", 0, p))
    assert not r.accepted and r.reason == "unknown_worker"
    assert ix.apply(stored("a", 0, p[:1])).accepted
    dup = ix.apply(stored("a", 0, p[:1]))
    assert not dup.accepted and dup.reason == "out_of_order"
    assert ix.apply(stored("a", 1, p[1:2])).accepted
    old = ix.apply(KVEventBatch("a", 0, [], [(p[0], "gpu")]))   # a late eviction must not apply
    assert not old.accepted
    assert ix.matched_prefix("a", p).chunks == 2
    s = ix.stats
    assert (s.rejected_unknown_worker, s.rejected_out_of_order, s.batches) == (1, 2, 2)
    assert ix.match_all(p)["a"].chunks == 2 and "ghost" not in ix


def test_gap_marks_stale_until_resync_snapshot():
    ix = ChunkIndex()
    ix.add_worker("a")
    bt = EventBatcher("a")
    p = keys(5)
    bt.add([("stored", k) for k in p])
    ix.apply(bt.flush())
    bt.add([("evicted", p[4]), ("evicted", p[3])])
    bt.flush()                                                  # lost on the way
    bt.add([("stored", keys(1, seed=5)[0])])
    r = ix.apply(bt.flush())
    assert r.accepted and r.reason == "gap" and r.need_resync and ix.is_stale("a")
    assert ix.match_all(p)["a"].stale
    assert ix.matched_prefix("a", p).chunks == 5                # stale: the lost evictions still show
    r = ix.apply(bt.resync())
    assert r.accepted and r.reason == "resync" and not r.need_resync and not ix.is_stale("a")
    assert ix.matched_prefix("a", p).chunks == 3
    assert set(ix.keys_of("a")) == {k for k, _ in bt.held}
    assert ix.stats.gaps == 1 and ix.stats.resyncs == 1


def test_tiers_breakdown_and_shared_remote_tier():
    ix = ChunkIndex()
    for w in "abc":
        ix.add_worker(w)
    p = keys(6)
    ix.apply(KVEventBatch("a", 0, [(p[0], "gpu"), (p[1], "l1"), (p[2], "cpu"), (p[2], "disk")]))
    ix.apply(stored("b", 0, p[:5], "remote"))                # remote is reachable from everyone
    m = ix.match_all(p)
    assert m["a"].chunks == 5 and m["a"].by_tier == {"gpu": 2, "cpu": 1, "remote": 2}
    assert m["c"].chunks == 5 and m["c"].by_tier == {"remote": 5}
    assert ix.matched_prefix("a", p).by_tier == m["a"].by_tier
    assert ix.holders(p[2]) == {"a": ["cpu", "disk"], "b": ["remote"]}
    ix.apply(KVEventBatch("a", 1, [], [(p[2], "cpu")]))        # drops one tier, keeps disk
    assert ix.matched_prefix("a", p).by_tier == {"gpu": 2, "disk": 1, "remote": 2}
    with pytest.raises(EventDecodeError):
        ix.apply(stored("a", 2, p[:1], "tape"))
    assert ix.apply(stored("a", 2, p[:1])).accepted            # the bad batch changed nothing


def test_pending_routes_expire_or_become_real():
    now = [0.0]
    ix = ChunkIndex(clock=lambda: now[0], pending_ttl_s=10.0)
    ix.add_worker("a"), ix.add_worker("b")
    p = keys(4)
    ix.note_routed("a", p)
    m = ix.match_all(p)["a"]
    assert m.chunks == 4 and m.by_tier == {"pending": 4}
    ix.apply(stored("a", 0, p[:2]))                             # two became real
    assert ix.match_all(p)["a"].by_tier == {"gpu": 2, "pending": 2}
    now[0] = 10.5                                               # the rest never came
    assert ix.match_all(p)["a"].by_tier == {"gpu": 2}
    ix.note_routed("b", p)
    now[0] = 15.0
    ix.note_routed("b", p)                                      # routed again: the later TTL counts
    now[0] = 21.0
    assert ix.matched_prefix("b", p).chunks == 4
    now[0] = 26.0
    assert ix.matched_prefix("b", p).chunks == 0


def test_remove_worker_frees_everything_and_slot_is_reused():
    ix = ChunkIndex()
    for w in ("a", "b"):
        ix.add_worker(w)
    p = keys(1000)
    ix.apply(stored("a", 0, p))
    ix.apply(stored("b", 0, p[:10], "cpu"))
    ix.note_routed("a", keys(3, seed=4))
    assert len(ix) == 1010
    assert ix.remove_worker("a") == 1000
    assert ix.match_all(p) == {"b": ix.match_all(p)["b"]} and ix.match_all(p)["b"].chunks == 10
    assert ix.match_all(keys(3, seed=4)) == {}
    ix.add_worker("c")                                          # takes a's slot, starts empty
    assert ix.match_all(p).keys() == {"b"} and ix.num_keys("c") == 0
    assert ix.apply(stored("c", 0, p[:1])).accepted
    assert len(ix) == 11 and ix.holders(p[0]) == {"b": ["cpu"], "c": ["gpu"]}  # nothing of a left


def test_many_workers_and_keys_stay_consistent():
    """64 workers with overlapping random holdings: match_all agrees with per-worker matching."""
    rng = random.Random(7)
    ix = ChunkIndex()
    prompt = keys(40, seed=1)
    ws = [f"w{i}" for i in range(64)]
    for i, w in enumerate(ws):
        ix.add_worker(w)
        depth = rng.randrange(0, 41)
        tiers = [rng.choice(["gpu", "gpu", "cpu", "disk"]) for _ in range(depth)]
        ix.apply(KVEventBatch(w, 0, list(zip(prompt[:depth], tiers)) + [(k, "gpu") for k in keys(500, seed=100 + i)]))
    every = ix.match_all(prompt)
    for w in ws:
        one = ix.matched_prefix(w, prompt)
        got = every.get(w)
        assert (got.chunks if got else 0) == one.chunks
        if got:
            assert got.by_tier == one.by_tier
