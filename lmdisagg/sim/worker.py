"""One simulated worker: a FIFO prefill server, a decode batch, a KV cache and its event batcher.

A colocated worker prefills one request at a time (FIFO) and decodes every prefilled request in
one continuous batch beside it (no interference between the two is modelled). A disaggregated
prefill worker hands the KV to a decode worker; a decode worker only decodes, admitting requests
FIFO while its KV blocks last. The ``load`` snapshot is updated in place at every change, as a
worker's load reports would be (the simulated router sees them without delay).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmdisagg.router.events import EventBatcher
from lmdisagg.router.policy import WorkerLoad
from lmdisagg.sim.cache import SimCache


@dataclass(eq=False)
class SimRequest:
    """One trace request on its way through the simulated cluster."""

    index: int
    arrival_s: float
    input_length: int
    output_length: int
    keys: list[bytes]
    prefill: "SimWorker | None" = None
    decode: "SimWorker | None" = None
    est_tokens: int = 0            # what it adds to its prefill worker's queued_prefill_tokens
    hit_chunks: int = 0            # leading chunks found in the worker's cache at prefill start
    gpu_hit_chunks: int = 0        # of those, on GPU
    predicted_chunks: int = 0      # Placement.cached_chunks (the policy's belief)
    ttft_s: float = -1.0
    e2e_s: float = -1.0
    blocks: int = 0                # decode-worker blocks held (disaggregated)


@dataclass(eq=False)
class SimWorker:
    worker_id: str
    node: str
    gpu_chunks: int
    cpu_chunks: int = 0
    load: WorkerLoad = field(init=False)
    batcher: EventBatcher = field(init=False)
    cache: SimCache = field(init=False)
    queue: deque = field(default_factory=deque)      # prefill FIFO (SimRequest)
    waiting: deque = field(default_factory=deque)    # decode admission FIFO (disaggregated)
    busy: SimRequest | None = None                   # the request in prefill
    busy_start: float = 0.0
    busy_end: float = 0.0
    rest_tokens: int = 0                             # estimated new tokens of queued requests
    busy_s: float = 0.0                              # total prefill seconds
    kv_tokens: int = 0                               # KV tokens of running decodes
    used_blocks: int = 0                             # decode-only worker: blocks held

    def __post_init__(self):
        self.load = WorkerLoad(self.worker_id, 0, 0, self.gpu_chunks, self.gpu_chunks, 0, self.node)
        self.batcher = EventBatcher(self.worker_id)
        self.cache = SimCache(self.gpu_chunks, self.cpu_chunks, self.batcher)

    def enqueue(self, r: SimRequest, block_tokens: int) -> None:
        gpu, cpu = self.cache.lookup(r.keys)
        r.est_tokens = max(r.input_length - (gpu + cpu) * block_tokens, 0)
        self.rest_tokens += r.est_tokens
        self.load.queued_requests += 1
        self.queue.append(r)

    def refresh(self, now: float) -> None:
        """queued_prefill_tokens = queued requests + the part of the running prefill still to go
        (what a worker stepping chunked prefills would report)."""
        left = 0
        if self.busy is not None and self.busy_end > self.busy_start:
            left = int(self.busy.est_tokens * (self.busy_end - now) / (self.busy_end - self.busy_start))
        self.load.queued_prefill_tokens = self.rest_tokens + max(left, 0)

    def start_prefill(self, block_tokens: int) -> tuple[SimRequest, int, int]:
        """Pop the next request, look up and pin its chunks; returns (request, new, cached tokens).
        The caller sets ``busy_start`` / ``busy_end`` and calls ``refresh``."""
        r = self.queue.popleft()
        gpu, cpu = self.cache.lookup(r.keys)
        r.hit_chunks, r.gpu_hit_chunks = gpu + cpu, gpu
        cached = min((gpu + cpu) * block_tokens, r.input_length)
        new = r.input_length - cached
        self.cache.acquire(r.keys)
        self.rest_tokens -= r.est_tokens
        r.est_tokens = new
        self.load.free_blocks = self.cache.free_blocks
        self.busy = r
        return r, new, cached

    def finish_prefill(self, r: SimRequest) -> None:
        self.load.queued_requests -= 1
        self.busy = None

    def release(self, r: SimRequest) -> None:
        self.cache.release(r.keys)
        self.load.free_blocks = self.cache.free_blocks

    def start_decode(self, r: SimRequest) -> None:
        self.load.running += 1
        self.kv_tokens += r.input_length + r.output_length

    def finish_decode(self, r: SimRequest) -> None:
        self.load.running -= 1
        self.kv_tokens -= r.input_length + r.output_length

    # --- decode-only workers ------------------------------------------------------------------
    def try_admit(self, r: SimRequest, block_tokens: int) -> bool:
        need = -(-(r.input_length + r.output_length) // block_tokens)
        if self.used_blocks and self.used_blocks + need > self.gpu_chunks:
            return False  # an empty worker admits anything (a huge prompt must run somewhere)
        r.blocks = need
        self.used_blocks += need
        self.load.free_blocks = max(self.gpu_chunks - self.used_blocks, 0)
        return True

    def free_decode_blocks(self, r: SimRequest) -> None:
        self.used_blocks -= r.blocks
        self.load.free_blocks = max(self.gpu_chunks - self.used_blocks, 0)
