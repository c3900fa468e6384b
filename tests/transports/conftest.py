"""Fixtures of the transport contract suite: every medium available here, a source peer in a
separate process (spawned, as workers are), and a destination transport in the test process."""
from __future__ import annotations

import multiprocessing as mp
import os
import zlib

import pytest

from tests.transports import peer as peer_main

gpu = pytest.mark.gpu

# NCCL >= 2.24 starts its RAS service with the first communicator of a process: a thread with
# its own sockets (a listener on 127.0.0.1:28028 among them) that lives until the process exits.
# It is NCCL's, not a transport's, so the leak checks run without it (peers inherit this).
os.environ.setdefault("NCCL_RAS_ENABLE", "0")

# id -> (transport, options, source device, destination device). Short drain/op timeouts keep the
# failure tests quick; defaults are longer.
MEDIA = {
    # 16 MiB pieces (the default is 64 MiB): a 256 MiB pull is 16 of them, so the abort and
    # killed-peer cases land between pieces with room to spare on a fast host too
    "shm": ("shm", {"piece_nbytes": 16 << 20}, "cpu", "cpu"),
    "fake": ("fake", {"latency_s": 0.002, "bandwidth_gbps": 2.0}, "cpu", "cpu"),
    "nccl-gloo": ("nccl", {"backend": "gloo", "op_timeout_s": 10.0}, "cpu", "cpu"),
    "mooncake-tcp": ("mooncake", {"protocol": "tcp"}, "cpu", "cpu"),
    "cuda_ipc": ("cuda_ipc", {}, "cuda:0", "cuda:0"),           # launches with cupy where installed
    "cuda_ipc-torch": ("cuda_ipc", {"runtime": "torch"}, "cuda:0", "cuda:0"),
    "cuda_ipc-2gpu": ("cuda_ipc", {}, "cuda:0", "cuda:1"),
    "nccl-cuda": ("nccl", {"backend": "nccl"}, "cuda:0", "cuda:1"),   # NCCL through cupy where installed
    "nccl-cuda-torch": ("nccl", {"backend": "nccl", "runtime": "torch"}, "cuda:0", "cuda:1"),
    "shm-cuda": ("shm", {}, "cuda:0", "cuda:0"),
    "nccl-cuda-1gpu": ("nccl", {"backend": "nccl"}, "cuda:0", "cuda:0"),  # refused: test_nccl_one_gpu.py
}
CPU_MEDIA = ["shm", "fake", "nccl-gloo", "mooncake-tcp"]
GPU_MEDIA = ["cuda_ipc", "cuda_ipc-torch", "cuda_ipc-2gpu", "nccl-cuda", "nccl-cuda-torch", "shm-cuda"]
DRAIN_S = 3.0


def medium_params():
    return [pytest.param(m, id=m) for m in CPU_MEDIA] + [pytest.param(m, id=m, marks=gpu) for m in GPU_MEDIA]


def side_options(medium: str, device: str) -> dict:
    name, options, *_ = MEDIA[medium]
    out = {**options, "drain_timeout_s": DRAIN_S}
    if name == "nccl" and device.startswith("cuda"):
        out["device"] = int(device.split(":")[1])
    return out


def need_devices(*devices: str) -> None:
    import torch
    need = 1 + max([int(d.split(":")[1]) for d in devices if d.startswith("cuda")] or [-1])
    if need and torch.cuda.device_count() < need:
        pytest.skip(f"needs {need} GPUs")  # gpu-marked media only


class Peer:
    """A peer process (tests/transports/peer.py) driven over a pipe: a source, or a destination
    of its own."""

    def __init__(self, medium: str, options: dict | None = None, role: str = "source"):
        """``options``: the transport's options instead of the medium's. ``role``: "source" (on
        the medium's source device) or "destination" (on its destination device: a puller of
        its own, for tests that kill one)."""
        name, _, src, dst = MEDIA[medium]
        device = dst if role == "destination" else src
        options = side_options(medium, device) if options is None else options
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=peer_main.main, args=(child, name, options, device), daemon=True)
        self.proc.start()
        child.close()

    def call(self, op: str, *args, timeout: float = 120.0):
        self.start(op, *args)
        return self.result(op, timeout)

    def start(self, op: str, *args) -> None:
        """Send a command without waiting for its reply (``result`` reads it)."""
        self.conn.send((op, *args))

    def result(self, op: str, timeout: float = 120.0):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer did not answer {op!r} within {timeout}s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"peer failed {op!r}: {value}")
        return value

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=30)
            except (OSError, EOFError, TimeoutError):
                pass
            self.proc.join(30)
        if self.proc.is_alive():
            self.kill()
        self.conn.close()
        self.proc.close()


@pytest.fixture(scope="module", params=medium_params())
def medium(request):
    name, _, src, dst = MEDIA[request.param]
    need_devices(src, dst)
    return request.param


@pytest.fixture(scope="module")
def peer(medium):
    p = Peer(medium)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def local(medium):
    from lmdisagg.transports import create_transport
    name, _, _, device = MEDIA[medium]
    tx = create_transport(name, **side_options(medium, device))
    yield tx
    tx.close()


@pytest.fixture
def fresh_peer(medium):
    """A peer of its own, for tests that kill or stop it."""
    p = Peer(medium)
    yield p
    p.stop()


_engines: dict = {}


@pytest.fixture
def dst_engine(medium):
    """The destination engine (one per device, shared by the media of this module)."""
    from lmdisagg.engine import Engine
    device = MEDIA[medium][3]
    if device not in _engines:
        _engines[device] = Engine(model=peer_main.engine_model(), device=device, chunk_tokens=16, num_blocks=64,
                                   max_model_len=512)
    return _engines[device]


def prompt_for(medium: str, n: int = 100) -> list[int]:
    """Random token ids, distinct per medium (so no medium finds another's chunks cached)."""
    import random
    rng = random.Random(zlib.crc32(medium.encode()))
    return [rng.randrange(1000, 40000) for _ in range(n)]


def engine_round_trip(peer, local, dst_engine, prompt: list[int], move) -> None:
    """Prefill ``prompt`` in the peer (its chunks stay pinned), reserve them in ``dst_engine``,
    ``move(desc, dst, blocks)`` (a Transfer filling those blocks), commit: the bytes match and the
    decode engine serves the prompt from them with the same first token."""
    import torch
    from lmdisagg.engine import SamplingParams
    from lmdisagg.transports import TransferState
    from lmdisagg.transports._blocks import block_checksums
    keys, desc, src_digests, first = peer.call("engine", prompt, 16)
    assert keys == dst_engine.chunk_keys(prompt) and len(keys) == len(prompt) // 16
    dst = local.register(dst_engine.kv_buffer)
    try:
        reserved = dst_engine.reserve_chunks(keys)
        assert list(reserved) == keys  # none of them cached here already
        x = move(desc, dst, [reserved[k] for k in keys])
        x.wait(60)
        dst_engine.commit_chunks(reserved)
    finally:
        local.deregister(dst)
    assert x.state is TransferState.DONE and x.bytes_done == len(keys) * dst_engine.layout.chunk_nbytes
    got = [block_checksums(c.reshape(-1).view(torch.uint8), [0], c.numel() * c.element_size())[0]
           for c in dst_engine.export_chunks(keys)]
    assert got == src_digests
    out = dst_engine.generate(prompt, SamplingParams(max_tokens=1))[0]
    assert out.cached_tokens == len(keys) * 16 and out.token_ids == first
    assert peer.call("unpin")  # the source's blocks are all free again
