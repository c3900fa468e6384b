"""User-facing configuration: ``ClusterConfig``, loaded from YAML (``cluster_configs/``), built
from Python (``lmdisagg.pipeline``) or the CLI. Every field says what it does; unknown keys are
errors, so a typo in a YAML file never passes silently.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmdisagg.errors import InvalidRequestError
from lmdisagg.kv.store.config import StoreConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSettings(_Strict):
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N' for every worker (a role may override)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = float32 on CPU, bfloat16 on CUDA")
    chunk_tokens: int = Field(256, description="tokens per KV block and per chunk key (power of two)")
    kv_cache_bytes: int | None = Field(None, description="KV pool size per worker in bytes "
                                                         "(default 2 GiB on CPU, 85% of free GPU memory)")
    num_blocks: int | None = Field(None, description="KV pool size in blocks (overrides kv_cache_bytes)")
    max_model_len: int | None = Field(None, description="context length (default: the model's, capped at 32K)")
    max_num_seqs: int = Field(64, description="sequences running at once per worker")
    cuda_graphs: bool = Field(True, description="CUDA: decode steps and prefill steps of up to 512 new tokens "
                                                "replay CUDA graphs captured at start")

    @field_validator("chunk_tokens")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v <= 0 or v & (v - 1):
            raise ValueError("chunk_tokens must be a power of two")
        return v


class RoleSettings(_Strict):
    replicas: int = Field(1, ge=0, description="number of Ray actors of this role")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per actor")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per actor")
    resources: dict[str, float] = Field(default_factory=dict, description="extra Ray resources per actor "
                                        "(e.g. {'node:10.0.0.2': 0.01} to pin to a node)")
    device: str | None = Field(None, description="overrides engine.device for this role")


class FakeTransportSettings(_Strict):
    latency_s: float = Field(0.0, ge=0, description="delay before the first byte of each transfer")
    bandwidth_gbps: float | None = Field(None, gt=0, description="pace transfers to this rate (None: memory speed)")
    fail_prob: float = Field(0.0, ge=0, le=1, description="probability that a transfer fails")
    corrupt_prob: float = Field(0.0, ge=0, le=1, description="probability that a transfer's bytes are damaged")
    seed: int = Field(0, description="seed of the failure draws")


class TransportSettings(_Strict):
    name: Literal["shm", "cuda_ipc", "nccl", "mooncake", "fake"] = Field(
        "shm", description="how KV chunks move from prefill to decode workers")
    checksum: bool = Field(False, description="verify an xxhash per chunk; a mismatch fails the transfer")
    protocol: Literal["tcp", "rdma"] = Field("tcp", description="mooncake only: tcp here, rdma in production")
    runtime: Literal["auto", "cupy", "torch"] = Field(
        "auto", description="cuda_ipc and nccl: launch copies / NCCL calls through cupy (auto: when "
                            "installed) or torch")
    timeout_s: float = Field(30.0, gt=0, description="a transfer not done by then is failed (never a hang)")
    push: bool = Field(False, description="nccl only: the decode worker reserves blocks and posts its receives "
                                          "while the prompt is prefilled, and the prefill worker pushes the KV "
                                          "into them (instead of the decode worker pulling it afterwards)")
    register_memory: bool | None = Field(
        None, description="nccl only: caches in NCCL's registrable memory move zero-copy between workers "
                          "(NCCL >= 2.23 through cupy); unset: where it works, true: required, false: never")
    fake: FakeTransportSettings = Field(default_factory=FakeTransportSettings,
                                        description="fake only: latency, bandwidth and failure knobs")

    @model_validator(mode="after")
    def _push_medium(self) -> "TransportSettings":
        if self.push and self.name != "nccl":
            raise ValueError(f"transport.push needs a two-sided medium (nccl); {self.name!r} is pulled from")
        if self.register_memory is not None and self.name != "nccl":
            raise ValueError(f"transport.register_memory is an nccl option, not one of {self.name!r}")
        return self


class RouterSettings(_Strict):
    host: str = Field("127.0.0.1", description="address the OpenAI endpoint binds")
    port: int = Field(8000, ge=0, le=65535, description="port (0 = pick a free one)")
    policy: str = Field("round_robin", description="placement: round_robin | least_loaded | prefix_tree | cache_aware")
    served_model_name: str | None = Field(None, description="the name clients use (default: the model name)")
    max_queued_requests: int = Field(256, ge=1, description="in-flight requests before answering 429")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(600.0, gt=0, description="end-to-end limit for one request")
    first_token_timeout_s: float = Field(300.0, gt=0, description="limit for prefill (queue + compute)")
    token_timeout_s: float = Field(60.0, gt=0, description="limit between two streamed tokens")
    max_migrations: int = Field(3, ge=0, description="times one request is resumed on other workers after a "
                                                     "worker serving it died (0: fail it with 503)")
    api_key: str | None = Field(None, description="clients must send 'Authorization: Bearer <key>' to /v1/* and "
                                "/debug/* (401 otherwise); unset: the LMDISAGG_API_KEY environment variable, "
                                "else no check")
    tool_call_parser: str | None = Field(None, description="how tool_choice 'auto' reads calls back out of the "
                                         "model's text: hermes | llama3_json | mistral (vLLM's --tool-call-parser); "
                                         "unset: the one the chat template's own call format names, else 'auto' is "
                                         "refused (400)")

    chat_template: str | None = Field(None, description="a Jinja chat template used instead of the model's: a file "
                                      "path (relative to the working directory) or the template itself (vLLM's "
                                      "--chat-template); read once, when the config is loaded")

    @field_validator("chat_template")
    @classmethod
    def _read_template(cls, v: str | None) -> str | None:
        if v is None or "{{" in v or "{%" in v:  # unset, or the template itself
            return v
        try:
            text = Path(v).expanduser().read_text()
        except OSError as e:
            raise ValueError(f"chat_template {v!r} is neither a readable file nor a Jinja template ({e})") from None
        if "{{" not in text and "{%" not in text:
            raise ValueError(f"chat_template file {v!r} holds no Jinja template")
        return text

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, v: str | None) -> str | None:
        from lmdisagg.router.tool_parsers import PARSERS
        if v is not None and v not in PARSERS:
            raise ValueError(f"unknown tool-call parser {v!r}; choose one of {sorted(PARSERS)}")
        return v

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from lmdisagg.router.policy import POLICIES
        if v not in POLICIES:
            raise ValueError(f"unknown placement policy {v!r}; choose one of {sorted(POLICIES)}")
        return v


class RaySettings(_Strict):
    address: str | None = Field(None, description="Ray cluster to join ('auto', 'ray://...'); None = "
                                                  "join the job's cluster or start a local one on 127.0.0.1")
    namespace: str = Field("lmdisagg", description="Ray namespace of the actors")
    worker_start_timeout_s: float = Field(300.0, gt=0, description="limit for loading the model in a worker")
    lost_worker_wait_ms: int = Field(0, ge=0, description="a call to a worker whose connection broke waits this "
                                     "long for Ray to confirm the worker died before it fails (and the router moves "
                                     "the request): Ray's timeout_ms_task_wait_for_death_info, 1000 in Ray, 0 in "
                                     "KubeRay's RayService clusters; set on the local cluster lmdisagg starts (a "
                                     "cluster it joins keeps its own)")
    max_restarts: int = Field(-1, ge=-1, description="times Ray restarts a worker actor whose process died "
                                                     "(-1: every time, 0: never); the router places nothing on "
                                                     "it until it answers again, with empty caches")


class ClusterConfig(_Strict):
    model: str = Field("smollm2-135m", description="known name, dummy shape, or local HF directory")
    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="prefill and decode on separate actors, or both on each actor")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    prefill: RoleSettings = Field(default_factory=RoleSettings, description="prefill actors (disaggregated)")
    decode: RoleSettings = Field(default_factory=RoleSettings, description="decode actors (disaggregated)")
    workers: RoleSettings = Field(default_factory=RoleSettings, description="colocated actors (colocated mode)")
    transport: TransportSettings = Field(default_factory=TransportSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    store: StoreConfig = Field(default_factory=StoreConfig, description="tiered KV store below each prefill "
                               "(or colocated) worker's engine: host memory, local disk, Redis")

    @model_validator(mode="after")
    def _replicas(self) -> "ClusterConfig":
        if self.mode == "disaggregated" and (self.prefill.replicas < 1 or self.decode.replicas < 1):
            raise ValueError("disaggregated mode needs at least one prefill and one decode replica")
        if self.mode == "colocated" and self.workers.replicas < 1:
            raise ValueError("colocated mode needs at least one worker replica")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClusterConfig":
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except OSError as e:
            raise InvalidRequestError(f"cannot read config {p}: {e}") from e
        except yaml.YAMLError as e:
            raise InvalidRequestError(f"config {p} is not valid YAML: {e}") from e
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise InvalidRequestError(f"config {p}: {e}") from e

    def with_overrides(self, **changes) -> "ClusterConfig":
        """A copy with nested fields changed, e.g. ``with_overrides(router={"port": 0})``."""
        data = self.model_dump()
        for k, v in changes.items():
            if isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
        return type(self).model_validate(data)
