"""``cache_aware``: send a prompt where it will be ready soonest, counting what is already cached.

Per request (decode first, then prefill, so the transfer term knows its destination)::

    decode worker d  = min over decode workers that fit the request's KV blocks of the estimated
                       decode step after admitting it (base + running * per-seq + KV bytes read);
                       if none fits, the one with the most free blocks. Colocated: d = prefill.
    match            = index.match_all(chunk_keys): per worker, the leading chunks it holds and
                       their fastest tier (gpu, cpu, disk, remote, or pending = routed there and
                       not yet reported); a stale worker's match counts stale_weight of itself
    score(w)         = queued_prefill_tokens(w) / prefill_tokens_per_s                (wait)
                       + work_mult * min(load of the matched chunks by tier + prefill of the
                                         rest, prefill of the whole prompt)          (compute)
                       + transfer of the prompt's KV from w to d (0 when w == d)      (move)
    work_mult        = 1 + work_weight * min(rho / (1 - rho), 4), rho = share of prefill workers
                       with queued work: GPU time spent here also delays the requests that will
                       queue behind it (M/M/1: ~rho/(1-rho) of it), so under load a cached copy is
                       worth more than this request's own TTFT says; idle clusters just minimise TTFT
    guard            = workers whose queue exceeds the shortest by more than max_queue_gap_s (5 s)
                       of prefill are not chosen, whatever their score (a backstop: a stale load
                       snapshot or a mis-set cost model must not pile work on one holder)
    choose           argmin score; ties -> fewer indexed chunks, then fewer decisions so far
                     (spreads new prefixes evenly)

``Placement.scores`` holds score(w) for every prefill candidate (seconds, lower wins) and
``Placement.reason`` says which rule decided ("cache", "load" = no chunk cached on the winner,
"guard"), so any decision can be replayed by hand; DEBUG logs print the best four scores. After choosing, the prompt's keys are noted as pending on the
chosen worker (``ChunkIndex.note_routed``) so a burst sharing a new prefix follows it.
"""
from __future__ import annotations

import logging
from dataclasses import fields

from lmdisagg.router.index import PrefixMatch
from lmdisagg.router.policies.cost import CostModel
from lmdisagg.router.policy import Placement, PlacementPolicy, PlacementRequest, WorkerLoad

log = logging.getLogger(__name__)
_COST_FIELDS = {f.name for f in fields(CostModel)}


