"""The Python API: define a deployment without YAML, run it, talk to it, tear it down.

    from lmdisagg import Pipeline, Role
    pipe = Pipeline(model="smollm2-135m", prefill=Role(replicas=1), decode=Role(replicas=1),
                    transport="shm").start()
    print(pipe.url)                                   # the OpenAI endpoint, http://127.0.0.1:PORT/v1
    out = pipe.generate("The capital of France is", max_tokens=16)   # Completion(text, token_ids, ...)
    for delta in pipe.stream("Tell me a story", max_tokens=32): print(delta.text, end="")
    pipe.shutdown()                                   # stops the router, kills every actor

``Pipeline.from_config(ClusterConfig.from_yaml(path))`` runs a YAML deployment the same way, and
``lmdisagg serve`` is this class plus signal handling.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

from lmdisagg.config import ClusterConfig, RoleSettings, TransportSettings
from lmdisagg.kv.store.config import StoreConfig
from lmdisagg.engine import EngineConfig, SamplingParams
from lmdisagg.errors import LmdisaggError, UnavailableError
from lmdisagg.workers.messages import GenerateRequest, TokenDelta

log = logging.getLogger(__name__)

Role = RoleSettings


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    logprobs: list | None = None  # per token, with logprobs=k (lmdisagg.engine.request.TokenLogprob)


def ensure_ray(cfg: ClusterConfig) -> bool:
    """Join the cluster named by config/RAY_ADDRESS (set inside ``ray job submit``), or start a
    local one bound to 127.0.0.1. True if this call started a local cluster."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:
        # every Ray process of a local cluster on 127.0.0.1: Ray reads this when it is imported
        # (its agents would otherwise listen on the machine's external address too)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=True)
        return False
    # ray was imported before the variable was set (by the caller, or deploy_workers): correct the
    # constant Ray read then (a private module; without it, the cluster would not stay on loopback)
    from ray._private import ray_constants
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and getattr(ray_constants, "ENABLE_RAY_CLUSTER", False):
        ray_constants.ENABLE_RAY_CLUSTER = False
    roles = [cfg.workers] if cfg.mode == "colocated" else [cfg.prefill, cfg.decode]
    need = sum(r.replicas * r.num_cpus for r in roles)
    # a call whose worker's connection broke fails after lost_worker_wait_ms unless Ray confirms
    # the death sooner (Ray waits 1 s by default; KubeRay sets 0 for Ray Serve clusters)
    ray.init(namespace=cfg.ray.namespace, include_dashboard=False, _node_ip_address="127.0.0.1",
             num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), log_to_driver=True,
             _system_config={"timeout_ms_task_wait_for_death_info": cfg.ray.lost_worker_wait_ms})
    return True


def _engine_config(cfg: ClusterConfig, role: RoleSettings) -> EngineConfig:
    e = cfg.engine
    return EngineConfig(model=cfg.model, device=role.device or e.device, dtype=e.dtype, chunk_tokens=e.chunk_tokens,
                        num_blocks=e.num_blocks, kv_cache_bytes=e.kv_cache_bytes, max_model_len=e.max_model_len,
                        max_num_seqs=e.max_num_seqs, cuda_graphs=e.cuda_graphs)


