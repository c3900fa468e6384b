"""Placement on the Mooncake trace: all four policies, one run, through the real policy + index.

    python benchmarks/sim_bench.py [--trace FILE] [--workers 16] [--skip-scale]

1. headline   the whole trace, 16 colocated workers, default time model (Llama-3-8B on H100),
              GPU 1000 + CPU 3000 chunks per worker: hit rate vs the oracle, TTFT p50/p99, SLO
2. load       the same at 2x, 4x and 8x the trace's request rate (arrival times divided)
3. cache      GPU-only caches (no CPU tier): where an approximate tree's picture goes stale
4. scale      1,000 workers replaying the whole trace: wall time per policy (target < 60 s)

round_robin is the baseline in every section. Prints the tables; writes
benchmarks/results/sim_mooncake.json and sim_mooncake.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, also when run through runpy

from machine import describe  # noqa: E402

from lmdisagg.sim.report import format_table  # noqa: E402
from lmdisagg.sim.simulator import SimConfig, Simulator  # noqa: E402
from lmdisagg.sim.trace import load_trace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TRACE = Path("/work/shared/data/traces/mooncake_synthetic_trace.jsonl")
POLICIES = ("round_robin", "least_loaded", "prefix_tree", "cache_aware")
KEYS = ("policy", "workers", "hit_rate", "gpu_hit_rate", "oracle_hit_rate", "hit_vs_oracle",
        "predicted_hit_rate", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "slo_attainment", "load_spread",
        "wall_s", "reasons")


def run_all(cfg: SimConfig, trace) -> list:
    return [Simulator(replace(cfg, policy=p), trace).run() for p in POLICIES]


def slim(reports) -> list[dict]:
    return [{k: r.as_dict()[k] for k in KEYS} for r in reports]


def plot(headline, sweep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r.policy for r in headline]
    ax[0].bar(names, [r.hit_rate for r in headline], color="tab:blue")
    ax[0].axhline(headline[0].oracle_hit_rate, color="k", ls="--", label="oracle (infinite shared cache)")
    ax[0].set_ylabel("chunk hit rate")
    ax[0].legend(loc="lower right", fontsize=8)
    x = range(len(names))
    ax[1].bar([i - 0.2 for i in x], [r.ttft_p50_s for r in headline], 0.4, label="p50")
    ax[1].bar([i + 0.2 for i in x], [r.ttft_p99_s for r in headline], 0.4, label="p99")
    ax[1].set_xticks(list(x), names)
    ax[1].set_ylabel("TTFT (s)")
    ax[1].legend(fontsize=8)
    for p in POLICIES:
        xs = sorted(sweep)
        ax[2].plot(xs, [next(r for r in sweep[s] if r.policy == p).ttft_p99_s for s in xs], "o-", label=p)
    ax[2].set_xlabel("request rate (x trace)")
    ax[2].set_ylabel("TTFT p99 (s)")
    ax[2].set_yscale("log")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"Mooncake synthetic trace, {headline[0].workers} workers (simulated Llama-3-8B on H100)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--skip-scale", action="store_true", help="skip the 1,000-worker section")
    args = ap.parse_args()
    cfg = SimConfig(workers=args.workers)
    Simulator(cfg, load_trace(args.trace, limit=200)).run()  # warm-up (imports, allocator)

    trace = load_trace(args.trace)
    headline = run_all(cfg, trace)
    print(f"## 1. headline: {args.workers} workers, trace rate\n\n{format_table(headline)}\n")

    sweep = {1.0: headline}
    for s in (2.0, 4.0, 8.0):
        sweep[s] = run_all(cfg, load_trace(args.trace, speedup=s))
        print(f"## 2. load: {s:g}x the trace's request rate\n\n{format_table(sweep[s])}\n")

    gpu_only = {}
    for s in (1.0, 4.0):
        gpu_only[s] = run_all(replace(cfg, cpu_cache_chunks=0), load_trace(args.trace, speedup=s))
        print(f"## 3. GPU-only caches (1000 chunks), {s:g}x rate\n\n{format_table(gpu_only[s])}\n")

    scale = []
    if not args.skip_scale:
        scale = run_all(replace(cfg, workers=1000), trace)
        print("## 4. scale: 1,000 workers, whole trace\n")
        print("| policy | wall (s) | hit rate | TTFT p99 (s) |\n|---|---:|---:|---:|")
        for r in scale:
            print(f"| {r.policy} | {r.wall_s:.1f} | {r.hit_rate:.1%} | {r.ttft_p99_s:.3f} |")

    RESULTS.mkdir(parents=True, exist_ok=True)
    c = cfg.cost
    out = {
        "benchmark": "sim_mooncake", "hardware": describe(), "load_average": os.getloadavg()[0],
        "trace": Path(args.trace).name, "requests": len(trace), "seed": cfg.seed,
        "config": {"workers": cfg.workers, "cache_chunks": cfg.cache_chunks,
                   "cpu_cache_chunks": cfg.cpu_cache_chunks, "ttft_slo_s": cfg.ttft_slo_s,
                   "event_delay_s": cfg.event_delay_s, "cost_model": c.__dict__},
        "headline": slim(headline),
        "load_sweep": {f"{s:g}x": slim(r) for s, r in sweep.items()},
        "gpu_only_cache": {f"{s:g}x": slim(r) for s, r in gpu_only.items()},
        "scale_1000_workers": slim(scale),
    }
    (RESULTS / "sim_mooncake.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(headline, sweep, RESULTS / "sim_mooncake.png")
    print(f"\nwrote {RESULTS / 'sim_mooncake.json'} and sim_mooncake.png")


if __name__ == "__main__":
    main()