class CacheAwarePolicy(PlacementPolicy):
    name = "cache_aware"
    score_meaning = "estimated seconds until the decode worker can start: wait + compute + move (lower wins)"

    def __init__(self, cost: CostModel | None = None, *, max_queue_gap_s: float = 5.0,
                 stale_weight: float = 0.5, note_pending: bool = True, work_weight: float = 1.0,
                 **cost_fields):
        """``cost_fields`` override single ``CostModel`` fields (e.g. ``chunk_tokens=512``)."""
        super().__init__()
        unknown = set(cost_fields) - _COST_FIELDS
        if unknown:
            raise TypeError(f"unknown cache_aware option(s) {sorted(unknown)}")
        base = cost or CostModel()
        self.cost = CostModel(**{**base.__dict__, **cost_fields}) if cost_fields else base
        self.max_queue_gap_s = max_queue_gap_s
        self.stale_weight = stale_weight
        self.note_pending = note_pending
        self.work_weight = work_weight
        self.guard_trips = 0  # decisions where the best score was refused by the load guard

    # --- decode -------------------------------------------------------------------------------
    def decode_scores(self, req: PlacementRequest, decode: list[WorkerLoad]) -> dict[str, float]:
        """Estimated decode step (s) on each decode worker after admitting ``req``; inf if it
        does not fit the worker's free blocks."""
        c = self.cost
        need = -(-(req.num_prompt_tokens + req.max_tokens) // c.chunk_tokens)
        out = {}
        for d in decode:
            if d.free_blocks < need:
                out[d.worker_id] = float("inf")
            else:
                used = d.total_blocks - d.free_blocks + need
                out[d.worker_id] = c.decode_step(d.running + 1, used * c.chunk_tokens)
        return out

    def _pick_decode(self, req: PlacementRequest, decode: list[WorkerLoad]) -> WorkerLoad:
        s = self.decode_scores(req, decode)
        best = min(decode, key=lambda d: (s[d.worker_id], -d.free_blocks))
        if s[best.worker_id] == float("inf"):  # fits nowhere now: most room, it will queue there
            best = max(decode, key=lambda d: d.free_blocks)
        return best

    # --- prefill ------------------------------------------------------------------------------
    def compute_s(self, req: PlacementRequest, m: PrefixMatch | None) -> float:
        """Load + prefill seconds on a worker with match ``m``, never worse than recomputing."""
        c = self.cost
        full = c.prefill_s(req.num_prompt_tokens, 0)
        if m is None or not m.chunks:
            return full
        w = self.stale_weight if m.stale else 1.0
        cached_tok = min(int(m.chunks * w) * c.chunk_tokens, req.num_prompt_tokens)
        load = sum(c.load_s(t, n) for t, n in m.by_tier.items()) * w
        return min(load + c.prefill_s(req.num_prompt_tokens - cached_tok, cached_tok), full)

    def _choose(self, req: PlacementRequest, prefill: list[WorkerLoad], decode: list[WorkerLoad] | None,
                index) -> Placement:
        c = self.cost
        d = self._pick_decode(req, decode) if decode is not None else None
        matches = index.match_all(req.chunk_keys) if index is not None and req.chunk_keys else {}
        full = c.prefill_s(req.num_prompt_tokens, 0)
        move_same = move_other = 0.0
        if d is not None:
            move_same = c.transfer_s(req.num_prompt_tokens, True)
            move_other = c.transfer_s(req.num_prompt_tokens, False)
        rate = c.prefill_tokens_per_s
        scores: dict[str, float] = {}
        best: WorkerLoad | None = None
        best_s = float("inf")
        min_q = min(w.queued_prefill_tokens for w in prefill)
        busy = sum(1 for w in prefill if w.queued_prefill_tokens > 0) / len(prefill)
        work_mult = 1.0 + self.work_weight * min(busy / (1.0 - busy) if busy < 1 else 4.0, 4.0)
        q_limit = min_q + self.max_queue_gap_s * rate
        any_s = float("inf")  # best score with the guard off
        for w in prefill:
            m = matches.get(w.worker_id)
            s = w.queued_prefill_tokens / rate + (self.compute_s(req, m) if m else full) * work_mult
            if d is not None and d.worker_id != w.worker_id:
                s += move_same if (w.node and w.node == d.node) else move_other
            scores[w.worker_id] = s
            any_s = min(any_s, s)
            if w.queued_prefill_tokens > q_limit:
                continue
            if s < best_s or (s == best_s and self._tie(w, best, index)):
                best, best_s = w, s
        m = matches.get(best.worker_id)
        cached = m.chunks if m else 0
        guarded = any_s < best_s
        reason = "guard" if guarded else ("cache" if cached else "load")
        self.guard_trips += guarded
        if self.note_pending and index is not None and best.worker_id in index:
            index.note_routed(best.worker_id, req.chunk_keys)
        p = Placement(best.worker_id, best.worker_id if d is None else d.worker_id, scores, cached, reason)
        if log.isEnabledFor(logging.DEBUG):
            top = sorted(scores.items(), key=lambda kv: kv[1])[:4]
            log.debug("place %s: prefill=%s decode=%s reason=%s cached=%d/%d top=%s", req.request_id,
                      p.prefill, p.decode, reason, cached, len(req.chunk_keys),
                      ", ".join(f"{k}={v:.3f}s" for k, v in top))
        return p

    def _tie(self, w: WorkerLoad, best: WorkerLoad | None, index) -> bool:
        """On equal scores prefer the worker with fewer indexed chunks (an emptier cache), then the
        one chosen least often (so full caches take new prefixes in turn)."""
        if best is None:
            return True
        nw = index.num_keys(w.worker_id) if index is not None and w.worker_id in index else 0
        nb = index.num_keys(best.worker_id) if index is not None and best.worker_id in index else 0
        if nw != nb:
            return nw < nb
        n = self.counters.decisions
        return n[w.worker_id] < n[best.worker_id]
