"""CUDA IPC: one-sided device-to-device pulls between processes of one node, same GPU or across
GPUs (over NVLink / PCIe peer access where the driver has it).

    source: register(kv)   storage._share_cuda_() → an IPC handle of the cudaMalloc block that
                           holds the cache (+ byte offset, device UUID) goes into the BufferDesc
            describe()     syncs the source's current stream: the engine's writes are visible
    dest:   pull()         open the handle once per (peer, buffer) and cache it (a first open
                           costs 0.15-0.22 s; later pulls ~tens of µs), then copy the block runs on
                           a side stream of the destination device (``torch._foreach_copy_``
                           for many runs on one device), record an event
            poll()         event.query(); then liveness + checksums → DONE

Devices are matched by UUID, so workers may see GPUs under different indices
(CUDA_VISIBLE_DEVICES per actor); the source's GPU must be visible to the destination.
Enqueued copies cannot be cancelled: ``abort`` waits for them (milliseconds). A transfer whose
source died before it completed is FAILED: IPC memory of a dead process is not to be trusted.
"""
from __future__ import annotations

import os

import msgpack
import torch

from lmdisagg.transports._blocks import byte_runs
from lmdisagg.transports.base import (
    Buffer, ChunkDesc, PeerLostError, Transfer, TransferCorruptError, TransferError, Transport,
    failed_transfer,
)


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


class CudaIpcTransfer(Transfer):
    # poll the copy's event closely (sleep(0) between polls yields the GIL): a GiB takes 3 ms
    # over NVLink, ~40 ms over PCIe; timed back-off sleeps would overshoot it by up to 2 ms, and
    # a blocking event wait wakes ~0.1 ms late
    spin_s = 0.05

    def __init__(self, *args):
        super().__init__(*args)
        self._event: torch.cuda.Event | None = None
        self._src = None  # keeps the opened source alive while copies are queued

    def launch(self, src: torch.Tensor, runs, stream: torch.cuda.Stream) -> None:
        dst = self.dst.flat
        stream.wait_stream(torch.cuda.current_stream(dst.device))  # after the caller's work on dst
        with torch.cuda.stream(stream):  # (also makes the stream's device current)
            dsts = [dst[d:d + n] for _, d, n in runs]    # [n] uint8 views
            srcs = [src[s:s + n] for s, _, n in runs]
            if src.device == dst.device and len(runs) > 1:
                if all(s % 8 == 0 and d % 8 == 0 and n % 8 == 0 for s, d, n in runs):
                    dsts = [t.view(torch.int64) for t in dsts]  # 8-byte elements: wide loads
                    srcs = [t.view(torch.int64) for t in srcs]
                torch._foreach_copy_(dsts, srcs, non_blocking=True)  # few launches for many blocks
            else:
                for a, b in zip(dsts, srcs):
                    a.copy_(b, non_blocking=True)  # peer copy when the devices differ
            self._event = torch.cuda.Event()
            self._event.record(stream)
        self._src = src
        self._quiet = False
        self._start()

    def _progress(self) -> None:
        with self._cond:
            if self._state.terminal or self._event is None or not self._event.query():
                return
            self.bytes_done = self.nbytes
            self._landed()
            self._src = None
            self._quiesce()

    def _cancel(self) -> bool:
        if self._event is not None:
            self._event.synchronize()  # queued copies cannot be recalled; they take milliseconds
        self._src = None
        self._quiesce()
        return True


