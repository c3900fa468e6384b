"""``round_robin``: the baseline that ignores both cache and load."""
from __future__ import annotations

from lmdisagg.router.policy import Placement, PlacementPolicy, PlacementRequest, WorkerLoad, cached_on


class RoundRobinPolicy(PlacementPolicy):
    """Prefill and decode workers each in turn, in the order the router lists them."""

    name = "round_robin"
    score_meaning = "1 for the chosen worker, 0 for the others"

    def __init__(self) -> None:
        super().__init__()
        self._next_p = 0
        self._next_d = 0

    def _choose(self, req: PlacementRequest, prefill: list[WorkerLoad], decode: list[WorkerLoad] | None,
                index) -> Placement:
        p = prefill[self._next_p % len(prefill)].worker_id
        self._next_p += 1
        if decode is None:
            d = p
        else:
            d = decode[self._next_d % len(decode)].worker_id
            self._next_d += 1
        cached = cached_on(index, p, req.chunk_keys)
        return Placement(p, d, {w.worker_id: float(w.worker_id == p) for w in prefill}, cached, "turn")
