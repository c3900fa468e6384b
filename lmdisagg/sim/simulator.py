"""A discrete-event replay of a request trace through the REAL placement policy and chunk index.

Lifecycle of one request (times from ``CostModel``; see lmdisagg/router/policies/cost.py)::

    arrive        policy.choose(PlacementRequest, prefill loads, decode loads, index)
    queue         FIFO at its prefill worker
    prefill       look up its chunk keys in the worker's GPU+CPU cache (hits counted here), pin
                  them; takes prefill_s(new, cached) + load_s("cpu", CPU hits)
    first token   at prefill end: TTFT; the worker's KV events (EventBatcher) reach the index
                  event_delay_s later through ChunkIndex.apply, or are lost (event_loss) and
                  recovered by the index's gap detection + a resync snapshot
    colocated     decode (output - 1) steps on the same worker, batch size fixed at admission
    disaggregated wait for decode KV blocks; transfer the prompt's KV (same node: NVLink, else
                  RDMA); unpin on the prefill worker; decode on the decode worker
    done          unpin; E2E

The oracle is one infinite cache shared by all workers: a request's hit there is the leading run
of its keys seen in any earlier request.
"""
from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field

from lmdisagg.router.index import ChunkIndex
from lmdisagg.router.policies.cost import CostModel
from lmdisagg.router.policy import PlacementRequest, make_policy
from lmdisagg.sim.report import SimReport, build_report
from lmdisagg.sim.trace import TraceRequest
from lmdisagg.sim.worker import SimRequest, SimWorker

_ARRIVE, _PREFILL_DONE, _XFER_DONE, _DECODE_DONE, _EVENTS, _RESYNC = range(6)


@dataclass
class SimConfig:
    workers: int = 16                 # prefill workers (colocated: the only workers)
    decode_workers: int = 0           # 0 = colocated prefill + decode
    policy: str = "cache_aware"
    policy_options: dict = field(default_factory=dict)  # extra make_policy kwargs
    cache_chunks: int = 1000          # GPU KV cache per worker, in chunks (~64 GB at 64 MiB/chunk)
    cpu_cache_chunks: int = 3000      # CPU tier per worker, in chunks (~190 GB of host DRAM)
    workers_per_node: int = 8         # worker i sits on node i // workers_per_node
    event_delay_s: float = 0.005      # worker -> router KV event latency
    event_loss: float = 0.0           # probability a KV event batch is lost on the way
    ttft_slo_s: float = 2.0
    seed: int = 0
    cost: CostModel = field(default_factory=lambda: CostModel(chunk_tokens=512))


