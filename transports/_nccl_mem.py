"""NCCL user-buffer registration for the nccl transport (cupy runtime, NCCL >= 2.23).

A send and a receive between two GPUs of a node normally pass through NCCL's own staging FIFO:
the sender's kernel writes chunks into it and the receiver's kernel copies them out. When both
ends' buffers are registered with the pair's communicator (``ncclCommRegister``), NCCL maps the
peer's buffer once and copies straight into it (zero-copy). Measured on 2xH200 (NCCL 2.28.9,
one 64 MiB message, its receive posted first, against a peer copy): 0.85 staged, 0.92-0.94
registered; through this transport, a stream-ordered 64 MiB push: 0.85-0.87 staged, 0.94
registered (benchmarks/results/transport_nvidia-h200-x2-{staged,reg}-*.json).

NCCL registers only memory from its VMM allocator (``ncclMemAlloc``; plain ``cudaMalloc``
memory needs ``NCCL_LEGACY_CUDA_REGISTER``, which NCCL documents as unsafe on abort), and it
requires both sides of every send/receive pair to be registered or neither. So:

- ``NcclMemory.allocate`` hands out ncclMemAlloc memory (``NcclTransport.allocate``, which the
  engine's ``kv_allocator`` uses); a pool of it serves staging copies and filler.
- A pair runs registered only if both ends say, when it forms, that every buffer they have
  registered is such memory; then everything either posts on the pair comes from it.
- Memory is registered with a communicator the first time the pair posts from it, and is never
  freed while a communicator may hold it: freeing waits for the transport's ``close`` (after its
  communicators are gone), so a new allocation never reuses the address of a registration;
  memory whose tensor ends after close is freed as it ends.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections import deque

import torch

log = logging.getLogger(__name__)

MIN_VERSION = 22300  # intra-node p2p buffer registration
GRAIN = 2 << 20      # pool segments: powers of two from 2 MiB


@functools.cache
def ub_lib():
    """(libnccl through ctypes, "") if registration can work here, else (None, why not). The
    library is the one cupy's bindings already loaded (one NCCL per process)."""
    try:
        from cupy.cuda import nccl
    except (ImportError, OSError) as e:
        return None, f"cupy's NCCL does not load ({type(e).__name__})"
    if not hasattr(nccl.NcclCommunicator, "comm"):  # a getset descriptor of the Cython class
        return None, "this cupy's NcclCommunicator does not give its NCCL handle (cupy >= 14 does)"
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "/libnccl.so" in line})
    if len(paths) != 1:
        return None, f"{len(paths)} NCCL libraries are loaded ({paths}), not one"
    lib = ctypes.CDLL(paths[0])
    version = ctypes.c_int()
    if lib.ncclGetVersion(ctypes.byref(version)) != 0 or version.value != nccl.get_version():
        return None, f"{paths[0]} is not the NCCL cupy uses"
    if version.value < MIN_VERSION:
        return None, f"NCCL {version.value} registers p2p buffers only from {MIN_VERSION}"
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    lib.ncclMemAlloc.argtypes = [ctypes.POINTER(vp), sz]
    lib.ncclMemFree.argtypes = [vp]
    lib.ncclCommRegister.argtypes = [vp, vp, sz, ctypes.POINTER(vp)]
    lib.ncclCommDeregister.argtypes = [vp, vp]
    lib.ncclCommUserRank.argtypes = lib.ncclCommCount.argtypes = [vp, ctypes.POINTER(ctypes.c_int)]
    return lib, ""


class _Segment:
    """One ncclMemAlloc allocation."""
    __slots__ = ("ptr", "nbytes", "device")

    def __init__(self, ptr: int, nbytes: int, device: int):
        self.ptr, self.nbytes, self.device = ptr, nbytes, device


class _Lease:
    """A torch tensor's view of a segment (``__cuda_array_interface__``); torch keeps this object
    alive as long as the tensor, so its end is the tensor's end."""

    def __init__(self, mem: "NcclMemory", seg: _Segment, pooled: bool):
        self.mem, self.seg, self.pooled = mem, seg, pooled
        self.__cuda_array_interface__ = {"shape": (seg.nbytes,), "typestr": "|u1", "data": (seg.ptr, False),
                                         "version": 3, "stream": None}

    def __del__(self):
        mem = self.mem
        mem._returned.append((self.seg, self.pooled))  # an atomic append: safe from any GC point
        if mem._closed:  # nothing reclaims after close: free it now
            mem._drain_closed()


