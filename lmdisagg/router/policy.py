"""Placement policies: which prefill worker computes a prompt and which decode worker continues it.

(Minimal version: round_robin and least_loaded. The cache-aware policy and its index replace
this module.)
"""
from __future__ import annotations

import abc
import itertools
from dataclasses import dataclass, field


@dataclass
class WorkerLoad:
    worker_id: str
    queued_prefill_tokens: int = 0
    running: int = 0
    free_blocks: int = 0
    total_blocks: int = 0


@dataclass
class PlacementRequest:
    request_id: str
    chunk_keys: list[bytes]
    num_prompt_tokens: int
    prompt_token_ids: list[int]


@dataclass
class Placement:
    prefill: str
    decode: str
    scores: dict[str, float] = field(default_factory=dict)
    cached_chunks: int = 0


class PlacementPolicy(abc.ABC):
    name = "base"

    @abc.abstractmethod
    def choose(self, req: PlacementRequest, prefill: list[WorkerLoad], decode: list[WorkerLoad] | None,
               index=None) -> Placement: ...


class RoundRobin(PlacementPolicy):
    name = "round_robin"

    def __init__(self):
        self._p = itertools.count()
        self._d = itertools.count()

    def choose(self, req, prefill, decode, index=None):
        p = prefill[next(self._p) % len(prefill)].worker_id
        d = p if decode is None else decode[next(self._d) % len(decode)].worker_id
        return Placement(p, d)


class LeastLoaded(PlacementPolicy):
    name = "least_loaded"

    def choose(self, req, prefill, decode, index=None):
        scores = {w.worker_id: -(w.queued_prefill_tokens + 256 * w.running) for w in prefill}
        p = max(prefill, key=lambda w: scores[w.worker_id]).worker_id
        if decode is None:
            return Placement(p, p, scores)
        d = min(decode, key=lambda w: (w.running, -w.free_blocks)).worker_id
        return Placement(p, d, scores)


_POLICIES = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}


def make_policy(name: str, **kwargs) -> PlacementPolicy:
    try:
        return _POLICIES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {sorted(_POLICIES)}") from None
