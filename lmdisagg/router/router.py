"""The request path behind the HTTP API: tokenize → validate → place → prefill → decode → stream.

    1. place       the policy picks a prefill worker (and a decode worker) from the load snapshots
    2. prefill     PrefillWorker.prefill(req) → first token + KVHandle   (colocated: generate())
    3. decode      DecodeWorker.decode(req, handle) streams the rest
    4. finish      on any early exit (client gone, error, timeout) both workers abort the request,
                   the decode worker first (it drops KV still moving from the prefill worker's
                   blocks, which the prefill worker's abort frees)
    5. migrate     a worker that dies meanwhile (its actor is gone) is marked dead, and the request
                   goes back to 1 on live workers, carrying the tokens already streamed

Worker loads are polled in the background; the policy sees them plus this router's own count of
requests it has in flight per worker (fresher than any poll).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from lmdisagg.config import ClusterConfig
from lmdisagg.engine.request import SamplingParams
from lmdisagg.errors import (ContextLengthError, InvalidRequestError, LmdisaggError, TimeoutError_,
                             UnavailableError)
from lmdisagg.kv.keys import chunk_keys, salt_root
from lmdisagg.router.events import KVEventBatch
from lmdisagg.router.index import ChunkIndex
from lmdisagg.router.metrics import RouterMetrics
from lmdisagg.router.policy import PlacementRequest, WorkerLoad, make_policy
from lmdisagg.router.tool_parsers import make_parser
from lmdisagg.workers.background import Background
from lmdisagg.workers.messages import GenerateRequest, TokenDelta, WorkerInfo, WorkerStats

log = logging.getLogger(__name__)


@dataclass
class WorkerRef:
    info: WorkerInfo
    actor: object                       # Ray actor handle
    alive: bool = True
    stats: WorkerStats | None = None
    in_flight: int = 0                  # requests this router has on it now
    in_flight_tokens: int = 0           # their prompt tokens (prefill role)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id


def _actor_died(err: BaseException) -> bool:
    """The worker's Ray actor is gone (its process died, or Ray lost it): not the request's fault."""
    import ray.exceptions as rex
    return isinstance(err, (rex.RayActorError, getattr(rex, "ActorUnavailableError", rex.RayActorError)))


class _WorkerDied(Exception):
    def __init__(self, worker: "WorkerRef", err: BaseException):
        super().__init__(f"{worker.info.role} worker {worker.worker_id} died: {type(err).__name__}")
        self.role = worker.info.role


def unwrap(err: BaseException) -> BaseException:
    """Ray wraps worker exceptions; give back ours (typed) where there is one."""
    import ray.exceptions as rex
    if isinstance(err, rex.RayTaskError):
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            return unwrap(cause)
    if _actor_died(err):
        return UnavailableError(f"worker unavailable: {err}")
    return err


@dataclass
class Router:
    config: ClusterConfig
    workers: list[WorkerRef]
    tokenizer: object | None            # lmdisagg.engine.loader.Tokenizer, None for token-id-only models
    metrics: RouterMetrics = field(default_factory=RouterMetrics)

    def __post_init__(self):
        self.colocated = self.config.mode == "colocated"
        self.by_id = {w.worker_id: w for w in self.workers}
        self.prefill = [w for w in self.workers if w.info.role in ("prefill", "both")]
        self.decode = [w for w in self.workers if w.info.role == "decode"]
        info = self.workers[0].info
        self.max_model_len = min(w.info.max_model_len for w in self.workers)
        self.chunk_tokens = info.chunk_tokens
        self.namespace = info.namespace
        self.policy = make_policy(self.config.router.policy)
        self.index = ChunkIndex()  # chunk key -> prefill workers holding it (from KV events)
        for w in self.prefill:
            self.index.add_worker(w.worker_id)
        self.model_name = self.config.router.served_model_name or self.config.model
        self._poller: asyncio.Task | None = None
        self._aborts = Background(log)  # aborts sent when a request ends early
        self.in_flight = 0
        self._grammars = None  # structured outputs' compiler: a bad constraint is a 400 here, not mid-stream
        self._grammars_lock = threading.Lock()
        # tool_choice "auto": the configured parser, else the one the chat template's format names
        template = self.config.router.chat_template or getattr(getattr(self.tokenizer, "hf", None), "chat_template", None)
        self.tool_parser = make_parser(self.config.router.tool_call_parser, template if isinstance(template, str) else None)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        await self._aborts.close(5.0)  # the workers free those requests' blocks
        if self._poller:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - keep polling
                log.exception("worker poll failed")

    async def poll_once(self) -> None:
        async def one(w: WorkerRef):
            try:
                w.stats = await asyncio.wait_for(w.actor.load.remote(), 5.0)
                if w.stats.pid and w.stats.pid != w.info.pid:
                    await self._restarted(w)
                if not w.alive:
                    log.warning("worker %s is answering again", w.worker_id)
                w.alive = True
                self.metrics.observe_worker(w.worker_id, w.stats)
            except Exception as e:  # noqa: BLE001
                if w.alive:
                    log.error("worker %s stopped answering: %s", w.worker_id, e)
                w.alive = False
                return
            await self._apply_events(w)
        await asyncio.gather(*(one(w) for w in self.workers))

    async def _restarted(self, w: WorkerRef) -> None:
        """Ray restarted the worker's actor in a new process: nothing of the old one's caches is
        left, and its KV events start over. Its index entries go; its info is read again."""
        old = w.info.pid
        w.info = await asyncio.wait_for(w.actor.info.remote(), 5.0)
        if w.worker_id in self.index:
            self.index.remove_worker(w.worker_id)
            self.index.add_worker(w.worker_id)
        self.metrics.restarts.labels(w.worker_id).inc()
        log.warning("worker %s was restarted (pid %d, was %d): serving again with empty caches", w.worker_id,
                    w.info.pid, old)

    async def _apply_events(self, w: WorkerRef) -> None:
        need_resync = False
        for data in w.stats.events:
            try:
                r = self.index.apply(KVEventBatch.from_msgpack(data))
            except LmdisaggError as e:
                log.error("bad KV event batch from %s: %s", w.worker_id, e)
                need_resync = True
                continue
            need_resync = need_resync or r.need_resync
        w.stats.events = []
        if need_resync:
            log.warning("KV events from %s had a gap; resyncing its index entries", w.worker_id)
            snapshot = await asyncio.wait_for(w.actor.resync.remote(), 10.0)
            self.index.apply(KVEventBatch.from_msgpack(snapshot))

    def healthy(self) -> bool:
        return bool([w for w in self.prefill if w.alive]) and (self.colocated or bool([w for w in self.decode if w.alive]))

    # --- tokenize + validate ----------------------------------------------------------------------
    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; send token ids as the prompt", param="prompt")
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, **options) -> list[int]:
        """``options``: add_generation_prompt, continue_final_message, kwargs (Tokenizer.apply_chat_template)."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer/chat template", param="messages")
        render = self.tool_parser.render if self.tool_parser is not None else None
        return self.tokenizer.apply_chat_template(messages, tools=tools, render_calls=render,
                                                  template=self.config.router.chat_template, **options)

    def check(self, ids: list[int], params: SamplingParams, compile: bool = True) -> None:
        """Refuse what no worker could run. ``compile``: also compile a structured-output
        constraint here (the HTTP server does that in a thread: ``check_structured``)."""
        params.validate()
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        n = len(ids)
        if n >= self.max_model_len:
            raise ContextLengthError(f"prompt has {n} tokens; this model's context is {self.max_model_len} tokens",
                                     param="prompt")
        if n + params.max_tokens > self.max_model_len:
            raise ContextLengthError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                                     f"of {self.max_model_len} tokens", param="max_tokens")
        if compile and params.structured is not None:
            self._compile(params.structured)

    async def check_structured(self, structured) -> None:
        """Compile a constraint off the event loop (a large schema takes seconds; xgrammar releases
        the GIL): a bad one is a 400 before any worker sees the request."""
        await asyncio.to_thread(self._compile, structured)

    def _compile(self, structured) -> None:
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise InvalidRequestError("this model has no tokenizer, which structured outputs need",
                                              param="response_format")
                from lmdisagg.engine.structured import Grammars
                self._grammars = Grammars(self.tokenizer.hf, self.tokenizer.vocab_size, self.tokenizer.eos_token_ids)
        self._grammars.compile(structured)  # cached by xgrammar

    # --- one choice ---------------------------------------------------------------------------
    def _loads(self, refs: list[WorkerRef]) -> list[WorkerLoad]:
        out = []
        for w in refs:
            if not w.alive:
                continue
            s = w.stats
            out.append(WorkerLoad(w.worker_id,
                                  (s.queued_prefill_tokens if s else 0) + w.in_flight_tokens,
                                  (s.running if s else 0) + w.in_flight,
                                  s.free_blocks if s else 0, s.total_blocks if s else 0,
                                  queued_requests=s.queued_requests if s else 0, node=w.info.node_ip))
        return out

    def place(self, req: GenerateRequest):
        prefill = self._loads(self.prefill)
        decode = None if self.colocated else self._loads(self.decode)
        if not prefill or (decode is not None and not decode):
            raise UnavailableError("no live workers to serve the request")
        context = req.context_token_ids
        keys = chunk_keys(context, self.chunk_tokens, self.namespace, salt_root(req.params.cache_salt))
        preq = PlacementRequest(req.request_id, keys, len(context), context,
                                req.params.max_tokens - len(req.resumed))
        placement = self.policy.choose(preq, prefill, decode, self.index)
        log.debug("placed %s: prefill=%s decode=%s cached_chunks=%d reason=%s scores=%s", req.request_id,
                  placement.prefill, placement.decode, placement.cached_chunks, placement.reason,
                  placement.scores)
        self.metrics.predicted_cached_chunks.inc(placement.cached_chunks)
        self.metrics.prompt_chunks.inc(len(keys))
        self.metrics.placements.labels(placement.prefill, "prefill").inc()
        if not self.colocated:
            self.metrics.placements.labels(placement.decode, "decode").inc()
        return self.by_id[placement.prefill], self.by_id[placement.decode]

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Deltas of one choice until finished. Raises typed errors; on any early exit the
        request is aborted on every worker that has it.

        A worker that dies while serving the request (its Ray actor is gone) loses nothing: the
        request is placed again on live workers and resumed there with the tokens it has
        streamed so far (they are computed with the prompt, then generation goes on), up to
        ``router.max_migrations`` times. Greedy output is unchanged by a migration in fp32 (in
        bf16 the recomputed KV rounds differently and may change the rest); a sampled request
        draws the rest of its tokens afresh."""
        rt = self.config.router
        deadline = time.monotonic() + rt.request_timeout_s
        resumed: list[int] = list(req.resumed)
        text_chars = req.num_text_emitted
        attempt = req
        finished = False
        for migration in range(rt.max_migrations + 1):
            try:
                async for delta in self._stream_once(attempt, deadline):
                    resumed += delta.token_ids
                    text_chars += len(delta.text)
                    finished = delta.finished
                    yield delta
                return
            except _WorkerDied as died:
                if finished:  # it died after the last token (before its stream closed): nothing to resume
                    return
                if migration == rt.max_migrations:
                    raise UnavailableError(f"{died}; the request was resumed {migration} times, "
                                           f"router.max_migrations={rt.max_migrations}") from None
                self.metrics.migrations.labels(died.role).inc()
                log.warning("%s; resuming %s on other workers after %d tokens", died, req.request_id, len(resumed))
                attempt = replace(req, request_id=f"{req.request_id}~{migration + 1}", resumed=tuple(resumed),
                                  num_text_emitted=text_chars)

    async def _stream_once(self, req: GenerateRequest, deadline: float) -> AsyncIterator[TokenDelta]:
        """One placement of the request: prefill + decode (or a colocated generate)."""
        rt = self.config.router
        p, d = self.place(req)
        involved = {p.worker_id: p} if self.colocated else {p.worker_id: p, d.worker_id: d}
        n_prompt = len(req.prompt_token_ids) + len(req.resumed)
        for w in involved.values():
            w.in_flight += 1
        p.in_flight_tokens += n_prompt
        finished = migrating = False
        prefilling = True  # n_prompt still counts in p.in_flight_tokens
        serving = p  # the worker whose call is in progress (to blame if its actor dies)
        try:
            if self.colocated:
                gen = p.actor.generate.remote(req)
                async for delta in self._iter(gen, rt.first_token_timeout_s, deadline):
                    if prefilling:
                        p.in_flight_tokens -= n_prompt
                        prefilling = False
                    finished = delta.finished
                    yield delta
                return
            try:
                # transport.push: the prefill worker has the decode worker expect the KV, and pushes it
                push_to = d.actor if self.config.transport.push else None
                res = await asyncio.wait_for(p.actor.prefill.remote(req, push_to), rt.first_token_timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError_(f"prefill took over {rt.first_token_timeout_s:.0f} s") from None
            finally:
                p.in_flight_tokens -= n_prompt
                prefilling = False
            finished = res.first.finished
            yield res.first
            if res.handle is None:
                return
            serving = d
            async for delta in self._iter(d.actor.decode.remote(req, res.handle), rt.token_timeout_s, deadline):
                delta.cached_tokens = res.first.cached_tokens
                finished = delta.finished
                yield delta
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # noqa: BLE001
            if _actor_died(e):
                serving.alive = False  # placed nowhere until it answers a poll again
                migrating = True
                raise _WorkerDied(serving, e) from None
            raise unwrap(e) from None
        finally:
            for w in involved.values():
                w.in_flight -= 1
            if prefilling:  # ended before its first token
                p.in_flight_tokens -= n_prompt
            if not finished:
                if not migrating:
                    self.metrics.aborted.inc()
                # shielded: runs even when this task is being cancelled (client disconnected)
                # (a worker only unreachable for a while gets it too, so it frees the request's blocks).
                # The decode worker first: once the prefill worker frees its held blocks they may be
                # reused, so a pull still reading them must already know it is to be dropped
                self._aborts.start(self._abort(req.request_id, list(involved.values())[::-1]),
                                   f"abort of {req.request_id}")

    async def _iter(self, gen, timeout: float, deadline: float):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError_("request ran past request_timeout_s")
            try:
                ref = await asyncio.wait_for(gen.__anext__(), min(timeout, left))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise TimeoutError_(f"no token within {min(timeout, left):.0f} s") from None
            yield await ref

    async def _abort(self, request_id: str, workers: list[WorkerRef]) -> None:
        """Abort on each worker in turn, each after the one before has answered (or 10 s); workers
        known dead last (a restarting actor answers only once it is back, and holds nothing)."""
        for w in sorted(workers, key=lambda w: not w.alive):
            try:
                await asyncio.wait_for(w.actor.abort.remote(request_id), 10)
            except Exception as e:  # noqa: BLE001
                log.log(logging.WARNING if w.alive else logging.DEBUG, "abort of %s on %s failed: %s",
                        request_id, w.worker_id, e)