class NcclMemory:
    """The registrable device memory of one transport: allocations, a reuse pool, and the end of
    both at ``close``."""

    def __init__(self, lib):
        self.lib = lib
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}  # ptr -> segment, every live allocation
        self._free: list[_Segment] = []           # pool segments not lent out
        self._returned: deque = deque()           # (segment, pooled) whose tensor ended
        self._dead: list[_Segment] = []           # allocations whose tensor ended, freed at close
        self._closed = False

    def _alloc(self, nbytes: int, device: int) -> _Segment:
        p = ctypes.c_void_p()
        with torch.cuda.device(device):
            rc = self.lib.ncclMemAlloc(ctypes.byref(p), nbytes)
        if rc != 0 or not p.value:
            raise torch.cuda.OutOfMemoryError(f"ncclMemAlloc of {nbytes} bytes on cuda:{device} failed (NCCL error {rc})")
        seg = _Segment(p.value, nbytes, device)
        with self._lock:
            self._segments[seg.ptr] = seg
        return seg

    def _tensor(self, seg: _Segment, pooled: bool) -> torch.Tensor:
        return torch.as_tensor(_Lease(self, seg, pooled), device=f"cuda:{seg.device}")

    def allocate(self, nbytes: int, device: int) -> torch.Tensor:
        """``nbytes`` of zeroed registrable memory on ``device`` (a flat uint8 tensor)."""
        self._reclaim()
        t = self._tensor(self._alloc(max(nbytes, 1), device), pooled=False)
        return t.zero_()[:nbytes]

    def lend(self, nbytes: int, device: int) -> torch.Tensor:
        """At least ``nbytes`` of registrable scratch (contents undefined) from the pool; it
        returns to the pool when the tensor (and every view of it) is gone."""
        self._reclaim()
        with self._lock:
            fits = [s for s in self._free if s.nbytes >= nbytes and s.device == device]
            seg = min(fits, key=lambda s: s.nbytes) if fits else None
            if seg is not None:
                self._free.remove(seg)
        if seg is None:
            size = GRAIN
            while size < nbytes:
                size *= 2
            seg = self._alloc(size, device)
        return self._tensor(seg, pooled=True)[:nbytes]

    def segment_of(self, t: torch.Tensor) -> _Segment | None:
        """The allocation holding all of ``t`` (a contiguous tensor), or None."""
        ptr = t.data_ptr()
        end = ptr + t.numel() * t.element_size()
        with self._lock:
            for seg in self._segments.values():
                if seg.ptr <= ptr and end <= seg.ptr + seg.nbytes:
                    return seg
        return None

    def _reclaim(self) -> None:
        """Pool segments whose tensor ended go back to the pool; allocations whose tensor ended
        wait for close (a live communicator may still hold their registration), then are freed."""
        while self._returned:
            seg, pooled = self._returned.popleft()
            with self._lock:
                if not self._closed:
                    if pooled:
                        self._free.append(seg)
                    else:  # no live tensor is in it: out of the lookups, kept until close
                        self._segments.pop(seg.ptr, None)
                        self._dead.append(seg)
                    continue
                self._segments.pop(seg.ptr, None)
            self._free_segment(seg)

    def _drain_closed(self) -> None:
        """After close: free what has been returned. Takes no lock (it runs from a tensor's end,
        at any GC point, possibly inside one of this object's critical sections); each returned
        segment is popped, so freed, by exactly one caller."""
        while True:
            try:
                seg, _ = self._returned.popleft()
            except IndexError:
                return
            self._free_segment(seg)

    def _free_segment(self, seg: _Segment) -> None:
        """Free an allocation once the device's queued work is done (work queued on any stream
        may still read the memory of a tensor that has ended)."""
        try:
            with torch.cuda.device(seg.device):
                torch.cuda.synchronize()
                self.lib.ncclMemFree(seg.ptr)
        except Exception as e:  # interpreter shutdown: the driver may be gone already
            log.debug("ncclMemFree: %r", e)

    def close(self) -> None:
        """After the transport's communicators are gone: free the pool and every allocation whose
        tensor has ended; one whose tensor ends later is freed as it ends."""
        with self._lock:
            self._closed = True
            free, self._free, self._dead = self._free + self._dead, [], []
            for seg in free:
                self._segments.pop(seg.ptr, None)
        for seg in free:
            self._free_segment(seg)
        self._drain_closed()


class Registrations:
    """The segments registered with one communicator (registration lasts as long as it)."""

    def __init__(self, lib, comm, rank: int):
        self.lib, self.comm_ptr = lib, ctypes.c_void_p(comm.comm)
        r, n = ctypes.c_int(-1), ctypes.c_int(-1)
        if not self.comm_ptr.value or lib.ncclCommUserRank(self.comm_ptr, ctypes.byref(r)) != 0 or r.value != rank \
                or lib.ncclCommCount(self.comm_ptr, ctypes.byref(n)) != 0 or n.value != 2:
            raise RuntimeError("cupy's communicator handle does not answer as this pair's")
        self._done: dict[int, ctypes.c_void_p] = {}

    def ensure(self, seg: _Segment) -> None:
        """Register ``seg`` with the communicator unless it already is (under the pair's posting
        serialization: NCCL calls on one communicator must not overlap)."""
        if seg.ptr in self._done:
            return
        handle = ctypes.c_void_p()
        rc = self.lib.ncclCommRegister(self.comm_ptr, seg.ptr, seg.nbytes, ctypes.byref(handle))
        if rc != 0:
            raise RuntimeError(f"ncclCommRegister of {seg.nbytes} bytes failed (NCCL error {rc})")
        self._done[seg.ptr] = handle

    def release(self) -> None:
        """Deregister everything (before the communicator is aborted; a peer that is gone
        makes NCCL warn, not fail)."""
        for ptr, handle in list(self._done.items()):
            rc = self.lib.ncclCommDeregister(self.comm_ptr, handle)
            if rc != 0:
                log.debug("ncclCommDeregister of %#x: NCCL error %d", ptr, rc)
        self._done.clear()