class Simulator:
    def __init__(self, cfg: SimConfig, trace: list[TraceRequest]):
        self.cfg = cfg
        self.trace = trace
        self.cost = c = cfg.cost
        self.now = 0.0
        self.index = ChunkIndex(clock=lambda: self.now)
        opts = dict(cfg.policy_options)
        if cfg.policy == "cache_aware":
            opts.setdefault("cost", c)
        elif cfg.policy == "prefix_tree":
            opts.setdefault("chunk_tokens", c.chunk_tokens)
            opts.setdefault("max_tokens_per_worker", (cfg.cache_chunks + cfg.cpu_cache_chunks) * c.chunk_tokens)
        self.policy = make_policy(cfg.policy, **opts)
        node = lambda i: f"node{i // max(cfg.workers_per_node, 1)}"  # noqa: E731
        self.prefill = [SimWorker(f"p{i}", node(i), cfg.cache_chunks, cfg.cpu_cache_chunks)
                        for i in range(cfg.workers)]
        self.decode = [SimWorker(f"d{i}", node(cfg.workers + i), cfg.cache_chunks)
                       for i in range(cfg.decode_workers)]
        self._by_id = {w.worker_id: w for w in self.prefill + self.decode}
        for w in self.prefill:
            self.index.add_worker(w.worker_id)
        self._p_loads = [w.load for w in self.prefill]
        self._d_loads = [w.load for w in self.decode] if self.decode else None
        self._heap: list = []
        self._seq = 0
        self._rng = random.Random(cfg.seed)
        self._busy: set[SimWorker] = set()  # prefill workers mid-prefill (their load drifts)
        self.lost_batches = 0
        self.resync_requests = 0

    def _at(self, t: float, kind: int, a=None, b=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b))

    def run(self, progress: bool = False) -> SimReport:
        t0 = time.perf_counter()
        block = self.cost.chunk_tokens
        reqs = [SimRequest(r.index, r.arrival_s, r.input_length, r.output_length, r.chunk_keys())
                for r in self.trace]
        oracle_seen: set[bytes] = set()
        oracle_hits = 0
        for r in reqs:
            self._at(r.arrival_s, _ARRIVE, r)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(reqs), unit="req", desc=f"simulate {self.cfg.policy}", leave=False)
        while self._heap:
            self.now, _, kind, a, b = heapq.heappop(self._heap)
            if kind == _ARRIVE:
                n = 0
                for k in a.keys:
                    if k not in oracle_seen:
                        break
                    n += 1
                oracle_hits += n
                oracle_seen.update(a.keys)
                self._arrive(a, block)
                if bar is not None:
                    bar.update()
            elif kind == _PREFILL_DONE:
                self._prefill_done(a, b)
            elif kind == _XFER_DONE:
                a.prefill.release(a)
                self._start_decode(b, a)
            elif kind == _DECODE_DONE:
                self._decode_done(a, b)
            elif kind == _EVENTS:
                res = self.index.apply(b)
                if res.reason == "gap":
                    self.resync_requests += 1
                    self._at(self.now + self.cfg.event_delay_s, _RESYNC, a)
            elif kind == _RESYNC:
                self._send_events(a, a.batcher.resync())
        if bar is not None:
            bar.close()
        return build_report(self, reqs, oracle_hits, time.perf_counter() - t0)

    # --- steps --------------------------------------------------------------------------------
    def _arrive(self, r: SimRequest, block: int) -> None:
        tokens = ()
        if self.policy.needs_token_ids:
            tokens = self.trace[r.index].token_ids(block)
        req = PlacementRequest(str(r.index), r.keys, r.input_length, tokens, r.output_length)
        for w in self._busy:
            w.refresh(self.now)
        p = self.policy.choose(req, self._p_loads, self._d_loads, self.index)
        r.prefill, r.decode = self._by_id[p.prefill], self._by_id[p.decode]
        r.predicted_chunks = p.cached_chunks
        w = r.prefill
        w.enqueue(r, block)
        if w.busy is None:
            self._start_prefill(w)
        w.refresh(self.now)

    def _start_prefill(self, w: SimWorker) -> None:
        r, new, cached = w.start_prefill(self.cost.chunk_tokens)
        cpu_hits = r.hit_chunks - r.gpu_hit_chunks
        dur = self.cost.prefill_s(new, cached) + self.cost.load_s("cpu", cpu_hits)
        w.busy_s += dur
        w.busy_start, w.busy_end = self.now, self.now + dur
        self._busy.add(w)
        self._at(self.now + dur, _PREFILL_DONE, w, r)

    def _prefill_done(self, w: SimWorker, r: SimRequest) -> None:
        r.ttft_s = self.now - r.arrival_s
        w.finish_prefill(r)
        self._busy.discard(w)
        batch = w.batcher.flush()
        if batch is not None:
            self._send_events(w, batch)
        if r.decode is w:
            self._start_decode(w, r)
        elif r.decode.try_admit(r, self.cost.chunk_tokens):
            self._start_transfer(r)
        else:
            r.decode.waiting.append(r)
        if w.queue:
            self._start_prefill(w)
        w.refresh(self.now)

    def _send_events(self, w: SimWorker, batch) -> None:
        if self.cfg.event_loss and self._rng.random() < self.cfg.event_loss:
            self.lost_batches += 1
            return
        self._at(self.now + self.cfg.event_delay_s, _EVENTS, w, batch)

    def _start_transfer(self, r: SimRequest) -> None:
        same = r.prefill.node == r.decode.node
        self._at(self.now + self.cost.transfer_s(r.input_length, same), _XFER_DONE, r, r.decode)

    def _start_decode(self, w: SimWorker, r: SimRequest) -> None:
        w.start_decode(r)
        step = self.cost.decode_step(w.load.running, w.kv_tokens)
        self._at(self.now + (r.output_length - 1) * step, _DECODE_DONE, w, r)

    def _decode_done(self, w: SimWorker, r: SimRequest) -> None:
        r.e2e_s = self.now - r.arrival_s
        w.finish_decode(r)
        if w is r.prefill:
            w.release(r)
            return
        w.free_decode_blocks(r)
        while w.waiting and w.try_admit(w.waiting[0], self.cost.chunk_tokens):
            self._start_transfer(w.waiting.popleft())
