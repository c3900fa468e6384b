"""``lmdisagg simulate`` end to end (a subprocess per run), plus the simulator's invariants."""
from __future__ import annotations

import pytest

from lmdisagg.router.policy import POLICIES
from lmdisagg.sim.simulator import SimConfig, Simulator
from lmdisagg.sim.trace import load_trace

from .conftest import run_cli, simulate_json

SMALL = ("--workers", "8", "--cache-chunks", "400", "--cpu-cache-chunks", "0", "--speedup", "2")


@pytest.fixture(scope="module")
def reports(trace_file):
    return {p: simulate_json("--trace", str(trace_file), "--policy", p, *SMALL) for p in sorted(POLICIES)}


def test_json_line_has_the_documented_fields(reports, trace_file):
    for r in reports.values():
        for k in ("hit_rate", "oracle_hit_rate", "ttft_p50_s", "ttft_p99_s", "slo_attainment", "load_spread"):
            assert isinstance(r[k], float), k
        assert r["requests"] == 600 and 0 <= r["hit_rate"] <= r["oracle_hit_rate"] + 1e-12
        assert r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 <= r["slo_attainment"] <= 1
        assert r["index_stats"]["rejected_out_of_order"] == 0 and r["index_stats"]["gaps"] == 0
    assert len({r["oracle_hit_rate"] for r in reports.values()}) == 1   # same trace, same oracle


def test_cache_aware_beats_the_baselines_on_the_same_trace(reports):
    ca, rr, ll, pt = (reports[p] for p in ("cache_aware", "round_robin", "least_loaded", "prefix_tree"))
    assert ca["hit_rate"] >= 0.9 * ca["oracle_hit_rate"]
    assert ca["hit_rate"] > 1.5 * max(rr["hit_rate"], ll["hit_rate"])
    assert ca["ttft_p99_s"] < min(rr["ttft_p99_s"], ll["ttft_p99_s"])
    assert ca["ttft_p50_s"] < min(rr["ttft_p50_s"], ll["ttft_p50_s"])
    assert ca["hit_rate"] >= pt["hit_rate"] - 0.02                 # exact keys lose nothing to the tree
    assert ca["predicted_hit_rate"] == pytest.approx(ca["hit_rate"], abs=0.02)  # the index is right


def test_human_table_output(trace_file):
    out = run_cli("--trace", str(trace_file), "--limit", "50", "--workers", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("| policy | hit rate |") and "| cache_aware |" in out.stdout


def test_thousand_workers_replay_correctly(trace_file, reports):
    """Scale: 1,000 simulated workers through the real index and policy (time is not asserted:
    benchmarks/sim_bench.py reports it). More idle workers must not make anything worse."""
    args = [a if a != "8" else "1000" for a in SMALL]
    r = simulate_json("--trace", str(trace_file), "--policy", "cache_aware", *args)
    eight = reports["cache_aware"]
    assert r["workers"] == 1000 and r["requests"] == 600 and r["min_requests_per_worker"] == 0
    assert r["hit_rate"] >= 0.9 * r["oracle_hit_rate"]
    assert r["ttft_p99_s"] <= eight["ttft_p99_s"]
    assert r["index_stats"]["batches"] > 0 and r["cache_overflows"] == 0


def test_lost_event_batches_are_detected_and_resynced(trace_file):
    base = simulate_json("--trace", str(trace_file), *SMALL)
    lossy = simulate_json("--trace", str(trace_file), *SMALL, "--event-loss", "0.3", "--seed", "3")
    st = lossy["index_stats"]
    assert lossy["lost_event_batches"] > 0 and st["gaps"] > 0 and st["resyncs"] > 0
    assert lossy["resync_requests"] == st["gaps"]
    assert lossy["hit_rate"] >= 0.9 * base["hit_rate"]


def test_disaggregated_and_deterministic(trace_file):
    args = ("--trace", str(trace_file), "--workers", "4", "--decode-workers", "4", "--limit", "200")
    a, b = simulate_json(*args), simulate_json(*args)
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b and a["decode_workers"] == 4
    assert a["e2e_p50_s"] > a["ttft_p50_s"]


@pytest.mark.parametrize("policy", ["cache_aware", "prefix_tree"])
def test_replay_leaves_no_pinned_blocks_and_index_mirrors_caches(trace_file, policy):
    sim = Simulator(SimConfig(workers=6, policy=policy, cache_chunks=150, cpu_cache_chunks=200),
                    load_trace(trace_file, limit=300))
    rep = sim.run()
    assert rep.requests == 300
    for w in sim.prefill:
        assert not w.cache.pinned and w.busy is None and not w.queue and w.load.running == 0
        assert w.load.queued_requests == 0 and w.load.free_blocks == w.gpu_chunks
        held = {(k, "gpu") for k in w.cache.lru} | {(k, "cpu") for k in w.cache.cpu}
        assert {(k, t) for k in sim.index.keys_of(w.worker_id) for t in sim.index.holders(k)[w.worker_id]} == held
    assert all(r >= 0 for r in (rep.ttft_p50_s, rep.e2e_p50_s))