class CudaIpcTransport(Transport):
    name = "cuda_ipc"

    def __init__(self, *, checksum: bool = False, drain_timeout_s: float = 10.0):
        if not torch.cuda.is_available():
            raise TransferError("the cuda_ipc transport needs CUDA devices")
        super().__init__(checksum=checksum, drain_timeout_s=drain_timeout_s)
        self._opened: dict[tuple[str, int], torch.Tensor] = {}  # (agent, buffer id) -> [nbytes] uint8
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._uuids = {device_uuid(i): i for i in range(torch.cuda.device_count())}

    def _register(self, buf: Buffer, buffer_id: int) -> tuple[str, bytes]:
        t = buf.flat
        if t.device.type != "cuda":
            raise TransferError("cuda_ipc registers CUDA tensors only")
        storage = t.untyped_storage()
        dev, handle, size, offset, ref_h, ref_off, ev_h, ev_sync = storage._share_cuda_()
        byte_off = t.data_ptr() - storage.data_ptr()
        uuid = device_uuid(t.device.index)
        meta = [uuid, handle, size, offset, ref_h, ref_off, ev_h, ev_sync, byte_off]
        _LOCAL[(self.agent, buffer_id)] = t
        return uuid, msgpack.packb(meta, use_bin_type=True)

    def _deregister(self, buf: Buffer) -> None:
        _LOCAL.pop((self.agent, buf.desc.buffer_id), None)

    def _prepare(self, buf: Buffer, block_ids, block_nbytes) -> None:
        torch.cuda.current_stream(buf.flat.device).synchronize()

    def _open(self, desc: ChunkDesc) -> torch.Tensor:
        b = desc.buffer
        key = (b.agent, b.buffer_id)
        src = self._opened.get(key)
        if src is not None:
            return src
        if b.pid == os.getpid():  # CUDA cannot open its own handles: use the tensor itself
            local = _LOCAL.get(key)
            if local is None:
                raise TransferError(f"buffer {key} is from this process but not registered here")
            return local
        uuid, handle, size, offset, ref_h, ref_off, ev_h, ev_sync, byte_off = msgpack.unpackb(b.handle, raw=False)
        index = self._uuids.get(uuid)
        if index is None:
            raise TransferError(f"source GPU {uuid} of {b.agent} is not visible here "
                                f"(check CUDA_VISIBLE_DEVICES of both workers)")
        if byte_off + b.nbytes > size:
            raise TransferCorruptError(f"descriptor of {b.agent} claims {b.nbytes} bytes at offset {byte_off} "
                                       f"of a {size}-byte allocation (truncated)")
        with torch.cuda.device(index):
            storage = torch.UntypedStorage._new_shared_cuda(index, handle, size, offset, ref_h, ref_off, ev_h, ev_sync)
            src = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(storage, byte_off, (b.nbytes,))
        self._opened[key] = src
        return src

    def _forget(self, agent: str) -> None:
        with self._lock:
            for key in [k for k in self._opened if k[0] == agent]:
                del self._opened[key]

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self._streams.get(device.index)
        if s is None:
            s = self._streams[device.index] = torch.cuda.Stream(device)
        return s

    def _pull(self, desc: ChunkDesc, dst: Buffer, dst_blocks: tuple[int, ...]) -> Transfer:
        b = desc.buffer
        if dst.flat.device.type != "cuda":
            raise TransferError("cuda_ipc pulls into CUDA buffers only")
        if not self.peer_alive(b.host, b.pid, b.pid_start):
            self._forget(b.agent)
            return failed_transfer(desc, dst, dst_blocks, PeerLostError(f"source process {b.pid} ({b.agent}) is gone"))
        try:
            with self._lock:
                src = self._open(desc)
        except TransferError as e:
            return failed_transfer(desc, dst, dst_blocks, e)
        runs = byte_runs(desc.block_ids, dst_blocks, desc.block_nbytes)
        if max(s + n for s, _, n in runs) > src.numel():
            return failed_transfer(desc, dst, dst_blocks, TransferCorruptError(
                f"descriptor of {b.agent} reaches past its {src.numel()}-byte buffer (truncated)"))
        t = CudaIpcTransfer(desc, dst, dst_blocks, self.peer_alive)
        t.launch(src, runs, self._stream(dst.flat.device))
        return t

    def _close(self) -> None:
        for s in self._streams.values():
            s.synchronize()
        with self._lock:
            self._opened.clear()  # frees the storages: torch closes the IPC handles
            self._streams.clear()
        for key in [k for k in _LOCAL if k[0] == self.agent]:
            del _LOCAL[key]
        torch.cuda.ipc_collect()  # shared blocks whose consumers are done are freed now


_LOCAL: dict[tuple[str, int], torch.Tensor] = {}  # this process's registered buffers, by (agent, id)
