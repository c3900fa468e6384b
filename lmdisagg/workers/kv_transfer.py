"""The workers' view of a transport (``lmdisagg.transports``): move whole KV blocks between two
engines' caches.

    source (prefill):  KVTransfer.create(settings) → engine built with ``allocator`` (the medium may
                       own the cache memory) → register(kv_buffer) once → describe(block_ids)
    destination:       same creation and registration → pull(desc, src_indices, dst_block_ids, timeout)

``pull`` blocks (workers call it from a thread, never the engine's) and either completes or
raises TransferError within ``timeout``; on failure the destination blocks are no longer written.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from lmdisagg.transports import ChunkDesc, TransferError, create_transport

__all__ = ["KVTransfer", "TransferError"]


class KVTransfer:
    def __init__(self, settings: dict, worker_id: str):
        self.name = settings.get("name", "shm")
        opts = {"checksum": bool(settings.get("checksum", False))}
        if self.name == "mooncake":
            opts["protocol"] = settings.get("protocol", "tcp")
        elif self.name in ("cuda_ipc", "nccl"):
            opts["runtime"] = settings.get("runtime", "auto")  # launches through cupy or torch
        elif self.name == "fake":
            opts.update(settings.get("fake") or {})
        self.transport = create_transport(self.name, **opts)
        self.worker_id = worker_id
        self.buffer = None
        self.block_nbytes = 0
        self._stream = None  # CUDA caches: the idle stream pulls are made from

    @classmethod
    def create(cls, settings: dict, worker_id: str) -> "KVTransfer":
        return cls(settings, worker_id)

    @property
    def allocator(self):
        """``Engine(kv_allocator=...)``: the cache lives in memory this medium moves best."""
        return self.transport.allocate

    def register(self, kv_buffer: torch.Tensor) -> None:
        self.buffer = self.transport.register(kv_buffer)
        if kv_buffer.is_cuda:
            self._stream = torch.cuda.Stream(kv_buffer.device)
        self.block_nbytes = kv_buffer[0].numel() * kv_buffer.element_size()

    def describe(self, block_ids: list[int]) -> ChunkDesc:
        return self.transport.describe(self.buffer, block_ids, self.block_nbytes)

    def pull(self, desc: ChunkDesc, src_indices: list[int], dst_block_ids: list[int], timeout: float) -> float:
        """Copy blocks ``desc.block_ids[i] for i in src_indices`` into ``dst_block_ids``; return
        the seconds the transport took (from ``pull`` to the end of ``wait``). The blocks were
        claimed between engine steps and no queued GPU work touches them, so on CUDA the pull
        is made from an idle stream of ours: the copy need not wait for the engine's steps."""
        sub = replace(desc, block_ids=tuple(desc.block_ids[i] for i in src_indices),
                      checksums=tuple(desc.checksums[i] for i in src_indices) if desc.checksums else ())
        t0 = time.perf_counter()
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                x = self.transport.pull(sub, self.buffer, dst_block_ids)
        else:
            x = self.transport.pull(sub, self.buffer, dst_block_ids)
        x.wait(timeout)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.transport.close()
