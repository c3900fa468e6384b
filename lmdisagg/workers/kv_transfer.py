"""The workers' view of a transport: move whole KV blocks between two engines' caches.

    source (prefill):  register(kv_buffer) once → describe(block_ids) → descriptor in the KVHandle
    destination:       register(kv_buffer) once → pull(descriptor, src_indices, dst_block_ids, timeout)

``pull`` blocks (workers call it from a thread, never the engine's) and either completes or
raises TransferError within ``timeout``.
"""
from __future__ import annotations

from lmdisagg.errors import LmdisaggError


class TransferError(LmdisaggError):
    status = 502
    type = "kv_transfer_error"


class KVTransfer:
    name = "none"
    allocator = None

    @classmethod
    def create(cls, settings: dict, worker_id: str) -> "KVTransfer":
        raise TransferError(f"transport {settings.get('name')!r} is not available yet")
