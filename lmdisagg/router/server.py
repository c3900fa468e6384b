"""The OpenAI-compatible HTTP API (aiohttp).

    POST /v1/completions, /v1/chat/completions   stream (SSE) or not; n, stop, seed, ignore_eos, ...
    GET  /v1/models, /health, /metrics

Every error is OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``: 400 bad
values, 404 unknown model, 413 body too large, 422 wrong types/shape, 429 too many requests in
flight, 503 no live workers, 504 timeouts. A client that disconnects cancels its handler, which
aborts the request on every worker.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid

from aiohttp import web
from pydantic import ValidationError

from lmdisagg.engine.request import SamplingParams
from lmdisagg.kv.keys import chunk_keys, salt_root
from lmdisagg.errors import InvalidRequestError, LmdisaggError, ModelNotFoundError, OverloadedError, PayloadTooLargeError
from lmdisagg.router import protocol as P
from lmdisagg.router.router import Router
from lmdisagg.workers.messages import GenerateRequest

log = logging.getLogger(__name__)


def error_response(status: int, message: str, type_: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return web.json_response(body, status=status)


def from_exc(e: LmdisaggError) -> web.Response:
    return error_response(e.status, e.message, e.type, e.param)


class OpenAIServer:
    def __init__(self, router: Router):
        self.router = router
        self.api_key = router.config.router.api_key or os.environ.get("LMDISAGG_API_KEY") or None
        self.app = web.Application(client_max_size=router.config.router.max_body_bytes, middlewares=[self._auth])
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/responses", self.responses),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model}", self.model),
            web.post("/tokenize", self.tokenize),      # vLLM's token counting endpoints
            web.post("/detokenize", self.detokenize),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
            web.get("/stats", self.stats),
            web.post("/debug/placement", self.explain),
        ])
        self.app.on_startup.append(lambda app: router.start())
        self.app.on_cleanup.append(lambda app: router.stop())

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """With an API key, /v1/*, /debug/* and /(de)tokenize need 'Authorization: Bearer <key>' (as vLLM's
        --api-key); /health, /metrics and /stats stay open to probes and scrapers."""
        if self.api_key and request.path.startswith(("/v1/", "/debug/", "/tokenize", "/detokenize")):
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
                return error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      "invalid_request_error")
        return await handler(request)

    # --- small endpoints ------------------------------------------------------------------------
    def _model_card(self) -> dict:
        r = self.router
        return {"id": r.model_name, "object": "model", "created": int(time.time()), "owned_by": "lmdisagg",
                "max_model_len": r.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.router.model_name:
            return error_response(404, f"model {name!r} is not served here; try {self.router.model_name!r}",
                                  "not_found_error", "model")
        return web.json_response(self._model_card())

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: a prompt, or chat messages through the chat template (as
        /v1/chat/completions would send them) -> their token ids and count."""
        r = self.router
        try:
            body = await self._parse_model(request, P.TokenizeRequest)
            if body.messages is not None:
                chat = P.ChatCompletionRequest(model=r.model_name, messages=body.messages,
                                               add_generation_prompt=body.add_generation_prompt,
                                               continue_final_message=body.continue_final_message,
                                               chat_template_kwargs=body.chat_template_kwargs)
                ids = r.encode_chat(chat.template_messages(), **chat.template_options())
            elif body.prompt is not None:
                if r.tokenizer is None:
                    raise InvalidRequestError("this model has no tokenizer", param="prompt")
                ids = list(r.tokenizer.hf(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
            else:
                raise InvalidRequestError("send a prompt or messages", param="prompt")
        except _Unprocessable as e:
            return error_response(422, e.args[0], "invalid_request_error", e.param)
        except LmdisaggError as e:
            return from_exc(e)
        return web.json_response({"count": len(ids), "max_model_len": r.max_model_len, "tokens": ids})

    async def detokenize(self, request: web.Request) -> web.Response:
        r = self.router
        try:
            body = await self._parse_model(request, P.DetokenizeRequest)
            if r.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer", param="tokens")
            if any(t < 0 or t >= r.tokenizer.vocab_size for t in body.tokens):
                raise InvalidRequestError(f"token ids must be in [0, {r.tokenizer.vocab_size})", param="tokens")
            text = r.tokenizer.hf.decode(body.tokens)  # special tokens included: /tokenize's inverse
        except _Unprocessable as e:
            return error_response(422, e.args[0], "invalid_request_error", e.param)
        except LmdisaggError as e:
            return from_exc(e)
        return web.json_response({"prompt": text})

    async def _parse_model(self, request: web.Request, model):
        """The body as ``model``; its ``model`` field, when sent, must be the served one."""
        body = await self._parse_as(request, model)
        if body.model is not None and body.model != self.router.model_name:
            raise ModelNotFoundError(f"model {body.model!r} is not served here; try {self.router.model_name!r}",
                                     param="model")
        return body

    async def health(self, request: web.Request) -> web.Response:
        r = self.router
        body = {"status": "ok" if r.healthy() else "unavailable", "mode": r.config.mode,
                "workers": {w.worker_id: {"role": w.info.role, "alive": w.alive} for w in r.workers}}
        return web.json_response(body, status=200 if r.healthy() else 503)

    async def stats(self, request: web.Request) -> web.Response:
        """Fresh per-worker load and counters (free/held KV blocks, tokens computed, transfers)."""
        r = self.router
        await r.poll_once()
        index = {w.worker_id: {"keys": r.index.num_keys(w.worker_id), "stale": r.index.is_stale(w.worker_id)}
                 for w in r.prefill}
        body = {"in_flight": r.in_flight, "policy": r.policy.name, "placement": r.policy.counters.as_dict(),
                "index": {"workers": index, "stats": r.index.stats.as_dict()}, "workers": {
            w.worker_id: {"role": w.info.role, "alive": w.alive, "node": w.info.node_ip, "pid": w.info.pid,
                          # this router's requests on it, and their prompt tokens not yet prefilled
                          "router_in_flight": w.in_flight, "router_in_flight_prompt_tokens": w.in_flight_tokens,
                          "running": w.stats.running,
                          "queued_prefill_tokens": w.stats.queued_prefill_tokens,
                          "free_blocks": w.stats.free_blocks, "total_blocks": w.stats.total_blocks,
                          **w.stats.stats} if w.stats else {"role": w.info.role, "alive": w.alive,
                                                            "node": w.info.node_ip, "pid": w.info.pid}
            for w in r.workers}}
        return web.json_response(body)

    async def explain(self, request: web.Request) -> web.Response:
        """What the index knows of a prompt ({"prompt": text or token ids, "cache_salt": optional}):
        leading chunks held per prefill worker, by tier. Nothing is routed."""
        r = self.router
        try:
            body = json.loads(await request.read())
            ids = r.encode_prompt(body["prompt"])
            salt = body.get("cache_salt")
            if salt is not None and not isinstance(salt, str):
                raise TypeError("cache_salt must be a string")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return error_response(400, f"expected {{\"prompt\": text or token ids, \"cache_salt\": optional}}: {e}",
                                  "invalid_request_error")
        except LmdisaggError as e:
            return from_exc(e)
        keys = chunk_keys(ids, r.chunk_tokens, r.namespace, salt_root(salt))
        held = {w.worker_id: {"chunks": m.chunks, "by_tier": m.by_tier, "stale": m.stale}
                for w in r.prefill for m in [r.index.matched_prefix(w.worker_id, keys)]}
        return web.json_response({"prompt_tokens": len(ids), "prompt_chunks": len(keys), "workers": held})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.router.metrics.render(), content_type="text/plain", charset="utf-8")

    # --- generation -------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _parse(self, request: web.Request, chat: bool):
        return await self._parse_as(request, P.ChatCompletionRequest if chat else P.CompletionRequest)

    async def _parse_as(self, request: web.Request, model):
        """The JSON body as the pydantic ``model``: 400 for bad JSON, 413 too large, 422 wrong shape."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLargeError(f"request body over {self.router.config.router.max_body_bytes} bytes") from None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise _Unprocessable(f"{loc}: {first['msg']}", loc.split(".")[0] if loc else None) from None

    def _requests(self, body, chat: bool, plan=None) -> list[tuple[int, GenerateRequest]]:
        r = self.router
        if body.model != r.model_name:
            raise ModelNotFoundError(f"model {body.model!r} is not served here; try {r.model_name!r}", param="model")
        body.check_supported()
        structured = body.structured()
        if plan is not None and plan.structured is not None:  # a forced call: constrained to the tools' schemas
            if structured is not None:
                raise InvalidRequestError("a forced tool call and a structured-output constraint cannot be combined",
                                          param="tool_choice")
            structured = plan.structured
        if chat:
            prompts = [r.encode_chat(body.template_messages(), tools=body.tool_defs(), **body.template_options())]
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        else:
            prompts = [r.encode_prompt(p) for p in body.prompts()]
            max_tokens = body.max_tokens if body.max_tokens is not None else 16
        prompts = [body.truncate(ids, r.max_model_len - (max_tokens or 1)) for ids in prompts]
        logprobs = body.logprob_count()
        prompt_logprobs = None if chat else body.prompt_logprob_count()
        processing = body.processing()
        if plan is not None and plan.mode == "auto" and plan.parser.keep_special:
            processing["skip_special_tokens"] = False  # the call's marker is a special token
        out = []
        base = uuid.uuid4().hex
        for pi, ids in enumerate(prompts):
            mt = max_tokens if max_tokens is not None else max(1, r.max_model_len - len(ids))
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                params = SamplingParams(
                    max_tokens=mt, temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, seed=seed, stop=body.stop_list(),
                    stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                    logprobs=logprobs, prompt_logprobs=prompt_logprobs, structured=structured, **processing)
                r.check(ids, params, compile=False)  # compiled once, in a thread, by _generate
                out.append((pi * body.n + i, GenerateRequest(f"{base}-{pi}-{i}", ids, params)))
        return out

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        r = self.router
        endpoint = "chat" if chat else "completions"
        arrival = time.perf_counter()
        try:
            body = await self._parse(request, chat)
            plan = body.tool_plan(r.tool_parser) if chat else None
            reqs = self._requests(body, chat, plan)
            await self._admit(reqs)
        except (_Unprocessable, LmdisaggError) as e:
            return self._refuse(e, endpoint)
        # completions' echo: each choice's text starts with its prompt
        echo = {}
        if not chat and body.echo:  # the prompt as sent (token ids: their text)
            prompts = body.prompts()
            echo = {i: p if isinstance(p, str) else self._prompt_text(req)
                    for i, req in reqs for p in [prompts[i // body.n]]}
        rid = ("chatcmpl-" if chat else "cmpl-") + reqs[0][1].request_id.split("-")[0]
        r.in_flight += len(reqs)
        r.metrics.in_flight.set(r.in_flight)
        try:
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                continuous = include_usage and bool(body.stream_options.continuous_usage_stats)
                return await self._stream(request, rid, reqs, chat, include_usage, arrival, endpoint,
                                          bool(body.return_token_ids), echo, plan, body.return_tokens_as_token_ids,
                                          continuous)
            return await self._complete(rid, reqs, chat, arrival, endpoint, bool(body.return_token_ids), echo, plan,
                                        body.return_tokens_as_token_ids)
        finally:
            r.in_flight -= len(reqs)
            r.metrics.in_flight.set(r.in_flight)

    async def _admit(self, reqs) -> None:
        """Before any worker sees the request: its structured-output constraint compiles (in a
        thread), and the router has room for its choices; else the typed error."""
        r = self.router
        structured = reqs[0][1].params.structured
        if structured is not None:
            await r.check_structured(structured)
        if r.in_flight + len(reqs) > r.config.router.max_queued_requests:
            raise OverloadedError(f"{r.in_flight} requests in flight; try again later")

    def _refuse(self, e: Exception, endpoint: str) -> web.Response:
        """The OpenAI error for a request refused before it ran (counted in the metrics)."""
        if isinstance(e, _Unprocessable):
            self.router.metrics.requests.labels(endpoint, "422").inc()
            return error_response(422, e.args[0], "invalid_request_error", e.param)
        self.router.metrics.requests.labels(endpoint, str(e.status)).inc()
        return from_exc(e)

    async def _run_choices(self, reqs, arrival: float):
        """Merge the deltas of every choice: yields (index, delta)."""
        q: asyncio.Queue = asyncio.Queue()
        m = self.router.metrics

        async def one(index: int, req: GenerateRequest):
            last = None
            try:
                async for delta in self.router.stream(req):
                    now = time.perf_counter()
                    m.itl.observe(now - last) if last is not None else m.ttft.observe(now - arrival)
                    last = now
                    await q.put((index, delta))
                await q.put((index, None))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                await q.put((index, e))

        tasks = [asyncio.create_task(one(i, req)) for i, req in reqs]
        try:
            pending = len(tasks)
            while pending:
                index, item = await q.get()
                if item is None:
                    pending -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _record(self, usage: dict, arrival: float) -> None:
        m = self.router.metrics
        m.e2e.observe(time.perf_counter() - arrival)
        m.prompt_tokens.inc(usage["prompt_tokens"])
        m.generation_tokens.inc(usage["completion_tokens"])
        m.cached_tokens.inc(usage["prompt_tokens_details"]["cached_tokens"])

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API over the same path as chat: a message item out, and a
        function_call item per tool call."""
        r = self.router
        arrival = time.perf_counter()
        endpoint = "responses"
        try:
            body = await self._parse_model(request, P.ResponsesRequest)
            body.check_supported()
            tools = body.chat_tools()
            plan = body.tool_plan(r.tool_parser, tools)
            ids = r.encode_chat(body.messages(), tools=[t.model_dump(exclude_none=True) for t in tools] if tools else None)
            structured = body.structured()
            if plan is not None and plan.structured is not None:  # a forced call: constrained to the tools' schemas
                if structured is not None:
                    raise InvalidRequestError("a forced tool call and text.format cannot be combined", param="tool_choice")
                structured = plan.structured
            mt = body.max_output_tokens if body.max_output_tokens is not None else max(1, r.max_model_len - len(ids))
            extra = {"skip_special_tokens": False} if plan is not None and plan.mode == "auto" \
                and plan.parser.keep_special else {}
            params = SamplingParams(max_tokens=mt, temperature=1.0 if body.temperature is None else body.temperature,
                                    top_p=1.0 if body.top_p is None else body.top_p, structured=structured, **extra)
            r.check(ids, params, compile=False)
            base = uuid.uuid4().hex
            reqs = [(0, GenerateRequest(f"{base}-0-0", ids, params))]
            await self._admit(reqs)
        except (_Unprocessable, LmdisaggError) as e:
            return self._refuse(e, endpoint)
        rid, msg_id, created = f"resp_{base}", f"msg_{base}", int(time.time())
        r.in_flight += 1
        r.metrics.in_flight.set(r.in_flight)
        try:
            if body.stream:
                return await self._responses_stream(request, rid, msg_id, created, body, plan, reqs, arrival, endpoint)
            text, finish, last = "", None, {}
            try:
                async for _, d in self._run_choices(reqs, arrival):
                    text += d.text
                    finish = d.finish_reason if d.finished else finish
                    last[0] = d
            except LmdisaggError as e:
                r.metrics.requests.labels(endpoint, str(e.status)).inc()
                return from_exc(e)
            use = self._usage(reqs, last)
            self._record(use, arrival)
            r.metrics.requests.labels(endpoint, "200").inc()
            content, calls, _ = plan.answer(text, finish, call_id) if plan is not None else (text, None, finish)
            output = P.response_output(msg_id, content, calls, finish)
            return web.json_response(P.response_object(rid, r.model_name, body, created, output, finish, use))
        finally:
            r.in_flight -= 1
            r.metrics.in_flight.set(r.in_flight)

    async def _responses_stream(self, request, rid, msg_id, created, body, plan, reqs, arrival, endpoint):
        """The Responses API's typed events: created, in_progress, then for the message
        output_item.added, content_part.added, output_text.delta ..., output_text.done,
        content_part.done, output_item.done; for each tool call output_item.added,
        function_call_arguments.delta, .done, output_item.done; then completed (or incomplete);
        an error event if the request fails. Without tools the message opens at once (its text
        may be empty); with tools it opens at the first text that is not a call (for "auto",
        streamed as it comes), and the calls follow when the answer has ended."""
        r = self.router
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        seq = iter(range(1 << 62))

        async def event(kind: str, **fields) -> None:
            data = {"type": kind, "sequence_number": next(seq), **fields}
            await resp.write(f"event: {kind}\ndata: ".encode() + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")

        where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        opened = False

        async def say(piece: str) -> None:
            nonlocal opened
            if not opened:
                opened = True
                await event("response.output_item.added", output_index=0, item={
                    "type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []})
                await event("response.content_part.added", **where,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            if piece:
                await event("response.output_text.delta", **where, delta=piece, logprobs=[])

        text, shown, finish, last = "", "", None, {}
        ts = plan.stream() if plan is not None and plan.mode == "auto" else None
        try:
            pending = P.response_object(rid, r.model_name, body, created, [], None, None)
            await event("response.created", response=pending)
            await event("response.in_progress", response=pending)
            if plan is None:
                await say("")
            async for _, d in self._run_choices(reqs, arrival):
                last[0] = d
                finish = d.finish_reason if d.finished else finish
                text += d.text
                piece = d.text if plan is None else (ts.feed(d.text) if ts is not None else "")
                if piece:
                    shown += piece
                    await say(piece)
            use = self._usage(reqs, last)
            content, calls, _ = plan.answer(text, finish, call_id) if plan is not None else (text, None, finish)
            if content and len(content) > len(shown):  # what was held back (or all of it, for forced calls)
                await say(content[len(shown):])
            output = P.response_output(msg_id, content if opened else None, calls, finish)
            final = P.response_object(rid, r.model_name, body, created, output, finish, use)
            k = 0
            if opened:
                part = final["output"][0]["content"][0]
                await event("response.output_text.done", **where, text=part["text"], logprobs=[])
                await event("response.content_part.done", **where, part=part)
                await event("response.output_item.done", output_index=0, item=final["output"][0])
                k = 1
            for i, item in enumerate(final["output"][k:], start=k):
                await event("response.output_item.added", output_index=i, item={**item, "arguments": "",
                                                                               "status": "in_progress"})
                await event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                            delta=item["arguments"])
                await event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                            arguments=item["arguments"])
                await event("response.output_item.done", output_index=i, item=item)
            await event("response.completed" if final["status"] == "completed" else "response.incomplete",
                        response=final)
            self._record(use, arrival)
            r.metrics.requests.labels(endpoint, "200").inc()
        except LmdisaggError as e:
            r.metrics.requests.labels(endpoint, str(e.status)).inc()
            await event("error", code=e.type, message=e.message, param=e.param)
        except (ConnectionResetError, asyncio.CancelledError):
            r.metrics.requests.labels(endpoint, "499").inc()
            raise
        await resp.write_eof()
        return resp

    async def _complete(self, rid, reqs, chat, arrival, endpoint, return_ids: bool = False,
                        echo: dict | None = None, plan=None, as_ids: bool = False) -> web.Response:
        m = self.router.metrics
        texts = {i: (echo or {}).get(i, "") for i, _ in reqs}
        prompt_of = dict(reqs)
        token_ids: dict[int, list[int]] = {i: [] for i, _ in reqs}
        entries: dict[int, list] = {i: [] for i, _ in reqs}
        finish = {i: None for i, _ in reqs}
        last = {}
        try:
            async for i, d in self._run_choices(reqs, arrival):
                texts[i] += d.text
                token_ids[i] += d.token_ids
                entries[i] += self._prompt_entries(prompt_of[i], d, as_ids) + self._logprob_entries(d, as_ids)
                if d.finished:
                    finish[i] = d.finish_reason
                last[i] = d
        except LmdisaggError as e:
            m.requests.labels(endpoint, str(e.status)).inc()
            return from_exc(e)
        use = self._usage(reqs, last)
        self._record(use, arrival)
        m.requests.labels(endpoint, "200").inc()
        want = reqs[0][1].params.logprobs is not None
        choices = [{"index": i, "text": texts[i], "finish_reason": finish[i],
                    "logprobs": P.logprobs_object(entries[i], chat) if want else None} for i in sorted(texts)]
        if plan is not None:
            for c in choices:
                c["content"], c["tool_calls"], c["finish_reason"] = plan.answer(c["text"], c["finish_reason"], call_id)
        resp = P.completion_response(rid, self.router.model_name, choices, use, chat)
        if return_ids:  # vLLM's return_token_ids extension
            for c in resp["choices"]:
                c["token_ids"] = token_ids[c["index"]]
        return web.json_response(resp)

    def _prompt_text(self, req: GenerateRequest) -> str:
        tok = self.router.tokenizer
        return tok.decode(req.prompt_token_ids) if tok is not None else ""

    def _prompt_entries(self, req: GenerateRequest, d, as_ids: bool = False) -> list:
        """An echoed prompt's logprobs, from the delta that carries them (the first): its first
        token has none."""
        if not d.prompt_logprobs:
            return []
        ids = list(req.prompt_token_ids)
        rest = d.prompt_logprobs[1:]
        texts = self._texts(ids + [a for _, top in rest for a, _ in top], as_ids)
        return [(texts[ids[0]], None, None)] + [(texts[t], lp, [(texts[a], alp) for a, alp in top])
                                                for t, (lp, top) in zip(ids[1:], rest)]

    def _texts(self, ids: list[int], as_ids: bool = False) -> dict[int, str]:
        """Tokens named as logprobs name them: their text, or "token_id:N" (vLLM's
        return_tokens_as_token_ids; also for a model without a tokenizer)."""
        tok = self.router.tokenizer
        if tok is None or as_ids:
            return {t: f"token_id:{t}" for t in ids}
        return dict(zip(ids, tok.token_texts(ids)))

    def _logprob_entries(self, d, as_ids: bool = False) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """A delta's logprobs with each token as text: (token, logprob, [(alternative, logprob)])."""
        if not d.logprobs:
            return []
        text = self._texts(list(d.token_ids) + [a for _, top in d.logprobs for a, _ in top], as_ids)
        return [(text[t], lp, [(text[a], alp) for a, alp in top]) for t, (lp, top) in zip(d.token_ids, d.logprobs)]

    @staticmethod
    def _usage(reqs, last: dict) -> dict:
        """OpenAI counts each prompt once however many choices (n) it has."""
        prompt = cached = completion = 0
        for i, req in reqs:
            d = last.get(i)
            if i % req_n(reqs) == 0:
                prompt += len(req.prompt_token_ids)
                cached += d.cached_tokens if d else 0
            completion += d.completion_tokens if d else 0
        return P.usage(prompt, completion, cached)

    async def _stream(self, request, rid, reqs, chat, include_usage, arrival, endpoint,
                      return_ids: bool = False, echo: dict | None = None, plan=None,
                      as_ids: bool = False, continuous: bool = False) -> web.StreamResponse:
        """SSE chunks of every choice; ``continuous`` (vLLM's stream_options.continuous_usage_stats):
        each chunk also carries the usage so far."""
        m = self.router.metrics
        model = self.router.model_name
        created = int(time.time())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        last = {}

        async def send(obj) -> None:
            if continuous and obj.get("choices"):
                obj["usage"] = self._usage(reqs, last)
            await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

        want = reqs[0][1].params.logprobs is not None
        offset = {i: 0 for i, _ in reqs}  # completions' text_offset: characters of token text sent
        tool_state = {}  # tool calls, per choice: the text until the calls are complete, or a ToolStream (auto)
        try:
            prompt_of = dict(reqs)
            async for i, d in self._run_choices(reqs, arrival):
                # a choice's role chunk goes out with its first token, as vLLM's does: benchmark
                # clients (vllm bench serve, ...) take the first chunk as the first token
                if chat and i not in last:
                    await send(P.stream_chunk(rid, model, i, "", None, chat, role=True, created=created))
                if echo and i not in last:  # the echoed prompt first, with its logprobs if asked
                    chunk = P.stream_chunk(rid, model, i, echo[i], None, chat, created=created)
                    if want:
                        entries = self._prompt_entries(prompt_of[i], d, as_ids)
                        chunk["choices"][0]["logprobs"] = P.logprobs_object(entries, chat)
                        offset[i] = sum(len(t) for t, _, _ in entries)
                    await send(chunk)
                if plan is not None:  # tool calls: streamed as OpenAI's delta.tool_calls
                    first = i not in last
                    last[i] = d
                    await self._stream_tool(send, rid, model, created, plan, i, d, first, tool_state)
                    continue
                last[i] = d
                # a chunk per step that made text, or tokens whose ids or logprobs were asked for
                # (a token can make no text yet: part of a UTF-8 character or of a stop string)
                if d.text or ((return_ids or want) and d.token_ids):
                    chunk = P.stream_chunk(rid, model, i, d.text, None, chat, created=created)
                    if return_ids:
                        chunk["choices"][0]["token_ids"] = d.token_ids
                    if want:
                        entries = self._logprob_entries(d, as_ids)
                        chunk["choices"][0]["logprobs"] = P.logprobs_object(entries, chat, offset[i])
                        offset[i] += sum(len(t) for t, _, _ in entries)
                    await send(chunk)
                if d.finished:
                    await send(P.stream_chunk(rid, model, i, None if chat else "", d.finish_reason, chat,
                                              created=created))
            use = self._usage(reqs, last)
            if include_usage:
                await send(P.usage_chunk(rid, model, use, chat, created=created))
            self._record(use, arrival)
            m.requests.labels(endpoint, "200").inc()
        except LmdisaggError as e:
            m.requests.labels(endpoint, str(e.status)).inc()
            await send(e.to_openai())
        except (ConnectionResetError, asyncio.CancelledError):
            m.requests.labels(endpoint, "499").inc()
            raise
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @staticmethod
    async def _stream_tool(send, rid, model, created, plan, i: int, d, first: bool, state: dict) -> None:
        """A named function's arguments stream as they are made (the first delta carries its id and
        name); "required" calls are sent whole once the array is complete (its items' names are
        only known then), or as content if max_tokens cut it short; "auto" streams the content
        the model writes before any call, and each call whole once the text has ended."""
        if plan.mode == "named":
            if first or d.text:
                call = {"index": 0, "function": {"arguments": d.text}}
                if first:
                    call = {"index": 0, **P.tool_call(call_id(), plan.name, d.text)}
                await send(P.tool_chunk(rid, model, i, [call], created))
            if d.finished:
                await send(P.stream_chunk(rid, model, i, None, d.finish_reason, True, created=created))
            return
        if plan.mode == "auto":
            if i not in state:
                state[i] = plan.stream()
            ts = state[i]
            content = ts.feed(d.text)
            calls = []
            if d.finished:
                rest, calls = ts.finish()
                content += rest
            if content:
                await send(P.stream_chunk(rid, model, i, content, None, True, created=created))
            if not d.finished:
                return
            calls, reason = plan.wrap(calls, call_id), P.tool_finish(calls, d.finish_reason)
        else:
            state[i] = state.get(i, "") + d.text
            if not d.finished:
                return
            calls, reason = plan.calls(state[i], d.finish_reason, call_id)
            if not calls:
                await send(P.stream_chunk(rid, model, i, state[i], None, True, created=created))
        if calls:
            await send(P.tool_chunk(rid, model, i, [{"index": k, **c} for k, c in enumerate(calls)], created))
        await send(P.stream_chunk(rid, model, i, None, reason, True, created=created))


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def req_n(reqs) -> int:
    """Choices per prompt: request ids end in -<prompt index>-<choice index>."""
    return 1 + max(int(req.request_id.rsplit("-", 1)[1]) for _, req in reqs)


class _Unprocessable(Exception):
    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


async def start_site(server: OpenAIServer, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (call ``cleanup()``) and the bound port."""
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # the real port when port=0
    return runner, bound
