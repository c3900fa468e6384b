"""cuda_ipc leaks no IPC handle: a destination opens a source's memory once and keeps it open (the
first open costs 0.15-0.22 s), and closing the destination's transport closes it again. Until
then the source cannot get that memory back even after it freed its buffer (torch keeps a block
that another process has open until that process lets go); after it, it can."""
from __future__ import annotations

import gc
import time

import pytest
import torch

from lmdisagg.transports import TransferState, create_transport
from tests.transports.conftest import MEDIA, Peer, need_devices

pytestmark = pytest.mark.gpu
MiB = 1 << 20


@pytest.mark.parametrize("medium", ["cuda_ipc", "cuda_ipc-2gpu"])
def test_closing_the_destination_gives_the_source_its_memory_back(medium):
    _, _, src_dev, dst_dev = MEDIA[medium]
    need_devices(src_dev, dst_dev)
    size = 256 * MiB
    peer = Peer(medium)
    try:
        base = peer.call("cuda_allocated")
        bid = peer.call("raw", size, 9)
        desc, _ = peer.call("describe", bid, list(range(16)), size // 16, False)
        tx = create_transport("cuda_ipc")
        try:
            dst = tx.register(torch.zeros(size, dtype=torch.uint8, device=dst_dev))
            x = tx.pull(desc, dst, range(16))
            x.wait(60)
            assert x.state is TransferState.DONE
            del x
            peer.call("drop", bid)  # the source frees its buffer while this process has it open
            assert peer.call("cuda_allocated") >= base + size, "the source got back memory still open here"
        finally:
            tx.close()
        gc.collect()
        deadline = time.monotonic() + 10
        while (held := peer.call("cuda_allocated")) >= base + size and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held < base + size, f"the source still holds {held - base} bytes after the destination closed"
    finally:
        peer.stop()
