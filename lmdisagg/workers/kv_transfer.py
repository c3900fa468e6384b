"""The workers' view of a transport (``lmdisagg.transports``): move whole KV blocks between two
engines' caches.

    source (prefill):  KVTransfer.create(settings) → engine built with ``allocator`` (the medium may
                       own the cache memory) → register(kv_buffer) once → describe(block_ids)
    destination:       same creation and registration → pull(desc, src_indices, dst_block_ids, timeout)

With ``push`` set (nccl), the destination instead reserves blocks before the prompt is prefilled
and ``expect``s them (its receives posted), and the source ``push``es its blocks once computed.

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
    def __init__(self, settings: dict, worker_id: str, expect_s: float = 330.0):
        """``expect_s``: the longest a pushed prompt may take to come (its prefill's queue and
        compute, then the transfer); a gloo receive posted for it must not time out sooner."""
        self.name = settings.get("name", "shm")
        self.push_enabled = bool(settings.get("push", False))
        opts = {"checksum": bool(settings.get("checksum", False))}
        if self.name == "mooncake":
            opts["protocol"] = settings.get("protocol", "tcp")
        elif self.name in ("cuda_ipc", "nccl"):
            opts["runtime"] = settings.get("runtime", "auto")  # launches through cupy or torch
            if self.name == "nccl" and self.push_enabled:
                opts["op_timeout_s"] = max(30.0, expect_s)
            if self.name == "nccl":
                opts["register_memory"] = settings.get("register_memory")
        elif self.name == "fake":
            opts.update(settings.get("fake") or {})
        self.transport = create_transport(self.name, **opts)
        if self.push_enabled and not self.transport.supports_push:
            self.transport.close()
            raise TransferError(f"transport.push is set, but {self.name} cannot push here: "
                                f"{self.transport.why_no_push}")
        self.worker_id = worker_id
        self.buffer = None
        self.block_nbytes = 0
        self._stream = None  # CUDA caches: the idle stream pulls (expectations, pushes) are made from

    @classmethod
    def create(cls, settings: dict, worker_id: str, expect_s: float = 330.0) -> "KVTransfer":
        return cls(settings, worker_id, expect_s)

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

    def expect(self, source, dst_block_ids: list[int]):
        """Post receives for blocks that ``source`` (the prefill worker's buffer descriptor) will
        push; returns the transfer (its ``ticket`` goes to the source). From our idle stream on
        CUDA, as pulls are made."""
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                return self.transport.expect(source, self.buffer, dst_block_ids, self.block_nbytes)
        return self.transport.expect(source, self.buffer, dst_block_ids, self.block_nbytes)

    def push(self, ticket: bytes, block_ids: list[int]):
        """Send our blocks into a destination's expectation; returns the source's transfer. The
        blocks were written by a prefill whose result the host has seen (and ``describe`` synced
        the device), so on CUDA the sends go from our idle stream, behind no engine step."""
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                return self.transport.push(ticket, self.buffer, block_ids)
        return self.transport.push(ticket, self.buffer, block_ids)

    def close(self) -> None:
        self.transport.close()
