"""nccl between two processes of one GPU: NCCL cannot make a communicator of two ranks on one
device, so the source refuses the pair as it forms, and the pull or expectation FAILS at once
with a TransferError that says why and names cuda_ipc (the medium for workers that share a
GPU), rather than NCCL's own "invalid usage" from deep inside the pair's set-up. The refused
pairs leave nothing behind on either side: threads, sockets, ports."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from lmdisagg.transports import TransferError, TransferState, create_transport
from tests.transports.conftest import Peer, gpu, need_devices, side_options

MiB = 1 << 20
MEDIUM = "nccl-cuda-1gpu"


@gpu
def test_nccl_between_processes_of_one_gpu_is_refused_and_says_why():
    need_devices("cuda:0")

    def ours() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith("lmdisagg")}
    before = ours()
    peer = Peer(MEDIUM)
    local = create_transport("nccl", **side_options(MEDIUM, "cuda:0"))
    closed = False
    try:
        bid = peer.call("raw", 4 * MiB, 3)
        desc, _ = peer.call("describe", bid, [0, 1, 2, 3], MiB, False)
        dst = local.register(local.allocate((4 * MiB,), torch.uint8, "cuda:0"))
        for attempt in range(6):  # the next pull makes a new pair, refused the same way
            t0 = time.monotonic()
            x = local.pull(desc, dst, [0, 1, 2, 3])
            with pytest.raises(TransferError, match="cannot pair two processes of one GPU.*cuda_ipc"):
                x.wait(60)
            assert x.state is TransferState.FAILED and time.monotonic() - t0 < 10, attempt
        assert len(local._dead_links) <= 2  # refused pairs are not kept once their threads end
        src = peer.call("bufdesc", bid)
        e = local.expect(src, dst, [0, 1], MiB)  # a push pair: refused too
        with pytest.raises(TransferError, match="cannot pair two processes of one GPU"):
            e.wait(60)
        local.close()
        closed = True
        deadline = time.monotonic() + 5
        while ours() - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ours() - before == set(), "threads of the refused pairs outlived close"
        left = peer.call("close", timeout=60)
        left.pop("tasks", None)  # the CUDA driver's threads start lazily and stay: not ours
        assert left == {}, left
    finally:
        if not closed:
            local.close()
        peer.stop()
