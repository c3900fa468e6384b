"""Router hot path: one placement decision over 64 workers with 1M chunk keys indexed.

    python benchmarks/router_bench.py [--workers 64] [--keys 1000000] [--decisions 5000]

Builds the index through ``ChunkIndex.apply`` (KV event batches, as workers would send them):
20,000 documents of 50 chained chunks, each held by one worker, the 2% most popular by four, some
on the CPU tier. Then times ``policy.choose`` for prompts that share a random document's prefix
(1-50 chunks) and add 1-14 new chunks (64 chunks = 16K tokens at most). Baselines in the same run:
round_robin and least_loaded (no index walk). Also reports event-apply throughput and index memory
(tracemalloc; keys arrive through msgpack as in the router, so their bytes objects count).
Latency is wall time (perf_counter) and the thread's CPU time: on a shared, loaded machine the
wall-time tail is the OS scheduling other processes, which CPU time excludes; both are reported,
with the load average. Prints one table; writes benchmarks/results/router_decision.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, also when run through runpy

from machine import describe  # noqa: E402

from lmdisagg.router.events import KVEventBatch  # noqa: E402
from lmdisagg.router.index import ChunkIndex  # noqa: E402
from lmdisagg.router.policy import PlacementRequest, WorkerLoad, make_policy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DOC_CHUNKS = 50


def build_index(rng: random.Random, n_workers: int, n_keys: int):
    workers = [f"w{i}" for i in range(n_workers)]
    docs = [[rng.randbytes(16) for _ in range(DOC_CHUNKS)] for _ in range(n_keys // DOC_CHUNKS)]
    per: dict[str, list] = {w: [] for w in workers}
    for i, doc in enumerate(docs):
        holders = rng.sample(workers, 4) if i < len(docs) // 50 else [rng.choice(workers)]
        for w in holders:
            tier = "cpu" if rng.random() < 0.2 else "gpu"
            per[w] += [(k, tier) for k in doc]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ix = ChunkIndex()
    for w in workers:
        ix.add_worker(w)
    seqs = dict.fromkeys(workers, 0)
    t0 = time.perf_counter()
    n_events = 0
    for w, items in per.items():
        for s in range(0, len(items), 512):  # batches of 512 events, as a busy worker would send
            b = KVEventBatch.from_msgpack(KVEventBatch(w, seqs[w], items[s:s + 512]).to_msgpack())
            seqs[w] += 1
            n_events += len(b.stored)
            assert ix.apply(b).accepted
    apply_s = time.perf_counter() - t0
    mem = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return ix, workers, docs, n_events, apply_s, mem


def time_policy(name: str, ix, workers, docs, rng: random.Random, n: int, warmup: int) -> dict:
    pol = make_policy(name)
    loads = [WorkerLoad(w, rng.randrange(0, 40000), rng.randrange(0, 32), rng.randrange(100, 4000), 4000)
             for w in workers]
    reqs = []
    for i in range(n + warmup):
        doc = rng.choice(docs)
        ks = doc[:rng.randint(1, DOC_CHUNKS)] + [rng.randbytes(16) for _ in range(rng.randint(1, 14))]
        reqs.append(PlacementRequest(str(i), ks, len(ks) * 256))
    lat, cpu, hits = [], [], 0
    for i, r in enumerate(reqs):
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        p = pol.choose(r, loads, None, ix)
        dt, dc = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
        if i >= warmup:
            lat.append(dt / 1e6)
            cpu.append(dc / 1e6)
            hits += p.cached_chunks
    lat.sort()
    cpu.sort()
    q = lambda a, f: a[min(int(f * len(a)), len(a) - 1)]  # noqa: E731
    return {"policy": name, "decisions": n, "p50_ms": q(lat, 0.50), "p99_ms": q(lat, 0.99), "max_ms": lat[-1],
            "mean_ms": statistics.fmean(lat), "cpu_p50_ms": q(cpu, 0.50), "cpu_p99_ms": q(cpu, 0.99),
            "cpu_max_ms": cpu[-1], "mean_cached_chunks": hits / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "router_decision.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    ix, workers, docs, n_events, apply_s, mem = build_index(rng, args.workers, args.keys)
    distinct = len(docs) * DOC_CHUNKS
    rows = [time_policy(p, ix, workers, docs, rng, args.decisions, warmup=500)
            for p in ("round_robin", "least_loaded", "cache_aware")]
    print(f"index: {args.workers} workers, {distinct:,} distinct keys, {len(ix):,} (worker, key) entries; "
          f"apply {n_events / apply_s / 1e6:.2f} M events/s; {mem / 2**20:.0f} MiB "
          f"({mem / len(ix):.0f} B per entry)")
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores during the run")
    print("| policy | wall p50 (ms) | wall p99 (ms) | CPU p50 (ms) | CPU p99 (ms) | CPU max (ms) | mean cached chunks |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['cpu_p50_ms']:.3f} | "
              f"{r['cpu_p99_ms']:.3f} | {r['cpu_max_ms']:.3f} | {r['mean_cached_chunks']:.1f} |")
    out = {"benchmark": "router_decision", "hardware": describe(), "seed": args.seed,
           "workers": args.workers, "distinct_keys": distinct, "index_entries": len(ix),
           "apply_events_per_s": n_events / apply_s, "index_bytes": mem, "bytes_per_entry": mem / len(ix),
           "load_average": load, "target_p99_ms": 1.0, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
