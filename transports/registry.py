"""Transport names → ``"module:Class"``, imported on first use.

``import lmdisagg.transports`` loads neither torch nor any CUDA / NCCL / RDMA library: each
transport module is imported only when ``create_transport`` (or ``transport_class``) asks for it.
"""
from __future__ import annotations

import importlib
import importlib.util

TRANSPORTS: dict[str, str] = {
    "shm": "lmdisagg.transports.shm:ShmTransport",            # POSIX shared memory, same node
    "cuda_ipc": "lmdisagg.transports.cuda_ipc:CudaIpcTransport",  # CUDA IPC handles, same node
    "nccl": "lmdisagg.transports.nccl:NcclTransport",         # torch.distributed p2p (NCCL / gloo)
    "mooncake": "lmdisagg.transports.mooncake:MooncakeTransport",  # Mooncake TE (TCP / RDMA)
    "fake": "lmdisagg.transports.fake:FakeTransport",         # shm + latency/bandwidth/failure knobs
}


def transport_class(name: str) -> type:
    try:
        target = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose one of {sorted(TRANSPORTS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def create_transport(name: str, **options):
    """A new transport instance; ``options`` are the keyword arguments of its class."""
    return transport_class(name)(**options)


def available_transports(device: str = "cpu") -> list[str]:
    """Transports that can run here for buffers on ``device`` ("cpu" or "cuda"). Probing
    cuda_ipc / nccl-on-CUDA imports torch; mooncake is only looked up, not loaded."""
    out = ["shm", "fake"]
    if importlib.util.find_spec("mooncake") is not None and device == "cpu":
        out.append("mooncake")
    import torch
    import torch.distributed as dist
    if device == "cpu":
        if dist.is_available() and dist.is_gloo_available():
            out.append("nccl")
    elif torch.cuda.is_available():
        out.append("cuda_ipc")
        if dist.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= 2:
            out.append("nccl")
    return out
