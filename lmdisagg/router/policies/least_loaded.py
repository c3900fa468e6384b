"""``least_loaded``: the baseline that balances queued prefill work and ignores the cache."""
from __future__ import annotations

from lmdisagg.router.policy import (Placement, PlacementPolicy, PlacementRequest, WorkerLoad,
                                    cached_on, least_running)


class LeastLoadedPolicy(PlacementPolicy):
    """Prefill: fewest queued prefill tokens (then fewest running, then most free blocks, then
    fewest decisions so far, so idle workers take turns). Decode: fewest running, most free blocks."""

    name = "least_loaded"
    score_meaning = "queued prefill tokens (lower wins)"

    def _choose(self, req: PlacementRequest, prefill: list[WorkerLoad], decode: list[WorkerLoad] | None,
                index) -> Placement:
        n = self.counters.decisions
        best = min(prefill, key=lambda w: (w.queued_prefill_tokens, w.running, -w.free_blocks, n[w.worker_id]))
        d = best.worker_id if decode is None else least_running(decode).worker_id
        cached = cached_on(index, best.worker_id, req.chunk_keys)
        return Placement(best.worker_id, d, {w.worker_id: float(w.queued_prefill_tokens) for w in prefill},
                         cached, "load")
