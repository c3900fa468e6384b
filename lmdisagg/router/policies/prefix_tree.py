"""``prefix_tree``: the approximate baseline, as the Ray Serve and SGLang routers do it.

The router remembers, in a radix tree over token ids, which prompts it sent where (it never hears
from the workers' caches), and per request::

    load(w)     = queued_requests(w) + running(w)
    imbalanced  = max load - min load > balance_abs and max load > balance_rel * min load
    imbalanced  -> the least loaded worker                                   (reason "balance")
    otherwise   match = longest tree prefix per worker; rate = match / prompt length
                rate > cache_threshold -> the best-matching worker (least loaded among equals)
                                                                             (reason "cache")
                else -> the worker whose tree holds the fewest tokens        (reason "explore")
    then insert the prompt under the chosen worker; LRU-evict its leaves past max_tokens_per_worker

Decode (disaggregated): the decode worker with the fewest running sequences.
"""
from __future__ import annotations

from lmdisagg.router.policies.radix import RadixTree
from lmdisagg.router.policy import (Placement, PlacementPolicy, PlacementRequest, WorkerLoad,
                                    least_running)


class PrefixTreePolicy(PlacementPolicy):
    name = "prefix_tree"
    score_meaning = "tokens of the prompt's prefix the tree says the worker holds (higher wins)"
    needs_token_ids = True

    def __init__(self, *, cache_threshold: float = 0.5, balance_abs: int = 32, balance_rel: float = 1.0001,
                 max_tokens_per_worker: int = 1 << 24, chunk_tokens: int = 256):
        super().__init__()
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.chunk_tokens = chunk_tokens  # only to report Placement.cached_chunks
        self.tree = RadixTree(max_tokens_per_worker)

    def _choose(self, req: PlacementRequest, prefill: list[WorkerLoad], decode: list[WorkerLoad] | None,
                index) -> Placement:
        tokens = req.prompt_token_ids
        load = {w.worker_id: w.queued_requests + w.running for w in prefill}
        lo, hi = min(load.values()), max(load.values())
        match = self.tree.match(tokens) if len(tokens) else {}
        scores = {w.worker_id: float(match.get(w.worker_id, 0)) for w in prefill}
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            best, reason = min(prefill, key=lambda w: load[w.worker_id]).worker_id, "balance"
        else:
            top = max(scores.values())
            if len(tokens) and top / len(tokens) > self.cache_threshold:
                best = min((w for w in prefill if scores[w.worker_id] == top),
                           key=lambda w: load[w.worker_id]).worker_id
                reason = "cache"
            else:
                size = self.tree.size
                best = min(prefill, key=lambda w: (size.get(w.worker_id, 0), load[w.worker_id])).worker_id
                reason = "explore"
        if len(tokens):
            self.tree.insert(tokens, best)
        cached = min(int(scores[best]) // self.chunk_tokens, len(req.chunk_keys))
        d = best if decode is None else least_running(decode).worker_id
        return Placement(best, d, scores, cached, reason)

    def forget_worker(self, worker_id: str) -> None:
        self.tree.remove_tenant(worker_id)
