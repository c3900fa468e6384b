"""StoreBridge: the engine ↔ TieredStore seam a worker calls around its step loop.

All calls come from the step-loop thread and none waits on disk or network (``load``,
``generate``, ``flush`` and ``close`` are the blocking conveniences, for offline use and shutdown)::

    bridge = StoreBridge(engine, store)               turns on the engine's KV events
    bridge.add_request(rid, prompt_ids, params)       1. instead of engine.add_request: validates now
                                                         (typed errors), starts the chunk lookup
    loop:
        for r in bridge.poll(): ...                   2-4. loads done: their requests are now in the
                                                         engine (r.error if add_request refused one)
        outputs = engine.step()
        events = bridge.after_step()                  5. offload new chunks; forward events to the router
    bridge.abort(rid)                                 any time: a loading request is dropped
    bridge.close()

(``start_load`` + ``poll`` without ``add_request`` is the same walk for a caller that admits
requests itself.)

A load walks a small state machine (a failure or the deadline at any point ends it with what has
arrived, maybe nothing, and the request simply recomputes)::

    LOOKUP  I/O thread: which tier holds each chunk the engine lacks (longest unbroken run)
    FETCH   step thread reserves engine blocks; I/O threads read each chunk into its block
    DONE    step thread commits the blocks that arrived (named in the engine's prefix cache)

A fetch still running at the deadline keeps its blocks reserved until it ends, then commits them
(they are correct chunks) or frees them: a late write never lands in a reused block.

Slow tiers: the bridge measures the engine's prefill rate (tokens/s, between ``poll``/``after_step``
calls) and each tier's delivered bandwidth (per load). A run is cut at the first chunk whose tier
would deliver its tokens slower than the engine recomputes them (e.g. a remote store over a slow
link in front of a fast GPU); such a tier is probed again every ``probe_every_s``.

Offload: each chunk the engine names ("stored" event) is pinned in the engine, copied into the
store by an I/O thread (L2, and L3/L4 with write-through), then unpinned by a later
``after_step``. At most ``max_inflight_offloads`` chunks are held that way; beyond that new chunks
are not offloaded (counted), so a slow tier can never starve the engine of blocks.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from lmdisagg.errors import InvalidRequestError, LmdisaggError, OutOfBlocksError, TimeoutError_
from lmdisagg.kv.keys import KEY_SCHEME_VERSION, ChunkKey
from lmdisagg.kv.store.buffers import as_bytes
from lmdisagg.kv.store.speed import SpeedModel
from lmdisagg.kv.store.tiered import TieredStore

log = logging.getLogger(__name__)


def store_namespace(engine) -> str:
    """The tiers' namespace for an engine: key scheme version + model/dtype/layout digest."""
    return f"v{KEY_SCHEME_VERSION}-{engine.namespace.digest().hex()}"


@dataclass
class LoadResult:
    """How a request's prompt was served from the cache, reported once its load is done."""

    request_id: str
    prompt_chunks: int            # full chunks the store could supply (the last is always computed)
    engine_chunks: int            # already in the engine's prefix cache (L1) at start_load
    served: dict[str, int]        # chunks imported from each tier ("cpu", "disk", "redis")
    cached_chunks: int            # leading chunks the engine holds now (what admission will reuse)
    timed_out: bool = False       # the deadline passed before every chunk arrived
    failed: int = 0               # chunks a tier listed but did not deliver (gone, corrupt, error)
    seconds: float = 0.0          # start_load -> done
    error: Exception | None = None  # engine.add_request refused the request (bridge.add_request)
    skipped_slow: int = 0         # chunks left to recompute: their tier is slower than recomputing

    @property
    def imported_chunks(self) -> int:
        return sum(self.served.values())


@dataclass
class _Load:
    rid: str
    keys: list[ChunkKey]                 # the prompt's fetchable chunk keys
    n_engine: int                        # leading keys the engine had at start
    engine_blocks: list[int]             # those blocks, pinned in the engine during the load
    t0: float
    deadline: float
    lookup: Future | None = None
    reserved: dict[ChunkKey, int] = field(default_factory=dict)
    fetches: dict[ChunkKey, Future] = field(default_factory=dict)
    t_fetch: float = 0.0                 # when the fetches were submitted
    skipped_slow: int = 0