class Pipeline:
    def __init__(self, model: str = "smollm2-135m", *, prefill: RoleSettings | None = None,
                 decode: RoleSettings | None = None, colocated: RoleSettings | None = None,
                 transport: str | TransportSettings = "shm", policy: str = "round_robin",
                 host: str = "127.0.0.1", port: int = 0, store: "StoreConfig | dict | None" = None,
                 tool_call_parser: str | None = None, chat_template: str | None = None, **engine):
        """Disaggregated when ``prefill``/``decode`` are given (default 1 + 1), colocated when
        ``colocated`` is. ``engine`` holds EngineSettings fields (device, dtype, chunk_tokens, ...);
        ``store`` a StoreConfig (tiered KV store: cpu_bytes, disk_path/disk_bytes, remote_url);
        ``tool_call_parser`` how the router reads tool_choice "auto" calls, ``chat_template`` a
        template (file or text) instead of the model's (RouterSettings)."""
        t = TransportSettings(name=transport) if isinstance(transport, str) else transport
        data = {"model": model, "transport": t.model_dump(), "engine": engine,
                "router": {"host": host, "port": port, "policy": policy, "tool_call_parser": tool_call_parser,
                           "chat_template": chat_template}}
        if store is not None:
            data["store"] = store if isinstance(store, dict) else store.model_dump()
        if colocated is not None:
            data.update(mode="colocated", workers=colocated.model_dump())
        else:
            data.update(mode="disaggregated", prefill=(prefill or Role()).model_dump(),
                        decode=(decode or Role()).model_dump())
        self.config = ClusterConfig.model_validate(data)
        self._init()

    @classmethod
    def from_config(cls, config: ClusterConfig) -> "Pipeline":
        self = cls.__new__(cls)
        self.config = config
        self._init()
        return self

    def _init(self) -> None:
        self.actors: list = []
        self._actor_names: list[str] = []  # their Ray names: shutdown() returns once they are gone
        self.router = None
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._owns_ray = False  # deploy_workers started a local Ray cluster: shutdown stops it

    # --- deploy -------------------------------------------------------------------------------
    def deploy_workers(self):
        """Create the worker actors and wait until each has loaded the model; returns WorkerRefs."""
        import ray
        from lmdisagg.router.router import WorkerRef
        from lmdisagg.workers.worker import DecodeWorker, PrefillWorker, Worker
        cfg = self.config
        self._owns_ray = ensure_ray(cfg) or self._owns_ray
        tag = uuid.uuid4().hex[:6]
        plan = ([("both", Worker, cfg.workers)] if cfg.mode == "colocated"
                else [("prefill", PrefillWorker, cfg.prefill), ("decode", DecodeWorker, cfg.decode)])
        transport = cfg.transport.model_dump()
        timeouts = {"first_token_s": cfg.router.first_token_timeout_s, "token_s": cfg.router.token_timeout_s,
                    "transfer_s": cfg.transport.timeout_s}
        for role, cls, rs in plan:
            for i in range(rs.replicas):
                wid = f"{role}-{i}"
                # GPU actors see every GPU of their node (peers open each other's memory over CUDA
                # IPC / NCCL); each uses the one Ray assigned it (workers/worker.py)
                env = ({"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
                       if rs.num_gpus > 0 else None)
                self._actor_names.append(f"lmdisagg-{tag}-{wid}")
                actor_cls = ray.remote(cls).options(
                    name=self._actor_names[-1], namespace=cfg.ray.namespace, num_cpus=rs.num_cpus,
                    num_gpus=rs.num_gpus, resources=dict(rs.resources) or None, max_concurrency=1000,
                    max_restarts=cfg.ray.max_restarts, runtime_env=env)
                self.actors.append(actor_cls.remote(wid, _engine_config(cfg, rs), transport, timeouts,
                                                    max(1, int(rs.num_cpus)), cfg.store.model_dump()))
        log.info("starting %d workers (loading %s) ...", len(self.actors), cfg.model)
        try:
            infos = ray.get([a.info.remote() for a in self.actors], timeout=cfg.ray.worker_start_timeout_s)
        except Exception as e:
            self.shutdown()
            cause = getattr(e, "cause", None)
            if isinstance(cause, LmdisaggError):
                raise cause from None
            raise UnavailableError(f"workers failed to start: {e}") from e
        return [WorkerRef(info, a) for info, a in zip(infos, self.actors)]

    def start(self) -> "Pipeline":
        """Deploy workers and serve the OpenAI API from a background thread; returns self."""
        workers = self.deploy_workers()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        err: list[BaseException] = []

        def run():
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._serve(workers))
            except BaseException as e:  # noqa: BLE001
                err.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="lmdisagg-router", daemon=True)
        self._thread.start()
        if not ready.wait(120) or err:
            self.shutdown()
            raise UnavailableError(f"router failed to start: {err[0] if err else 'timeout'}")
        return self

    async def _serve(self, workers) -> None:
        from lmdisagg.router.router import Router
        from lmdisagg.router.server import OpenAIServer, start_site
        self.router = Router(self.config, workers, self._tokenizer())
        server = OpenAIServer(self.router)
        rc = self.config.router
        self._runner, port = await start_site(server, rc.host, rc.port)
        self.url = f"http://{rc.host}:{port}/v1"
        log.info("OpenAI API at %s (model %r, %s, %d workers)", self.url, self.router.model_name,
                 self.config.mode, len(workers))

    def _tokenizer(self):
        from lmdisagg.engine.loader import Tokenizer
        from lmdisagg.models import resolve_model
        src = resolve_model(self.config.model)
        return Tokenizer(src.path, src.config) if src.path is not None else None

    # --- use ----------------------------------------------------------------------------------
    def _call(self, coro, timeout: float | None = None):
        if self._loop is None:
            raise UnavailableError("pipeline is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _request(self, prompt, chat: bool, params: dict) -> GenerateRequest:
        r = self.router
        ids = r.encode_chat(prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
                            else [{"role": "user", "content": prompt}]) if chat else r.encode_prompt(prompt)
        sp = SamplingParams(**{"max_tokens": 16, **params})
        if isinstance(sp.stop, str):
            sp = SamplingParams(**{**sp.__dict__, "stop": (sp.stop,)})
        r.check(ids, sp)
        return GenerateRequest(f"py-{uuid.uuid4().hex}", ids, sp)

    def stream(self, prompt, *, chat: bool = False, timeout: float = 600.0, **params):
        """Yield TokenDelta objects as they are generated (same path as the HTTP API)."""
        req = self._request(prompt, chat, params)
        q: "queue.Queue" = __import__("queue").Queue()

        async def pump():
            try:
                async for d in self.router.stream(req):
                    q.put(d)
                q.put(None)
            except BaseException as e:  # noqa: BLE001
                q.put(e)

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        deadline = time.monotonic() + timeout
        try:
            while True:
                item = q.get(timeout=max(0.0, deadline - time.monotonic()))
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            fut.cancel()

    def generate(self, prompt, *, chat: bool = False, timeout: float = 600.0, **params) -> Completion:
        """Run one prompt (text, token ids, or with chat=True a message list) to completion."""
        text, ids, lps, last = "", [], None, None
        for d in self.stream(prompt, chat=chat, timeout=timeout, **params):
            text += d.text
            ids += d.token_ids
            if d.logprobs is not None:
                lps = (lps or []) + d.logprobs
            last = d
        return Completion(text, ids, last.finish_reason, last.prompt_tokens, last.cached_tokens,
                          last.completion_tokens, lps)

    def worker_stats(self) -> dict:
        """Each worker's load and counters, by worker id."""
        import ray
        return {s.worker_id: s for s in ray.get([a.load.remote() for a in self.actors], timeout=30)}

    # --- teardown -----------------------------------------------------------------------------
    def shutdown(self) -> None:
        import ray
        if self._loop is not None and self._runner is not None:
            try:
                self._call(self._runner.cleanup(), timeout=30)
            except Exception:  # noqa: BLE001
                log.exception("router cleanup failed")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop = None
        for a in self.actors:
            try:
                ray.get(a.shutdown.remote(), timeout=15)
            except Exception:  # noqa: BLE001 - killed below anyway
                pass
            ray.kill(a, no_restart=True)
        self.actors.clear()
        # ray.kill returns before the GCS has the actors dead: wait until their names are free
        names, self._actor_names = set(self._actor_names), []
        deadline = time.monotonic() + 15
        while names and ray.is_initialized():
            try:
                left = names & {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
            except Exception as e:  # noqa: BLE001 - the cluster is gone: nothing left to wait for
                log.warning("could not list the cluster's actors after shutdown: %r", e)
                break
            if not left:
                break
            if time.monotonic() > deadline:
                log.warning("workers %s were still registered 15 s after they were killed", sorted(left))
                break
            time.sleep(0.05)
        if self._owns_ray:  # (left to interpreter exit, Ray's two agent processes outlive it)
            self._owns_ray = False
            ray.shutdown()

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
