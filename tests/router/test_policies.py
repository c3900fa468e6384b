"""Placement policies through make_policy: each rule of cache_aware, and the three baselines."""
from __future__ import annotations

import random

import pytest

from lmdisagg.errors import InvalidRequestError, UnavailableError
from lmdisagg.router.events import KVEventBatch
from lmdisagg.router.index import ChunkIndex
from lmdisagg.router.policy import POLICIES, PlacementRequest, WorkerLoad, make_policy

T = 256  # chunk tokens (the engine default, and CostModel's)


def keys(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


def loads(n: int, prefix: str = "p", node=lambda i: "n0", **per) -> list[WorkerLoad]:
    out = [WorkerLoad(f"{prefix}{i}", 0, 0, 1000, 1000, 0, node(i)) for i in range(n)]
    for wid, fields in per.items():
        w = next(x for x in out if x.worker_id == wid)
        for k, v in fields.items():
            setattr(w, k, v)
    return out


def index_with(holdings: dict[str, list[tuple[bytes, str]]], workers=()) -> ChunkIndex:
    ix = ChunkIndex()
    for w in set(workers) | set(holdings):
        ix.add_worker(w)
    for w, st in holdings.items():
        assert ix.apply(KVEventBatch(w, 0, st)).accepted
    return ix


def req(ks, tokens: int | None = None, rid: str = "r") -> PlacementRequest:
    return PlacementRequest(rid, ks, tokens if tokens is not None else len(ks) * T)


def test_registry_and_typed_errors():
    assert set(POLICIES) == {"round_robin", "least_loaded", "prefix_tree", "cache_aware"}
    with pytest.raises(InvalidRequestError, match="unknown placement policy"):
        make_policy("random")
    with pytest.raises(ValueError):                   # pydantic validators see a ValueError
        make_policy("random")
    with pytest.raises(InvalidRequestError, match="bad options"):
        make_policy("cache_aware", no_such_knob=1)
    for name in POLICIES:
        with pytest.raises(UnavailableError):
            make_policy(name).choose(req(keys(2)), [], None, ChunkIndex())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_scores_every_candidate_and_counts(name):
    pol = make_policy(name)
    ws = loads(4)
    ix = index_with({}, [w.worker_id for w in ws])
    p = pol.choose(req(keys(3)), ws, None, ix)
    assert set(p.scores) == {w.worker_id for w in ws} and p.decode == p.prefill
    d = pol.choose(req(keys(3)), ws, loads(2, "d"), ix)
    assert d.decode in {"d0", "d1"}
    bare = pol.choose(req(keys(3)), ws, None)          # no index wired: nothing counts as cached
    assert bare.cached_chunks == 0 and bare.prefill in p.scores
    assert sum(pol.counters.decisions.values()) == 3 and pol.counters.prompt_chunks == 9


def test_cache_aware_prefers_the_holder_and_explains_why():
    p = keys(20)
    ix = index_with({"p2": [(k, "gpu") for k in p[:16]], "p1": [(k, "gpu") for k in p[:4]]}, ["p0", "p3"])
    pol = make_policy("cache_aware")
    out = pol.choose(req(p), loads(4), None, ix)
    assert (out.prefill, out.cached_chunks, out.reason) == ("p2", 16, "cache")
    assert out.scores["p2"] < out.scores["p1"] < out.scores["p0"] == out.scores["p3"]
    assert pol.counters.cached_chunks == 16


def test_cache_aware_leaves_a_busy_holder_when_waiting_costs_more_than_recomputing():
    p = keys(8)
    ix = index_with({"p0": [(k, "gpu") for k in p]}, ["p1"])
    pol = make_policy("cache_aware")
    short_queue = pol.choose(req(p), loads(2, p0={"queued_prefill_tokens": 2000}), None, ix)
    assert short_queue.prefill == "p0"
    long_queue = pol.choose(req(p), loads(2, p0={"queued_prefill_tokens": 80_000}), None, ix)
    assert long_queue.prefill == "p1" and long_queue.reason == "load"
    assert long_queue.scores["p0"] > long_queue.scores["p1"]


def test_load_guard_refuses_the_best_score_when_its_queue_is_far_behind():
    p = keys(200)  # 51k tokens: recomputing costs more than a 3 s queue
    ix = index_with({"p0": [(k, "gpu") for k in p]}, ["p1"])
    ws = loads(2, p0={"queued_prefill_tokens": 60_000})
    free = make_policy("cache_aware", max_queue_gap_s=1e9).choose(req(p), ws, None, ix)
    assert free.prefill == "p0"
    guarded = make_policy("cache_aware", max_queue_gap_s=1.0)
    out = guarded.choose(req(p), ws, None, ix)
    assert out.prefill == "p1" and out.reason == "guard" and guarded.guard_trips == 1
    assert out.scores["p0"] < out.scores["p1"]  # the score still says p0: the guard decided


def test_tiers_are_weighted_by_their_load_cost():
    p = keys(12)
    ix = index_with({"p0": [(k, "disk") for k in p], "p1": [(k, "gpu") for k in p]})
    pol = make_policy("cache_aware")
    out = pol.choose(req(p), loads(2), None, ix)
    assert out.prefill == "p1" and out.scores["p1"] < out.scores["p0"]
    # a tier slower than recomputing is worth nothing, never less than nothing
    crawl = make_policy("cache_aware", disk_gbps=0.001)
    s = crawl.choose(req(p), loads(3), None, index_with({"p0": [(k, "disk") for k in p]}, ["p1", "p2"])).scores
    assert s["p0"] == pytest.approx(s["p2"])


def test_stale_worker_counts_for_less():
    p = keys(10)
    ix = index_with({"p0": [(k, "gpu") for k in p], "p1": [(k, "gpu") for k in p]})
    ix.apply(KVEventBatch("p0", 5, []))  # a gap: p0 is stale
    assert ix.is_stale("p0")
    out = make_policy("cache_aware").choose(req(p), loads(2), None, ix)
    assert out.prefill == "p1" and out.scores["p0"] > out.scores["p1"]


def test_pending_route_makes_a_burst_follow_the_first_request():
    p = keys(30)
    ix = index_with({}, ["p0", "p1", "p2", "p3"])
    pol = make_policy("cache_aware")
    ws = loads(4)
    first = pol.choose(req(p, rid="a"), ws, None, ix)
    assert first.reason == "load"
    next(w for w in ws if w.worker_id == first.prefill).queued_prefill_tokens = len(p) * T
    second = pol.choose(req(p, rid="b"), ws, None, ix)
    assert second.prefill == first.prefill and second.cached_chunks == 30
    off = make_policy("cache_aware", note_pending=False)
    ix2 = index_with({}, ["p0", "p1", "p2", "p3"])
    ws2 = loads(4)
    a = off.choose(req(p, rid="a"), ws2, None, ix2)
    next(w for w in ws2 if w.worker_id == a.prefill).queued_prefill_tokens = len(p) * T
    assert off.choose(req(p, rid="b"), ws2, None, ix2).prefill != a.prefill


def test_decode_by_headroom_and_transfer_by_topology():
    pol = make_policy("cache_aware")
    dec = loads(3, "d", node=lambda i: f"n{i}", d0={"free_blocks": 5}, d1={"running": 30, "free_blocks": 200},
                d2={"running": 2, "free_blocks": 900})
    pre = loads(3, node=lambda i: f"n{i}")
    ix = index_with({}, [w.worker_id for w in pre])
    out = pol.choose(req(keys(16)), pre, dec, ix)
    assert out.decode == "d2"                       # d0 cannot fit 16 blocks; d1 is busier
    assert out.prefill == "p2"                      # same node as d2: NVLink instead of RDMA
    assert out.scores["p0"] == pytest.approx(out.scores["p1"]) and out.scores["p2"] < out.scores["p0"]
    full = loads(2, "d", d0={"free_blocks": 3}, d1={"free_blocks": 7})
    assert pol.choose(req(keys(16)), pre, full, ix).decode == "d1"   # fits nowhere: most room


def test_baselines():
    ix = index_with({}, ["p0", "p1", "p2"])
    rr = make_policy("round_robin")
    assert [rr.choose(req(keys(1)), loads(3), None, ix).prefill for _ in range(4)] == ["p0", "p1", "p2", "p0"]
    ll = make_policy("least_loaded")
    ws = loads(3, p0={"queued_prefill_tokens": 50}, p1={"queued_prefill_tokens": 10}, p2={"queued_prefill_tokens": 30})
    assert ll.choose(req(keys(1)), ws, None, ix).prefill == "p1"
    fresh, idle = make_policy("least_loaded"), loads(3)
    assert {fresh.choose(req(keys(1)), idle, None, ix).prefill for _ in range(3)} == {"p0", "p1", "p2"}


def test_prefix_tree_follows_its_own_routing_history():
    pol = make_policy("prefix_tree", chunk_tokens=4)
    ix = index_with({}, ["p0", "p1", "p2"])
    ws = loads(3)
    head = list(range(1000, 1040))
    a = PlacementRequest("a", [], 50, head + list(range(10)))
    first = pol.choose(a, ws, None, ix)
    assert first.reason == "explore"
    b = PlacementRequest("b", [], 50, head + list(range(50, 60)))
    second = pol.choose(b, ws, None, ix)
    assert second.prefill == first.prefill and second.reason == "cache" and second.scores[first.prefill] == 40
    c = PlacementRequest("c", [], 50, list(range(5000, 5050)))
    assert pol.choose(c, ws, None, ix).prefill != first.prefill    # smallest tree takes new text
    busy = loads(3, **{first.prefill: {"queued_requests": 100}})
    assert pol.choose(b, busy, None, ix).reason == "balance"