class StoreBridge:
    def __init__(self, engine, store: TieredStore, *, load_timeout_s: float = 2.0,
                 max_inflight_offloads: int = 64, skip_slow_tiers: bool = True, probe_every_s: float = 30.0,
                 wake: Callable[[], None] | None = None):
        """``wake`` is called from an I/O thread whenever a lookup, fetch or offload finishes, so a
        loop that sleeps while idle can call ``poll``/``after_step`` at once (e.g. post a no-op)."""
        self.engine = engine
        self.wake = wake
        self.store = store
        self.load_timeout_s = load_timeout_s
        self.max_inflight_offloads = max_inflight_offloads
        self.skip_slow_tiers = skip_slow_tiers
        lay = engine.layout
        self.speed = SpeedModel(lay.chunk_nbytes / lay.chunk_tokens, probe_every_s)
        self._mark = (time.perf_counter(), engine.stats.computed_prompt_tokens)
        self._loads: dict[str, _Load] = {}
        self._done: list[LoadResult] = []
        self._orphans: list[_Load] = []
        self._offloads: list[tuple[Future, list[int], ChunkKey]] = []
        self.tier_events: list[tuple[ChunkKey, str]] = []  # (key, tier) written by offloads
        self._pending: dict[str, tuple[list[int], object]] = {}  # rid -> (prompt, params) to admit
        self.loads = 0                # loads finished
        self.timeouts = 0             # of those, ended by their deadline
        self.served: dict[str, int] = {}  # chunks imported per tier, all loads
        self.offloaded = 0            # chunks handed to the store
        self.offloads_skipped = 0     # chunks not offloaded: too many in flight
        self.offload_errors = 0
        engine.enable_kv_events()

    # --- loads ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, token_ids: list[int], params) -> None:
        """``engine.add_request`` after the prompt's cached chunks are loaded. Raises the engine's
        typed errors now (nothing queued); the request enters the engine in a later ``poll``."""
        if request_id in self._pending or request_id in self.engine.seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        self.engine.validate(token_ids, params)
        self._pending[request_id] = (list(token_ids), params)
        self.start_load(request_id, token_ids, salt=params.cache_salt)

    def abort(self, request_id: str) -> bool:
        """Drop a request that is loading (its fetched chunks still land in the cache) or running."""
        if self._pending.pop(request_id, None) is not None:
            return True
        return self.engine.abort(request_id)

    def start_load(self, request_id: str, token_ids: list[int], timeout_s: float | None = None,
                   salt: str | None = None) -> None:
        """Begin fetching the prompt's missing leading chunks; its LoadResult comes from ``poll``.
        ``salt``: the request's cache_salt (its chunks have their own keys)."""
        t = self.engine.layout.chunk_tokens
        keys = self.engine.chunk_keys(token_ids, salt)[:max(0, (len(token_ids) - 1) // t)]
        n = self.engine.cached_prefix(keys)
        now = time.perf_counter()
        load = _Load(request_id, keys, n, [], now, now + (timeout_s or self.load_timeout_s))
        if n == len(keys) or not self.store.tiers:
            self._done.append(self._result(load))
            return
        load.engine_blocks = self.engine.pin_chunks(keys[:n])  # keep the head while the tail comes
        load.lookup = self._watch(self.store.submit_fetch(self.store.lookup, keys[n:]))
        self._loads[request_id] = load

    def poll(self) -> list[LoadResult]:
        """Advance every load; returns those now done, their requests (from ``add_request``)
        added to the engine."""
        self._advance()
        done, self._done = self._done, []
        for r in done:
            self._account(r)
        self._mark = (time.perf_counter(), self.engine.stats.computed_prompt_tokens)
        return done

    def _account(self, r: LoadResult) -> None:
        self.loads += 1
        self.timeouts += r.timed_out
        for tier, n in r.served.items():
            self.served[tier] = self.served.get(tier, 0) + n
        req = self._pending.pop(r.request_id, None)
        if req is not None:
            try:
                self.engine.add_request(r.request_id, req[0], req[1])
            except LmdisaggError as e:  # e.g. out of blocks now: the caller reports it
                r.error = e

    def _advance(self) -> None:
        now = time.perf_counter()
        for load in list(self._loads.values()):
            if load.lookup is not None:
                if load.lookup.done():
                    self._reserve_and_fetch(load)
                elif now > load.deadline:
                    self._finish(load, timed_out=True)
                    continue
            if load.lookup is None and load.rid in self._loads:
                if all(f.done() for f in load.fetches.values()):
                    self._finish(load)
                elif now > load.deadline:
                    self._finish(load, timed_out=True)
        self._reap_orphans()

    def _reserve_and_fetch(self, load: _Load) -> None:
        f, load.lookup = load.lookup, None
        try:
            where = f.result()
        except Exception:  # a bug below must not take the request down: recompute
            log.exception("KV store lookup failed")
            where = []
        where = self._cut_slow(load, where)
        todo = load.keys[load.n_engine:load.n_engine + len(where)]
        load.t_fetch = time.perf_counter()
        try:
            load.reserved = self.engine.reserve_chunks(todo) if todo else {}
        except OutOfBlocksError:
            load.reserved = {}
        for i, k in enumerate(todo):
            if k in load.reserved:
                out = as_bytes(self.engine.kv_buffer[load.reserved[k]])  # [L, 2, T, H_kv, D] as bytes
                load.fetches[k] = self._watch(self.store.submit_fetch(self.store.get, k, out, where[i],
                                                                      promote=False))

    def _watch(self, f: Future) -> Future:
        if self.wake is not None:
            f.add_done_callback(lambda _: self.wake())
        return f

    def _cut_slow(self, load: _Load, where: list[int]) -> list[int]:
        if not self.skip_slow_tiers:
            return where
        n = self.speed.usable_run([self.store.tiers[t].name for t in where])
        load.skipped_slow = len(where) - n
        return where[:n]

    def _measure(self, load: _Load, served: dict[str, int]) -> None:
        if len(served) == 1 and load.t_fetch:
            (name, n), = served.items()
            self.speed.observe_load(name, n * self.engine.layout.chunk_nbytes, time.perf_counter() - load.t_fetch)

    def _settle(self, load: _Load) -> tuple[dict[str, int], int]:
        """Commit fetched blocks, free the rest (all fetches done). -> (served per tier, failed)."""
        served: dict[str, int] = {}
        ok, bad = {}, {}
        for k, b in load.reserved.items():
            f = load.fetches.get(k)
            got = f.result() if f is not None and f.exception() is None else None
            if got is None:
                bad[k] = b
            else:
                ok[k] = b
                served[got[0]] = served.get(got[0], 0) + 1
        self.engine.commit_chunks(ok)
        self.engine.release_reserved(bad)
        load.reserved = {}
        return served, len(bad)

    def _finish(self, load: _Load, timed_out: bool = False) -> None:
        del self._loads[load.rid]
        served, failed = {}, 0
        if timed_out and any(not f.done() for f in load.fetches.values()):
            self._orphans.append(load)  # its blocks stay reserved until its reads end
        elif load.reserved:
            served, failed = self._settle(load)
            self._measure(load, served)
        self.engine.unpin_chunks(load.engine_blocks)
        self._done.append(self._result(load, served, failed, timed_out))

    def _result(self, load: _Load, served=None, failed: int = 0, timed_out: bool = False) -> LoadResult:
        return LoadResult(load.rid, len(load.keys), load.n_engine, served or {},
                          self.engine.cached_prefix(load.keys), timed_out, failed,
                          time.perf_counter() - load.t0, skipped_slow=load.skipped_slow)

    def _reap_orphans(self) -> None:
        for load in list(self._orphans):
            if all(f.done() for f in load.fetches.values()):
                self._orphans.remove(load)
                self._settle(load)

    def load(self, request_id: str, token_ids: list[int], timeout_s: float | None = None) -> LoadResult:
        """Blocking ``start_load`` + ``poll`` until this load is done (offline use, tests)."""
        self.start_load(request_id, token_ids, timeout_s)
        while True:
            self._advance()
            for i, r in enumerate(self._done):
                if r.request_id == request_id:
                    del self._done[i]
                    self._account(r)
                    return r
            time.sleep(0.0005)

    # --- offload ----------------------------------------------------------------------------------
    def after_step(self, events: list | None = None) -> list[tuple[str, ChunkKey]]:
        """Offload newly stored chunks (async) and unpin finished ones. Drains the engine's KV
        events unless the worker passes the ones it drained; returns them (for the router)."""
        t, tok = time.perf_counter(), self.engine.stats.computed_prompt_tokens
        if tok - self._mark[1] >= self.engine.layout.chunk_tokens:  # the step prefilled
            self.speed.observe_step(tok - self._mark[1], t - self._mark[0])
        if events is None:
            events = self.engine.drain_kv_events()
        self._reap_offloads()
        if self.store.tiers:
            # newest first: a prompt's tail reaches each tier's LRU before its head, so the head
            # (without which the tail is useless) is evicted last
            for kind, key in reversed(events):
                if kind != "stored" or not self.engine.cached_prefix([key]):
                    continue
                if len(self._offloads) >= self.max_inflight_offloads:
                    self.offloads_skipped += 1
                    continue
                blocks = self.engine.pin_chunks([key])
                f = self._watch(self.store.submit_put(key, self.engine.kv_buffer[blocks[0]]))
                self._offloads.append((f, blocks, key))
                self.offloaded += 1
        self._reap_orphans()
        self._mark = (time.perf_counter(), self.engine.stats.computed_prompt_tokens)
        return events

    def _reap_offloads(self) -> None:
        keep = []
        for f, blocks, key in self._offloads:
            if f.done():
                if f.exception() is not None:
                    self.offload_errors += 1
                else:
                    self.tier_events += [(key, tier) for tier in (f.result() or ())]
                self.engine.unpin_chunks(blocks)
            else:
                keep.append((f, blocks, key))
        self._offloads = keep

    def drain_tier_events(self) -> list[tuple[ChunkKey, str]]:
        """(key, tier name) for every chunk an offload wrote to a tier since the last drain (for
        the router's index; tier evictions are not reported)."""
        out, self.tier_events = self.tier_events, []
        return out

    def stats(self) -> dict:
        """Counters for /stats and metrics: loads, hits per tier, offloads, and the store's."""
        return {"loads": self.loads, "load_timeouts": self.timeouts, "served_chunks": dict(self.served),
                "prefill_tokens_per_s": self.speed.prefill_tps, "tier_bytes_per_s": dict(self.speed.tier_bps),
                "offloaded": self.offloaded, "offloads_skipped": self.offloads_skipped,
                "offload_errors": self.offload_errors, "store": self.store.stats()}

    def pending(self) -> int:
        """Loads, orphaned fetches and offloads still in flight."""
        return len(self._loads) + len(self._orphans) + len(self._offloads)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every offload is in the store and unpinned (tests, shutdown); False on timeout."""
        deadline = time.perf_counter() + timeout_s
        while self._offloads or self._orphans:
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.001)
            self._reap_offloads()
            self._reap_orphans()
        return self.store.flush(max(0.0, deadline - time.perf_counter()))

    def pin_prefix(self, token_ids: list[int]) -> list[ChunkKey]:
        """Pin the chunks of a prefix (a system prompt) in every tier, now and when they arrive.
        The tier calls run on an I/O thread; returns the keys (for ``unpin_prefix``)."""
        keys = self.engine.chunk_keys(token_ids)
        self.store.submit_fetch(self.store.pin, keys)
        return keys

    def unpin_prefix(self, keys: list[ChunkKey]) -> None:
        self.store.submit_fetch(self.store.unpin, keys)

    def generate(self, prompts: list[list[int]], params, timeout_s: float = 600.0) -> list[tuple]:
        """Offline: run token-id prompts through load → admit → step → offload to completion.
        -> [(GenerationResult, LoadResult)] in prompt order; ``ttft_s`` counts from the load."""
        from lmdisagg.engine.llm_engine import GenerationResult
        rids = [f"store-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        by_rid = dict(zip(rids, prompts))
        res = {r: GenerationResult(r, "", [], len(p), 0, None) for r, p in by_rid.items()}
        loads: dict[str, LoadResult] = {}
        t0 = time.perf_counter()
        for r, p in by_rid.items():
            self.add_request(r, p, params)
        while any(g.finish_reason is None for g in res.values()):
            if time.perf_counter() - t0 > timeout_s:
                for r in rids:
                    self.abort(r)
                raise TimeoutError_(f"generate did not finish in {timeout_s}s")
            for lr in self.poll():
                loads[lr.request_id] = lr
                if lr.error is not None:
                    raise lr.error
            outs = self.engine.step()
            now = time.perf_counter()
            for o in outs:
                g = res[o.request_id]
                if not g.token_ids:
                    g.ttft_s = now - t0
                g.token_ids += o.new_token_ids
                g.text += o.text_delta
                g.cached_tokens = o.cached_tokens
                if o.finished:
                    g.finish_reason = o.finish_reason
                    g.e2e_s = now - t0
            self.after_step()  # after outputs are out, as a worker's loop does
            if not outs:
                time.sleep(0.0005)  # waiting on loads, or on offload pins to free blocks
        return [(res[r], loads[r]) for r in rids]

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish loads and offloads (up to the timeout) and drop every engine pin the bridge
        holds. Does not close the store (its owner does)."""
        deadline = time.perf_counter() + timeout_s
        self._pending.clear()  # nothing more enters the engine through us
        while self._loads and time.perf_counter() < deadline:
            self._advance()
            time.sleep(0.001)
        for load in list(self._loads.values()):
            self._finish(load, timed_out=True)
        self._done.clear()
        self.flush(max(0.0, deadline - time.perf_counter()))
        self.engine.enable_kv_events(False)
