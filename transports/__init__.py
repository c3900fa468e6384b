"""KV transports: move chunks of registered buffers between workers (see base.py).

    from lmdisagg.transports import create_transport
    tx = create_transport("shm")          # "shm" | "cuda_ipc" | "nccl" | "mooncake" | "fake"

Importing this package loads no torch, CUDA, NCCL or RDMA library; a transport's module is
imported when it is created.
"""
from lmdisagg.transports.base import (
    Buffer, BufferDesc, ChunkDesc, PeerLostError, PushTicket, Transfer, TransferAbortedError,
    TransferCorruptError, TransferError, TransferState, TransferTimeoutError, Transport,
)
from lmdisagg.transports.registry import TRANSPORTS, available_transports, create_transport, transport_class

__all__ = [
    "Buffer", "BufferDesc", "ChunkDesc", "PeerLostError", "PushTicket", "Transfer", "TransferAbortedError",
    "TransferCorruptError", "TransferError", "TransferState", "TransferTimeoutError", "Transport",
    "TRANSPORTS", "available_transports", "create_transport", "transport_class",
]
