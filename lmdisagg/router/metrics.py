"""Prometheus metrics of one router (its own registry, so several routers in one process —
tests, pipelines — never clash)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmdisagg_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("lmdisagg_time_to_first_token_seconds", "request arrival to first token", buckets=_LAT, registry=r)
        self.itl = Histogram("lmdisagg_inter_token_latency_seconds", "time between streamed tokens", buckets=_LAT, registry=r)
        self.e2e = Histogram("lmdisagg_e2e_request_latency_seconds", "request arrival to last token", buckets=_LAT, registry=r)
        self.prompt_tokens = Counter("lmdisagg_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("lmdisagg_cached_prompt_tokens", "prompt tokens served from a KV cache", registry=r)
        self.generation_tokens = Counter("lmdisagg_generation_tokens", "generated tokens", registry=r)
        self.in_flight = Gauge("lmdisagg_requests_in_flight", "requests being served (queue depth)", registry=r)
        self.aborted = Counter("lmdisagg_requests_aborted", "requests aborted (client gone, error, timeout)", registry=r)
        self.restarts = Counter("lmdisagg_worker_restarts", "worker processes found replaced by a restarted "
                                "one", ["worker"], registry=r)
        self.migrations = Counter("lmdisagg_request_migrations", "requests resumed on other workers after a worker "
                                  "died", ["role"], registry=r)
        self.placements = Counter("lmdisagg_placements", "placement decisions per worker and role", ["worker", "role"], registry=r)
        self.prompt_chunks = Counter("lmdisagg_placement_prompt_chunks", "full chunks of placed prompts", registry=r)
        self.predicted_cached_chunks = Counter("lmdisagg_placement_cached_chunks",
                                               "of those, held by the chosen prefill worker (per the index)", registry=r)
        self.transfer_bytes = Gauge("lmdisagg_kv_transfer_bytes", "KV bytes pulled by decode workers (total)", ["worker"], registry=r)
        self.transfer_seconds = Gauge("lmdisagg_kv_transfer_seconds", "seconds spent pulling KV (total)", ["worker"], registry=r)
        self.transfer_failures = Gauge("lmdisagg_kv_transfer_failures", "failed KV pulls, recomputed (total)", ["worker"], registry=r)
        self.worker_free_blocks = Gauge("lmdisagg_worker_free_kv_blocks", "free KV blocks", ["worker"], registry=r)
        self.worker_running = Gauge("lmdisagg_worker_running_requests", "running sequences", ["worker"], registry=r)
        self.worker_queued = Gauge("lmdisagg_worker_queued_prefill_tokens", "prompt tokens waiting", ["worker"], registry=r)

    def observe_worker(self, worker_id: str, stats) -> None:
        self.worker_free_blocks.labels(worker_id).set(stats.free_blocks)
        self.worker_running.labels(worker_id).set(stats.running)
        self.worker_queued.labels(worker_id).set(stats.queued_prefill_tokens)
        s = stats.stats
        if "pulled_bytes" in s:
            self.transfer_bytes.labels(worker_id).set(s["pulled_bytes"])
            self.transfer_seconds.labels(worker_id).set(s["pull_seconds"])
            self.transfer_failures.labels(worker_id).set(s["transfer_failures"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
