"""The engine interface every backend implements (the built-in PyTorch engine; later vLLM
through its KV connector API).

Lifecycle of a request inside an engine::

    add_request(id, token_ids, params)      validated here; typed errors, nothing queued on error
    step() -> [RequestOutput]               called in a loop by one thread (the worker's step loop)
        ... deltas until an output has finished=True
    abort(id)                               any time from the step-loop thread; frees its blocks

KV chunk seam (used by workers and transports; all from the step-loop thread, between steps):

    chunk_keys(token_ids)                   keys of the full chunks of a token sequence
    export_chunks(keys) -> [Tensor]         views of cached chunks, each [L, 2, T, H_kv, D]
    import_chunks(keys, payloads) -> int    copy payloads into free blocks, register them
    pin_chunks(keys) / unpin_chunks(keys)   hold exported blocks while a peer pulls them
    reserve_chunks / commit_chunks          one-sided pulls straight into destination blocks

None of these block on I/O; ``step`` blocks only on compute.
"""
from __future__ import annotations

import abc

import torch

from lmdisagg.engine.request import RequestOutput, SamplingParams
from lmdisagg.kv.keys import ChunkKey
from lmdisagg.kv.layout import KVLayout


class EngineBase(abc.ABC):
    layout: KVLayout

    @abc.abstractmethod
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    @abc.abstractmethod
    def step(self) -> list[RequestOutput]: ...

    @abc.abstractmethod
    def abort(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def has_unfinished(self) -> bool: ...

    @abc.abstractmethod
    def chunk_keys(self, token_ids: list[int]) -> list[ChunkKey]: ...

    @abc.abstractmethod
    def export_chunks(self, keys: list[ChunkKey]) -> list[torch.Tensor]: ...

    @abc.abstractmethod
    def import_chunks(self, keys: list[ChunkKey], payloads: list[torch.Tensor]) -> int: ...
