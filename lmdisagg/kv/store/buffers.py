"""Moving chunk bytes between tensors, files and sockets without extra copies.

Every tier sees a chunk as a flat ``uint8 [nbytes]`` tensor. Host-side bytes are exposed to files
and sockets through ``numpy`` views (the buffer protocol), so a disk read lands straight in its
destination and a Redis write sends straight from it. Copies to or from CUDA run on a side stream
owned by the calling I/O thread and are waited for before returning, so a tier's caller may use
(or release) the memory as soon as the call returns, and the engine's compute stream never waits.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

from lmdisagg.kv.store.base import StoreError

_local = threading.local()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8 [nbytes]`` view of a contiguous tensor (no copy)."""
    if not t.is_contiguous():
        raise StoreError("chunk values must be contiguous tensors")
    return t.reshape(-1).view(torch.uint8)


def host_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a CPU tensor's memory (no copy)."""
    return memoryview(as_bytes(t).numpy())


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    s = streams.get(device)
    if s is None:
        s = streams[device] = torch.cuda.Stream(device=device)
    return s


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[:] = src`` as raw bytes (same nbytes), any devices; returns once the copy is done."""
    d, s = as_bytes(dst), as_bytes(src)
    if d.numel() != s.numel():
        raise StoreError(f"chunk of {s.numel()} bytes does not fit a buffer of {d.numel()} bytes")
    cuda = d.device if d.is_cuda else (s.device if s.is_cuda else None)
    if cuda is None:
        d.copy_(s)
        return
    # Engine blocks handed to a tier are either fresh (an import) or full and already computed
    # (an offload, after the step that wrote them returned), so no wait on the compute stream.
    stream = _side_stream(cuda)
    with torch.cuda.stream(stream):
        d.copy_(s, non_blocking=True)
    stream.synchronize()


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A new CPU ``uint8 [nbytes]`` (page-locked when ``pin``, for fast DMA to and from CUDA)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def from_bytes(b: bytes) -> torch.Tensor:
    """A read-only CPU ``uint8`` tensor over ``b`` (no copy; callers must not write to it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable"
        return torch.frombuffer(b, dtype=torch.uint8) if len(b) else torch.empty(0, dtype=torch.uint8)


def to_host(t: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """The bytes of ``t`` on the host: a view if already there, else one copy."""
    b = as_bytes(t)
    if not b.is_cuda:
        return b
    out = host_buffer(b.numel(), pin)
    copy_bytes(out, b)
    return out


def numpy_bytes(t: torch.Tensor) -> np.ndarray:
    return as_bytes(t).numpy()
