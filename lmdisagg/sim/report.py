"""What a simulated replay measured, as one flat record (``--json`` prints it as one line).

    hit_rate            chunks found in the chosen worker's cache (GPU or CPU) at prefill start,
                        over all prompt chunks (one chunk per trace hash id, the last may be partial)
    gpu_hit_rate        of those, found on GPU
    oracle_hit_rate     the same with one infinite cache shared by all workers
    predicted_hit_rate  chunks the policy believed cached (Placement.cached_chunks)
    ttft_*_s            arrival -> end of prefill (first token)
    slo_attainment      fraction of requests with TTFT <= ttft_slo_s
    load_spread         max / mean of per-worker prefill busy seconds (1.0 = perfectly even)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lmdisagg.sim.simulator import Simulator
    from lmdisagg.sim.worker import SimRequest


@dataclass
class SimReport:
    policy: str
    workers: int
    decode_workers: int
    requests: int
    chunks: int
    hit_rate: float
    gpu_hit_rate: float
    oracle_hit_rate: float
    hit_vs_oracle: float
    predicted_hit_rate: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    ttft_slo_s: float
    slo_attainment: float
    load_spread: float
    load_cv: float
    max_requests_per_worker: int
    min_requests_per_worker: int
    sim_time_s: float           # simulated seconds until the last request finished
    wall_s: float               # real seconds the replay took
    index_keys: int             # (worker, key) entries in the index at the end
    index_stats: dict
    reasons: dict
    lost_event_batches: int
    resync_requests: int
    cache_overflows: int

    def as_dict(self) -> dict:
        return asdict(self)


def build_report(sim: "Simulator", reqs: list["SimRequest"], oracle_hits: int, wall_s: float) -> SimReport:
    chunks = sum(len(r.keys) for r in reqs)
    ttft = np.array([r.ttft_s for r in reqs])
    e2e = np.array([r.e2e_s for r in reqs])
    busy = np.array([w.busy_s for w in sim.prefill])
    per = [sim.policy.counters.decisions.get(w.worker_id, 0) for w in sim.prefill]
    hits = sum(r.hit_chunks for r in reqs)
    oracle = oracle_hits / chunks if chunks else 0.0
    pct = lambda a, q: float(np.percentile(a, q))  # noqa: E731
    return SimReport(
        policy=sim.cfg.policy, workers=len(sim.prefill), decode_workers=len(sim.decode),
        requests=len(reqs), chunks=chunks,
        hit_rate=hits / chunks if chunks else 0.0,
        gpu_hit_rate=sum(r.gpu_hit_chunks for r in reqs) / chunks if chunks else 0.0,
        oracle_hit_rate=oracle,
        hit_vs_oracle=(hits / chunks) / oracle if oracle else 0.0,
        predicted_hit_rate=sum(r.predicted_chunks for r in reqs) / chunks if chunks else 0.0,
        ttft_mean_s=float(ttft.mean()), ttft_p50_s=pct(ttft, 50), ttft_p90_s=pct(ttft, 90),
        ttft_p99_s=pct(ttft, 99), e2e_p50_s=pct(e2e, 50), e2e_p99_s=pct(e2e, 99),
        ttft_slo_s=sim.cfg.ttft_slo_s,
        slo_attainment=float((ttft <= sim.cfg.ttft_slo_s).mean()),
        load_spread=float(busy.max() / busy.mean()) if busy.mean() > 0 else 1.0,
        load_cv=float(busy.std() / busy.mean()) if busy.mean() > 0 else 0.0,
        max_requests_per_worker=max(per), min_requests_per_worker=min(per),
        sim_time_s=sim.now, wall_s=wall_s,
        index_keys=len(sim.index), index_stats=sim.index.stats.as_dict(),
        reasons=dict(sim.policy.counters.reasons),
        lost_event_batches=sim.lost_batches, resync_requests=sim.resync_requests,
        cache_overflows=sum(w.cache.overflow for w in sim.prefill),
    )


def format_table(reports: list[SimReport]) -> str:
    """A markdown table, one row per report."""
    head = ("| policy | hit rate | vs oracle | TTFT p50 (s) | TTFT p99 (s) | SLO (TTFT <= {slo:g} s) "
            "| load spread | wall (s) |")
    lines = [head.format(slo=reports[0].ttft_slo_s), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        lines.append(f"| {r.policy} | {r.hit_rate:.1%} | {r.hit_vs_oracle:.1%} | {r.ttft_p50_s:.3f} "
                     f"| {r.ttft_p99_s:.3f} | {r.slo_attainment:.1%} | {r.load_spread:.2f} | {r.wall_s:.1f} |")
    lines.append(f"\noracle hit rate (one infinite shared cache): {reports[0].oracle_hit_rate:.1%}; "
                 f"{reports[0].requests} requests, {reports[0].chunks} chunks, {reports[0].workers} workers")
    return "\n".join(lines)
