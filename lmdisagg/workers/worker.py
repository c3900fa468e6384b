"""Worker actors: ``Worker`` (colocated: prefill and decode), ``PrefillWorker``, ``DecodeWorker``.

Lifecycle of one disaggregated request (numbers match the router's):

    1. PrefillWorker.prefill(req)   admit (prefix cache) → run prompt → first token → hold blocks →
                                    publish them on the transport → PrefillResult(first, KVHandle)
    2. DecodeWorker.decode(req, h)  yield the first token → claim blocks (cached chunks reused) →
                                    pull the missing chunks + tail → release the prefill blocks
                                    (had it let them go already, what landed is freed and the
                                    prompt recomputed) → decode → yield deltas
    3. abort(request_id)            on either side, any time: frees the request's blocks (one
                                    whose KV still moves is dropped once it has landed, its new
                                    blocks freed, not cached: the router aborts the decode side
                                    first, and the prefill side's abort frees the source blocks)

With ``transport.push`` (nccl), the KV moves while the router is still waiting for the prefill:

    1a. PrefillWorker.prefill(req, decode), as its engine takes the prompt (after a grammar
        compile or a KV-store load), asks the decode worker to expect it: DecodeWorker.expect
        claims blocks (cached chunks reused), posts receives for the rest, and answers with a
        ticket; the prompt is computed meanwhile
    1b. once the prompt's blocks are computed, the prefill worker pushes them (``pushed`` in the
        handle); it cancels the expectation instead if it will not push (the first token ended
        the request, a failure): the decode worker frees those blocks
    2.  DecodeWorker.decode(req, h) waits for the pushed blocks instead of pulling; a push that
        failed falls back to a pull (the prefill worker still holds the blocks), then to
        recomputing

A pull that fails or times out is never silent: it is logged and counted, and the decode side
recomputes the prompt itself (same tokens; it costs time, not correctness).

The classes are plain Python; ``lmdisagg.pipeline`` wraps them with ``ray.remote``. Their async
methods run on the actor's event loop; the engine runs on its own thread (EngineLoop).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmdisagg.engine import Engine, EngineConfig
from lmdisagg.engine.request import RequestOutput
from lmdisagg.errors import InvalidRequestError, LmdisaggError, TimeoutError_
from lmdisagg.kv.store.config import StoreConfig
from lmdisagg.router.events import EventBatcher
from lmdisagg.workers.background import Background
from lmdisagg.workers.engine_loop import EngineLoop
from lmdisagg.workers.kv_transfer import KVTransfer, TransferError
from lmdisagg.workers.messages import (GenerateRequest, KVHandle, PrefillResult, TokenDelta, WorkerInfo,
                                       WorkerStats)

log = logging.getLogger(__name__)


def _delta(out: RequestOutput) -> TokenDelta:
    return TokenDelta(out.request_id, out.new_token_ids, out.text_delta, out.finished and not out.prefill_done,
                      out.finish_reason, out.prompt_tokens, out.cached_tokens, out.completion_tokens,
                      out.logprobs, out.prompt_logprobs)


_TIER_NAMES = {"cpu": "cpu", "disk": "disk"}  # store tier name -> index tier (others: remote)


def _place_on_gpu(cfg: EngineConfig) -> EngineConfig:
    """Pick this actor's GPU. The pipeline starts GPU actors with every GPU of the node visible
    (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), so CUDA IPC and NCCL peers can open each
    other's memory; the GPU Ray assigned us is then named explicitly."""
    if cfg.device != "cuda":
        return cfg
    import ray
    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if not ids:
        return cfg
    index = int(ids[0])
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if str(index) in visible:  # the node itself runs with a device mask: Ray's id is a physical one
        index = visible.index(str(index))
    torch.cuda.set_device(index)
    return replace(cfg, device=f"cuda:{index}")


def _gen_state(h: KVHandle) -> torch.Tensor | None:
    return torch.frombuffer(bytearray(h.generator_state), dtype=torch.uint8) if h.generator_state else None


