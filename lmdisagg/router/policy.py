"""Placement: which prefill worker computes a prompt, and which decode worker streams it.

The router (or the simulator) keeps one ``WorkerLoad`` per worker and one ``ChunkIndex`` fed by
KV events, and for every request calls::

    placement = policy.choose(PlacementRequest(...), prefill_loads, decode_loads, index)

``choose`` is synchronous, allocation-light and never blocks (a decision over 64 workers takes
well under a millisecond), so an aiohttp handler can call it inline. ``decode_loads=None`` means
colocated workers: ``placement.decode == placement.prefill``. Policies that look at the index may
record the routed prompt as pending on the chosen worker (``ChunkIndex.note_routed``); nothing
else is mutated. Every decision can be explained: ``placement.scores`` has one number per
candidate prefill worker (meaning per policy, see ``score_meaning``) and ``policy.counters`` the
running totals the router exports as metrics.

Policies: ``round_robin``, ``least_loaded``, ``prefix_tree`` (approximate token-prefix tree of
what the router itself routed, as Ray Serve / SGLang routers do) and ``cache_aware`` (exact chunk
keys from KV events, tier-weighted, against queued work and transfer cost). ``make_policy(name,
**kwargs)`` builds one by name and imports it lazily.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

import msgpack

from lmdisagg.errors import InvalidRequestError, UnavailableError

if TYPE_CHECKING:
    from lmdisagg.router.index import ChunkIndex


class PolicyConfigError(InvalidRequestError, ValueError):
    """Unknown policy name or options (also a ValueError, so pydantic validators report it)."""


@dataclass
class WorkerLoad:
    """A snapshot the router keeps per worker (refreshed from the worker's load reports)."""

    worker_id: str
    queued_prefill_tokens: int   # prompt tokens admitted but not yet computed (incl. the one running)
    running: int                 # running sequences (decodes)
    free_blocks: int             # KV blocks free (ref 0, incl. evictable cached ones)
    total_blocks: int
    queued_requests: int = 0     # requests waiting for (or in) prefill
    node: str = ""               # host name: transfers inside one node are cheaper ("" = unknown)

    def to_msgpack(self) -> bytes:
        return msgpack.packb(list(asdict(self).values()), use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes) -> "WorkerLoad":
        try:
            return cls(*msgpack.unpackb(data, raw=False))
        except Exception as e:
            raise InvalidRequestError(f"undecodable WorkerLoad: {e}") from None


@dataclass
class PlacementRequest:
    request_id: str
    chunk_keys: Sequence[bytes]        # the prompt's full-chunk keys (engine.chunk_keys(token_ids))
    num_prompt_tokens: int
    prompt_token_ids: Sequence[int] = ()  # only ``prefix_tree`` reads them (list or int array)
    max_tokens: int = 0                   # expected output tokens (decode KV headroom); 0 = unknown


@dataclass
class Placement:
    prefill: str                 # worker_id
    decode: str                  # worker_id (== prefill when colocated)
    scores: dict[str, float] = field(default_factory=dict)  # per candidate prefill worker
                                                            # (see the policy's score_meaning)
    cached_chunks: int = 0       # leading chunks the chosen prefill worker holds (per the index)
    reason: str = ""             # short tag of the rule that decided ("cache", "guard", "balance", ...)


@dataclass
class PolicyCounters:
    """Monotonic totals for metrics: decisions per worker and predicted cache hits."""

    decisions: Counter = field(default_factory=Counter)         # prefill worker -> requests
    decode_decisions: Counter = field(default_factory=Counter)  # decode worker -> requests
    reasons: Counter = field(default_factory=Counter)           # Placement.reason -> requests
    prompt_chunks: int = 0       # chunks of every placed prompt
    cached_chunks: int = 0       # of those, held by the chosen worker (per the index / tree)

    def record(self, p: Placement, n_chunks: int) -> None:
        self.decisions[p.prefill] += 1
        self.decode_decisions[p.decode] += 1
        self.reasons[p.reason] += 1
        self.prompt_chunks += n_chunks
        self.cached_chunks += p.cached_chunks

    def as_dict(self) -> dict:
        return {"decisions": dict(self.decisions), "decode_decisions": dict(self.decode_decisions),
                "reasons": dict(self.reasons), "prompt_chunks": self.prompt_chunks,
                "cached_chunks": self.cached_chunks}


class PlacementPolicy(ABC):
    name: str = ""
    score_meaning: str = ""      # what Placement.scores values mean, for logs and docs
    needs_token_ids: bool = False  # True: callers must fill PlacementRequest.prompt_token_ids

    def __init__(self) -> None:
        self.counters = PolicyCounters()

    def choose(self, req: PlacementRequest, prefill: list[WorkerLoad], decode: list[WorkerLoad] | None,
               index: "ChunkIndex | None" = None) -> Placement:
        """Pick (prefill, decode) for ``req``. Called by the router per request, on its event loop;
        does not block. ``index=None`` (no KV events wired) means nothing is known to be cached.
        Raises ``UnavailableError`` when there is no worker to choose from."""
        if not prefill or (decode is not None and not decode):
            raise UnavailableError("no prefill worker" if not prefill else "no decode worker")
        p = self._choose(req, prefill, decode, index)
        self.counters.record(p, len(req.chunk_keys))
        return p

    @abstractmethod
    def _choose(self, req: PlacementRequest, prefill: list[WorkerLoad], decode: list[WorkerLoad] | None,
                index: "ChunkIndex | None") -> Placement: ...

    def forget_worker(self, worker_id: str) -> None:
        """A worker left; policies holding per-worker state drop it (default: nothing to drop)."""


def cached_on(index: "ChunkIndex | None", worker_id: str, keys: Sequence[bytes]) -> int:
    """Leading chunks of ``keys`` the index says ``worker_id`` holds (0 without an index)."""
    if index is None or worker_id not in index:
        return 0
    return index.matched_prefix(worker_id, keys).chunks


def least_running(decode: list[WorkerLoad]) -> WorkerLoad:
    """The decode worker with the fewest running sequences, then the most free blocks."""
    return min(decode, key=lambda w: (w.running, -w.free_blocks))


POLICIES = {
    "round_robin": "lmdisagg.router.policies.round_robin:RoundRobinPolicy",
    "least_loaded": "lmdisagg.router.policies.least_loaded:LeastLoadedPolicy",
    "prefix_tree": "lmdisagg.router.policies.prefix_tree:PrefixTreePolicy",
    "cache_aware": "lmdisagg.router.policies.cache_aware:CacheAwarePolicy",
}


def make_policy(name: str, **kwargs) -> PlacementPolicy:
    """Build a policy by registry name; kwargs go to its constructor (unknown ones are an error)."""
    target = POLICIES.get(name)
    if target is None:
        raise PolicyConfigError(f"unknown placement policy {name!r}; choose one of {sorted(POLICIES)}",
                                param="policy")
    mod, cls = target.split(":")
    try:
        return getattr(importlib.import_module(mod), cls)(**kwargs)
    except TypeError as e:
        raise PolicyConfigError(f"bad options for policy {name!r}: {e}", param="policy") from None