class Worker:
    """A colocated worker: runs whole requests (``generate``)."""

    role = "both"

    def __init__(self, worker_id: str, engine_config: EngineConfig, transport: dict | None = None,
                 timeouts: dict | None = None, num_threads: int | None = None, store: dict | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if num_threads:
            torch.set_num_threads(num_threads)  # one worker per reserved CPU, not one per core each
        self.worker_id = worker_id
        self.timeouts = {"first_token_s": 300.0, "token_s": 60.0, "transfer_s": 30.0, "hold_s": 120.0,
                         **(timeouts or {})}
        engine_config = _place_on_gpu(engine_config)
        # a pushed prompt comes within its prefill's time (queue and compute) and a transfer
        self.expect_s = self.timeouts["first_token_s"] + self.timeouts["transfer_s"]
        self.kv = (KVTransfer.create(transport or {"name": "shm"}, worker_id, self.expect_s)
                   if self.role != "both" else None)
        engine = Engine(engine_config, kv_allocator=self.kv.allocator if self.kv else None)
        self.engine = engine
        if self.kv is not None:
            self.kv.register(engine.kv_buffer)
        # KV events for the router's index: drained after every step into numbered batches, kept
        # in a bounded outbox the router empties when it polls load() (overflow -> a seq gap ->
        # the router asks for resync()).
        self.batcher = EventBatcher(worker_id) if self.role != "decode" else None
        self._outbox: deque[bytes] = deque(maxlen=4096)
        if self.batcher is not None:
            engine.enable_kv_events()
        # the tiered KV store (prefill and colocated workers): prompts load their cached chunks
        # from host memory / disk / Redis before admission; new chunks are offloaded after steps
        self.bridge = None
        self._loading: dict[str, tuple] = {}   # request id -> (add_request args) while its chunks load
        store_cfg = StoreConfig.model_validate(store or {})
        if store_cfg.disk_path:  # one directory per worker: each keeps its own budget and LRU
            store_cfg = store_cfg.model_copy(update={"disk_path": str(Path(store_cfg.disk_path) / worker_id)})
        if self.role != "decode" and store_cfg.enabled:
            self.bridge = store_cfg.bridge(engine, wake=lambda: self.loop.submit(lambda e: None))
        self.counters = {"requests": 0, "transfer_failures": 0, "recomputed_prompts": 0,
                         "pulled_chunks": 0, "pulled_bytes": 0, "pull_seconds": 0.0, "transfer_seconds": 0.0,
                         "reused_chunks": 0, "pushed_chunks": 0, "push_seconds": 0.0, "push_failures": 0,
                         # decode: requests aborted before the engine took them (their KV not yet
                         # moved, or still moving: dropped once it lands, its blocks not cached)
                         "aborted_before_admit": 0,
                         # decode: KV that landed after its source had let it go (not trusted)
                         "kv_released_early": 0}
        self._holds: dict[str, asyncio.TimerHandle] = {}
        self.background = Background(log)
        self._snapshot(engine)
        self.loop = EngineLoop(engine, after_step=self._after_step)

    # --- info -----------------------------------------------------------------------------------
    async def info(self) -> WorkerInfo:
        e = self.engine
        import ray
        return WorkerInfo(self.worker_id, self.role, e.config.model, e.max_model_len, e.config.chunk_tokens,
                          e.blocks.num_blocks, tuple(e.layout.__dict__.values()), e.namespace.digest(),
                          self.kv.name if self.kv else "none", ray.util.get_node_ip_address(), os.getpid())

    def _after_step(self, e: Engine) -> None:
        """Loop thread, after every step (and when idle): store offloads and loads, KV events."""
        self._snapshot(e)
        if self.batcher is None:
            return
        if self.bridge is not None:
            self.batcher.add(self.bridge.after_step())
            for key, tier in self.bridge.drain_tier_events():
                self.batcher.add([("stored", key)], tier=_TIER_NAMES.get(tier, "remote"))
            for r in self.bridge.poll():
                self._admit_loaded(e, r)
        else:
            self.batcher.add(e.drain_kv_events())
        b = self.batcher.flush()
        if b is not None:
            self._outbox.append(b.to_msgpack())

    def _add(self, e: Engine, req: GenerateRequest, prefill_only: bool = False, on_admit=None) -> None:
        """Admit a request (loop thread): at once, or after its cached chunks load from the store.
        Typed errors are raised here, before anything is queued. ``on_admit()`` runs (loop
        thread) right before the engine takes the request."""
        if self.bridge is None:
            if on_admit is not None:
                on_admit()
            self._admit(e, req, prefill_only)
            return
        if req.request_id in self._loading or req.request_id in e.seqs:
            raise InvalidRequestError(f"request id {req.request_id!r} is already running")
        e.validate(req.prompt_token_ids, req.params)
        self._loading[req.request_id] = (req, prefill_only, on_admit)
        self.bridge.start_load(req.request_id, req.context_token_ids, salt=req.params.cache_salt)

    @staticmethod
    def _admit(e: Engine, req: GenerateRequest, prefill_only: bool) -> None:
        e.add_request(req.request_id, req.prompt_token_ids, req.params, prefill_only=prefill_only,
                      resumed=list(req.resumed), num_text_emitted=req.num_text_emitted)

    def _admit_loaded(self, e: Engine, r) -> None:
        entry = self._loading.pop(r.request_id, None)
        if entry is None:  # aborted while loading: its chunks stay cached
            return
        req, prefill_only, on_admit = entry
        for tier, n in r.served.items():
            self.counters[f"store_{tier}_chunks"] = self.counters.get(f"store_{tier}_chunks", 0) + n
        try:
            if on_admit is not None:
                on_admit()
            self._admit(e, req, prefill_only)
        except LmdisaggError as err:
            self.loop.fail(req.request_id, err)

    def _abort(self, e: Engine, request_id: str) -> bool:
        if self._loading.pop(request_id, None) is not None:
            return True
        return e.abort(request_id)

    async def resync(self) -> bytes:
        """A full snapshot of the chunks this worker holds (the router asks after a seq gap)."""
        def snap(e: Engine) -> bytes:
            self.batcher.add(e.drain_kv_events())
            return self.batcher.resync().to_msgpack()
        return await self.loop.call(snap)

    def _snapshot(self, e: Engine) -> None:
        """Loop thread: refresh the load report (load() must answer without waiting for a step)."""
        queued = sum(len(s) - s.num_computed_tokens for s in e.scheduler.waiting)
        st = dict(e.stats.__dict__)
        st.pop("extra", None)
        st.update(self.counters, held=len(e.held), cached_blocks=e.blocks.num_cached, loading=len(self._loading))
        if self.bridge is not None:
            b = self.bridge.stats()
            ts = b["store"]
            st.update(store_loads=b["loads"], store_load_timeouts=b["load_timeouts"],
                      store_offloaded=b["offloaded"], store_offload_errors=b["offload_errors"],
                      store_errors=sum(ts.failures.values()) + b["offload_errors"], store_down=list(ts.down))
        self._stats = WorkerStats(self.worker_id, queued, len(e.scheduler.running), e.blocks.num_free,
                                  e.blocks.num_blocks, st, len(e.scheduler.waiting), pid=os.getpid())

    async def load(self) -> WorkerStats:
        """The latest load report plus the KV event batches since the last call. Never waits for
        the engine (a long prefill step must not look like a dead worker)."""
        events = []
        while self._outbox:
            events.append(self._outbox.popleft())
        return replace(self._stats, events=events)

    async def abort(self, request_id: str) -> bool:
        self._cancel_hold(request_id)
        return await self.loop.call(lambda e: self._abort(e, request_id))

    async def shutdown(self) -> None:
        for h in self._holds.values():
            h.cancel()
        self._holds.clear()
        await self.background.close(2.0)
        self.loop.stop()
        if self.bridge is not None:
            self.bridge.close()
            self.bridge.store.close()
        if self.kv is not None:
            self.kv.close()

    # --- colocated ------------------------------------------------------------------------------
    async def _compile(self, req: GenerateRequest) -> None:
        """A structured request's grammar, compiled in a thread before the engine sees it (a large
        schema takes seconds; xgrammar releases the GIL), so that the engine's own check finds it
        in the cache instead of holding up every request's steps. Errors are left to that check."""
        if req.params.structured is not None:
            try:
                await asyncio.to_thread(self.engine.grammars().compile, req.params.structured)
            except LmdisaggError:
                pass

    async def generate(self, req: GenerateRequest):
        """Stream a whole request: TokenDelta per step until finished."""
        self.counters["requests"] += 1
        q = self.loop.open_stream(req.request_id)
        try:
            await self._compile(req)
            await self.loop.call(lambda e: self._add(e, req))
            async for delta in self._drain(q, req.request_id, self.timeouts["first_token_s"]):
                yield delta
        finally:
            await self._finish(req.request_id)

    async def _drain(self, q: asyncio.Queue, request_id: str, first_timeout: float):
        timeout = first_timeout
        while True:
            try:
                item = await asyncio.wait_for(q.get(), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError_(f"request {request_id}: no token within {timeout:.0f} s") from None
            if isinstance(item, BaseException):
                raise item
            delta = _delta(item)
            yield delta
            if delta.finished:
                return
            timeout = self.timeouts["token_s"]

    async def _finish(self, request_id: str) -> None:
        """Always runs when a stream ends (finished, cancelled, or failed): nothing stays allocated."""
        self.loop.close_stream(request_id)
        await self.loop.call(lambda e: self._abort(e, request_id))

    # --- holds on prefilled blocks --------------------------------------------------------------
    def _cancel_hold(self, request_id: str) -> None:
        h = self._holds.pop(request_id, None)
        if h is not None:
            h.cancel()


class PrefillWorker(Worker):
    role = "prefill"

    async def prefill(self, req: GenerateRequest, decode=None) -> PrefillResult:
        """Compute the prompt, return the first token and a handle on the KV (held until
        ``release`` or the hold timeout). ``decode``: the decode worker's actor that will continue
        the request; with ``transport.push`` the KV is pushed into blocks it expects."""
        self.counters["requests"] += 1
        expecting = None

        def expect() -> None:  # the loop thread, as the engine takes the prompt (see _prefill)
            nonlocal expecting
            e = self.engine
            try:
                expecting = decode.expect.remote(req, self.kv.buffer.desc, tuple(e.layout.__dict__.values()),
                                                 e.namespace.digest())
            except Exception as err:  # noqa: BLE001 - never fail the prompt for it: the decode worker pulls
                log.warning("could not ask the decode worker to expect %s (%s); it will pull", req.request_id, err)
        pushed = False
        try:
            res = await self._prefill(req, expect if decode is not None and self.kv.push_enabled else None)
            if res.handle is not None and expecting is not None:
                pushed = await self._push(req.request_id, res.handle, expecting)
                if pushed:
                    res.handle = replace(res.handle, pushed=True)
            return res
        finally:
            if expecting is not None and not pushed:
                self.background.start(self._cancel_expect(decode, req.request_id), f"cancel_expect of {req.request_id}")

    async def _cancel_expect(self, decode, rid: str) -> None:
        """The decode worker frees what it holds for a prompt we will not push (the call runs
        there after its ``expect``: one caller's calls to an actor start in order)."""
        try:
            await asyncio.wait_for(decode.cancel_expect.remote(rid), 30)
        except Exception as err:  # noqa: BLE001 - a dead decode worker holds nothing; else its timer frees it
            log.debug("cancel_expect of %s failed: %s", rid, err)

    async def _push(self, rid: str, h: KVHandle, expecting) -> bool:
        """Push the prompt's blocks into the decode worker's expectation; False if it has none
        (it then pulls) or the push could not start."""
        try:
            got = await asyncio.wait_for(expecting, self.timeouts["transfer_s"])
        except Exception as err:  # noqa: BLE001 - its actor died or answered late: it pulls, or is replaced
            log.warning("decode worker did not expect %s (%s); it will pull", rid, err)
            return False
        if got is None:
            return False
        ticket, src = got
        ids = h.descriptor.block_ids
        if not src or max(src) >= len(ids):
            log.error("decode worker expects blocks %s of %s, which has %d; it will pull", src, rid, len(ids))
            return False
        try:
            job = await asyncio.to_thread(self.kv.push, ticket, [ids[i] for i in src])
        except (TransferError, OSError, RuntimeError) as err:
            self.counters["push_failures"] += 1
            log.error("KV push of %s failed to start: %s; the decode worker pulls", rid, err)
            return False
        self.counters["pushed_chunks"] += len(src)
        self.background.start(self._watch_push(rid, job), f"watching the push of {rid}")
        return True

    async def _watch_push(self, rid: str, job) -> None:
        """Count and log a push that fails on this side (the decode worker sees it too)."""
        deadline = time.monotonic() + self.timeouts["transfer_s"]
        while not job.poll().terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if not job.state.terminal:
            await asyncio.to_thread(job.abort)
        if job.error is not None:
            self.counters["push_failures"] += 1
            log.warning("KV push of %s failed: %s", rid, job.error)

    async def _prefill(self, req: GenerateRequest, on_admit=None) -> PrefillResult:
        """``on_admit()``: called (loop thread) as the engine takes the request, after its grammar
        compile (seconds for a large schema) and its chunks' load from the KV store. The decode
        worker's expectation is made there: pushes to one decode worker land in the order of its
        expectations, and the engine computes prompts in the order it takes them, so none waits
        behind an earlier prompt's compile or load."""
        q = self.loop.open_stream(req.request_id)
        try:
            await self._compile(req)
            await self.loop.call(lambda e: self._add(e, req, prefill_only=True, on_admit=on_admit))
            try:
                out = await asyncio.wait_for(q.get(), self.timeouts["first_token_s"])
            except asyncio.TimeoutError:
                await self.loop.call(lambda e: self._abort(e, req.request_id))
                raise TimeoutError_(f"prefill of {req.request_id} took over "
                                    f"{self.timeouts['first_token_s']:.0f} s") from None
        finally:
            self.loop.close_stream(req.request_id)
        if isinstance(out, BaseException):
            raise out
        first = _delta(out)
        if not out.prefill_done:
            return PrefillResult(first, None)
        try:
            handle = await self.loop.call(lambda e: self._publish(e, req, out))
        except BaseException:
            await self.loop.call(lambda e: e.release_held(req.request_id))
            raise
        # never hold blocks forever: a decode worker that died never calls release()
        self._holds[req.request_id] = asyncio.get_running_loop().call_later(
            self.timeouts["hold_s"],
            lambda: self.background.start(self._hold_expired(req.request_id), f"hold timeout of {req.request_id}"))
        return PrefillResult(first, handle)

    async def _hold_expired(self, request_id: str) -> None:
        if await self.release(request_id):
            log.warning("no decode worker released the KV of %s within hold_s=%.0f s; its blocks are freed "
                        "(a pull still reading them is not trusted: the decode worker recomputes the prompt)",
                        request_id, self.timeouts["hold_s"])

    def _publish(self, e: Engine, req: GenerateRequest, out: RequestOutput) -> KVHandle:
        seq = e.held_request(req.request_id)
        keys = e.chunk_keys(req.context_token_ids, req.params.cache_salt)
        gen = seq.generator.get_state().numpy().tobytes() if seq.generator is not None else None
        import ray
        return KVHandle(
            request_id=req.request_id, source_worker=self.worker_id,
            source_actor=ray.get_runtime_context().current_actor, chunk_keys=keys,
            has_tail=len(seq.block_table) > len(keys), descriptor=self.kv.describe(list(seq.block_table)),
            layout=tuple(e.layout.__dict__.values()), namespace=e.namespace.digest(),
            first_token=out.new_token_ids[0], num_text_emitted=seq.num_text_emitted, generator_state=gen)

    async def release(self, request_id: str) -> bool:
        """The decode side has the KV (or gave up): let the held blocks go to the prefix cache."""
        self._cancel_hold(request_id)
        return await self.loop.call(lambda e: e.release_held(request_id))


@dataclass
class _Expected:
    """Blocks a decode worker holds for a prompt the prefill worker will push."""

    keys: list = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    to_fill: dict = field(default_factory=dict)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (source block index, our block)
    x: object = None        # the transport's expectation
    timer: asyncio.TimerHandle | None = None
    dropped: bool = False


class DecodeWorker(Worker):
    role = "decode"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._expected: dict[str, _Expected] = {}
        # recent aborts: a late expect is refused, and a request whose KV was still moving is
        # dropped once it has landed
        self._aborted: OrderedDict[str, None] = OrderedDict()

    async def expect(self, req: GenerateRequest, source, layout: tuple, namespace: bytes):
        """Push handoff (called by the prefill worker while it computes the prompt): hold blocks
        for the prompt's KV, chunks cached here reused, and post the receives for the rest.
        Returns (ticket, the source's block indices to push, in order), or None when there is
        nothing to receive or no room (``decode`` then pulls or recomputes as usual)."""
        rid, e = req.request_id, self.engine
        if rid in self._expected or rid in self._aborted:
            return None
        if layout != tuple(e.layout.__dict__.values()) or namespace != e.namespace.digest():
            log.error("KV layout/model mismatch with the prefill worker of %s; not expecting it", rid)
            return None
        ex = self._expected[rid] = _Expected()
        has_tail = len(req.context_token_ids) % e.config.chunk_tokens != 0
        try:
            ex.keys = e.chunk_keys(req.context_token_ids, req.params.cache_salt)
            ex.block_ids, ex.to_fill = await self.loop.call(lambda e: self._claim(e, ex.keys, has_tail))
        except LmdisaggError as err:
            log.warning("cannot claim blocks for %s (%s); it will be pulled or recomputed", rid, err)
            self._expected.pop(rid, None)
            return None
        ex.pairs = self._pairs(ex.keys, ex.block_ids, ex.to_fill, has_tail)
        if ex.dropped or not ex.pairs:  # cancelled meanwhile, or every chunk is cached here
            await self._drop_expected(rid, ex)
            return None
        try:
            ex.x = self.kv.expect(source, [d for _, d in ex.pairs])
        except (TransferError, OSError, RuntimeError) as err:
            log.error("cannot expect the KV of %s: %s; it will be pulled", rid, err)
            await self._drop_expected(rid, ex)
            return None
        if ex.x.ticket is None:  # the source is known lost
            await self._drop_expected(rid, ex)
            return None
        ex.timer = asyncio.get_running_loop().call_later(  # a prefill that never answers
            self.expect_s, lambda: self.background.start(self._drop_expected(rid, ex), f"expectation timeout of {rid}"))
        return ex.x.ticket.pack(), [i for i, _ in ex.pairs]

    async def cancel_expect(self, request_id: str) -> None:
        """The prefill worker will not push this prompt: free the blocks held for it."""
        ex = self._expected.get(request_id)
        if ex is not None:
            await self._drop_expected(request_id, ex)

    async def _drop_expected(self, rid: str, ex: _Expected) -> None:
        """Abort the expectation (the source fills what it has not pushed) and free its blocks.
        An expectation still claiming its blocks is only marked: ``expect`` drops it after."""
        ex.dropped = True
        if self._expected.get(rid) is ex:
            del self._expected[rid]
        if ex.timer is not None:
            ex.timer.cancel()
        if ex.x is not None:
            await asyncio.to_thread(ex.x.abort)
        if ex.block_ids:
            ids, ex.block_ids = ex.block_ids, []
            await self.loop.call(lambda e: e.free_blocks(ids))

    async def abort(self, request_id: str) -> bool:
        self._aborted[request_id] = None
        while len(self._aborted) > 4096:
            self._aborted.popitem(last=False)
        ex = self._expected.get(request_id)
        if ex is not None:  # not awaited: the router aborts the prefill worker once this returns,
            # and the expectation's drain may wait for the pair's earlier pushes (other prompts)
            self.background.start(self._drop_expected(request_id, ex), f"abort of the expectation of {request_id}")
        return await super().abort(request_id)

    async def shutdown(self) -> None:
        for rid, ex in list(self._expected.items()):
            await self._drop_expected(rid, ex)
        await super().shutdown()

    async def decode(self, req: GenerateRequest, handle: KVHandle):
        """Stream a prefilled request: the first token, then one delta per step."""
        self.counters["requests"] += 1
        e = self.engine
        rid = req.request_id
        q = self.loop.open_stream(rid)
        try:
            await self._compile(req)
            ex = self._expected.pop(rid, None)
            if rid in self._aborted:  # the router's abort overtook this call: move nothing
                if ex is not None:
                    await self._drop_expected(rid, ex)
                await self._release_source(handle)
                self.counters["aborted_before_admit"] += 1
                return
            moved: bool | None = False  # None: the KV landed but the source let it go first
            if ex is not None:
                if handle.pushed:
                    moved = await self._receive(req, handle, ex)
                else:
                    await self._drop_expected(rid, ex)
            if moved is False and rid not in self._aborted:
                moved = await self._pull(req, handle)
            if not moved and rid not in self._aborted:  # fall back: compute the prompt's KV here
                self.counters["recomputed_prompts"] += 1
                await self.loop.call(lambda e: e.add_prefilled_request(
                    rid, req.prompt_token_ids, handle.first_token, req.params, None,
                    num_text_emitted=handle.num_text_emitted, generator_state=_gen_state(handle),
                    resumed=list(req.resumed)))
            if rid in self._aborted:  # the abort came while the KV moved: _admit_moved dropped it
                if not moved:         # (or it came just after: _finish aborts it in the engine)
                    self.counters["aborted_before_admit"] += 1  # the transfer failed: nothing to admit
                return
            async for delta in self._drain(q, rid, self.timeouts["first_token_s"]):
                yield delta
        finally:
            await self._finish(rid)

    async def _pull(self, req: GenerateRequest, h: KVHandle) -> bool | None:
        """Bring the prompt's KV here and admit the request; False if the transfer failed, None
        if the source let its blocks go before the pull ended (see ``_admit_moved``)."""
        e = self.engine
        if h.layout != tuple(e.layout.__dict__.values()) or h.namespace != e.namespace.digest():
            log.error("KV layout/model mismatch between %s and %s; recomputing", h.source_worker, self.worker_id)
            await self._release_source(h)
            return False
        try:
            block_ids, to_fill = await self.loop.call(lambda e: self._claim(e, h.chunk_keys, h.has_tail))
        except LmdisaggError as err:
            log.warning("cannot claim blocks for %s (%s); recomputing", req.request_id, err)
            await self._release_source(h)
            return False
        pairs = self._pairs(h.chunk_keys, block_ids, to_fill, h.has_tail)
        try:
            if pairs:
                t0 = time.perf_counter()  # the transfer alone (not the waits for the engine loop)
                inner = await asyncio.to_thread(self.kv.pull, h.descriptor, [s for s, _ in pairs],
                                                [d for _, d in pairs], self.timeouts["transfer_s"])
                self.counters["pull_seconds"] += time.perf_counter() - t0
                self.counters["transfer_seconds"] += inner
        except (TransferError, OSError, RuntimeError) as err:
            self.counters["transfer_failures"] += 1
            log.error("KV pull of %s from %s failed: %s; recomputing", req.request_id, h.source_worker, err)
            await self.loop.call(lambda e: e.free_blocks(block_ids))
            await self._release_source(h)
            return False
        self.counters["pulled_chunks"] += len(pairs)
        self.counters["pulled_bytes"] += len(pairs) * e.layout.chunk_nbytes
        return await self._admit_moved(req, h, block_ids, to_fill)

    async def _receive(self, req: GenerateRequest, h: KVHandle, ex: _Expected) -> bool | None:
        """Wait for the pushed blocks and admit the request; False (blocks freed) if the push
        failed, None if the source let its blocks go before it ended (see ``_admit_moved``)."""
        if ex.timer is not None:
            ex.timer.cancel()
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(ex.x.wait, self.timeouts["transfer_s"])
        except TransferError as err:
            self.counters["transfer_failures"] += 1
            log.error("KV push of %s from %s failed: %s; pulling instead", req.request_id, h.source_worker, err)
            await self._drop_expected(req.request_id, ex)
            return False
        self.counters["push_seconds"] += time.perf_counter() - t0
        self.counters["pushed_chunks"] += len(ex.pairs)
        return await self._admit_moved(req, h, ex.block_ids, ex.to_fill)

    @staticmethod
    def _claim(e: Engine, keys: list, has_tail: bool) -> tuple[list[int], dict]:
        """Hold a block per chunk key (cached ones reused) and one for a partial tail."""
        ids, to_fill = e.claim_chunks(keys)
        if has_tail:
            try:
                ids += e.allocate_blocks(1)
            except BaseException:
                e.free_blocks(ids)
                raise
        return ids, to_fill

    @staticmethod
    def _pairs(keys: list, block_ids: list[int], to_fill: dict, has_tail: bool) -> list[tuple[int, int]]:
        """Which source blocks go where: the chunks missing here, and the tail."""
        pairs = [(i, b) for i, (k, b) in enumerate(zip(keys, block_ids)) if k in to_fill and to_fill[k] == b]
        if has_tail:
            pairs.append((len(keys), block_ids[-1]))
        return pairs

    async def _admit_moved(self, req: GenerateRequest, h: KVHandle, block_ids: list[int],
                           to_fill: dict) -> bool | None:
        """The prompt's KV is in ``block_ids``: let the source's blocks go, admit the request.
        The bytes are trusted only if the source held its blocks until now. Once it frees them
        (its hold timer, ``hold_s``, or the abort the router sends it right after ours) another
        prompt may overwrite them while the transfer still reads:
          - a request aborted meanwhile is dropped (True: nothing more to do);
          - one whose source answers that it held nothing is not admitted (None: the caller
            recomputes the prompt, ``kv_released_early``).
        Either way its new blocks are freed, not cached."""
        held = await self._release_source(h)
        if req.request_id in self._aborted:
            self.counters["aborted_before_admit"] += 1
            await self.loop.call(lambda e: e.free_blocks(block_ids))
            return True
        if held is False:
            self.counters["kv_released_early"] += 1
            log.error("%s let the KV of %s go before it had moved here; recomputing",
                      h.source_worker, req.request_id)
            await self.loop.call(lambda e: e.free_blocks(block_ids))
            return None
        self.counters["reused_chunks"] += len(h.chunk_keys) - len(to_fill)
        gen = _gen_state(h)

        def admit(e: Engine):
            e.commit_chunks(to_fill, hold=True)
            try:
                e.add_prefilled_request(req.request_id, req.prompt_token_ids, h.first_token, req.params,
                                        block_ids, num_text_emitted=h.num_text_emitted, generator_state=gen,
                                        resumed=list(req.resumed))
            except BaseException:
                e.free_blocks(block_ids)
                raise
        await self.loop.call(admit)
        return True

    async def _release_source(self, h: KVHandle) -> bool | None:
        """Let the prefill worker's held blocks go: whether it still held them (None: no answer;
        a source that died mid-transfer fails the transfer itself, and its hold timer frees them)."""
        try:
            return await asyncio.wait_for(h.source_actor.release.remote(h.request_id), 10)
        except Exception as err:  # noqa: BLE001
            log.warning("release of %s on %s failed: %s", h.request_id, h.source_worker, err)
            return None
