"""cuda_ipc across GPUs: a pull leaves the source's device able to reach the destination's, so
that the copies run peer to peer (NVLink, PCIe P2P) rather than staged through the host.

The source's memory is opened into the source device's context, and the driver copies out of it
peer to peer only if that device has peer access to the destination device. A decode worker
that had enabled only the other direction (its own device reaching the source) got every pull
staged through the host: 36 GB/s against 295 GB/s on 2xH200 (probes of serving pulls) (benchmarks/transport_bw.py's
``gbps_before_raw_copies`` and serve_bench's ``kv_transfer_seconds`` measure the speed; no test
times it). Which peer access a process holds is CUDA's own state: enabling it again answers
cudaErrorPeerAccessAlreadyEnabled. Any copy between the two devices made by torch enables it as
a side effect, so the destination runs in a process of its own, fresh: nothing there has made one
before the transport does. The same way: a destination that sees the GPUs in another order (they
are matched by UUID), and one whose torch reports no peer access (named in a warning)."""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from tests.transports.conftest import Peer, need_devices

pytestmark = pytest.mark.gpu


def pull_every_block(tx, desc, device: str, times: int = 1) -> list[int]:
    """Pull all of ``desc`` into a fresh buffer on ``device`` (``times`` over); its block digests."""
    import torch

    from lmdisagg.transports._blocks import block_checksums
    n = len(desc.block_ids)
    dst = tx.register(torch.zeros(n * desc.block_nbytes, dtype=torch.uint8, device=device))
    for _ in range(times):
        tx.pull(desc, dst, list(range(n))).wait(60)
    return list(block_checksums(dst.flat, list(range(n)), desc.block_nbytes))


def _destination_main(conn, target, desc, *args) -> None:
    try:
        conn.send(("ok", *target(desc, *args)))
    except Exception as e:
        conn.send(("err", repr(e), None))


def pull_in_fresh_process(target, nblocks: int, block: int, seed: int, *args):
    """Blocks of a cuda_ipc-2gpu peer (cuda:0) pulled by ``target(desc, *args) -> (digests,
    observations)`` in a fresh spawned process; checks the digests against the source's and
    returns the observations."""
    peer = Peer("cuda_ipc-2gpu")
    try:
        bid = peer.call("raw", nblocks * block, seed)
        desc, want = peer.call("describe", bid, list(range(nblocks)), block, False)
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_destination_main, args=(child, target, desc, *args), daemon=True)
        proc.start()
        try:
            assert conn.poll(120), "the destination process did not answer"
            status, got, seen = conn.recv()
            proc.join(60)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    finally:
        peer.stop()
    assert status == "ok", got
    assert got == want, "the pulled blocks differ from the source's"
    return seen


def destination(desc, runtime: str):
    from cupy.cuda import runtime as rt

    from lmdisagg.transports import create_transport
    tx = create_transport("cuda_ipc", runtime=runtime)
    got = pull_every_block(tx, desc, "cuda:1")
    rt.setDevice(0)
    try:
        rt.deviceEnablePeerAccess(1)
        reach = "not enabled by the pull"
    except rt.CUDARuntimeError as e:
        reach = "enabled" if "PeerAccessAlreadyEnabled" in str(e) else repr(e)
    tx.close()
    return got, reach


@pytest.mark.parametrize("runtime", ["cupy", "torch"])
def test_a_cross_gpu_pull_enables_peer_access_from_the_source_device(runtime):
    need_devices("cuda:0", "cuda:1")
    pytest.importorskip("cupy")  # the probe of CUDA's peer state (and the cupy runtime) need it
    import torch
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("cuda:0 has no peer access to cuda:1 on this machine")
    reach = pull_in_fresh_process(destination, 8, 2 << 20, 7, runtime)
    assert reach == "enabled", f"peer access cuda:0 -> cuda:1 after a {runtime} pull: {reach}"


def destination_without_peer_access(desc):
    """A destination whose torch reports no peer access between the GPUs (as on a host without
    P2P, where the driver stages such copies through host memory): it must say so, and pull."""
    import logging

    import torch

    from lmdisagg.transports import create_transport
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("lmdisagg.transports").addHandler(Keep(logging.WARNING))
    torch.cuda.can_device_access_peer = lambda a, b: False  # the query the transport asks
    tx = create_transport("cuda_ipc")
    got = pull_every_block(tx, desc, "cuda:1", times=2)  # the warning comes with the first open only
    tx.close()
    return got, records


def test_a_source_gpu_without_peer_access_is_named_in_a_warning():
    need_devices("cuda:0", "cuda:1")
    records = pull_in_fresh_process(destination_without_peer_access, 4, 1 << 20, 5)
    slow = [r for r in records if "has no peer access" in r]
    assert len(slow) == 1 and "GPU 0" in slow[0] and "GPU 1" in slow[0], records


def destination_with_gpus_reordered(desc):
    """A destination that sees the node's GPUs in the other order (CUDA_VISIBLE_DEVICES=1,0, as
    a worker given another mask may): the source's GPU 0 is its cuda:1, matched by UUID."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "1,0"  # read when CUDA initializes, later in this process
    import torch

    from lmdisagg.transports import create_transport
    tx = create_transport("cuda_ipc")
    got = pull_every_block(tx, desc, "cuda:0")
    opened_on = tx._opened[(desc.buffer.agent, desc.buffer.buffer_id)].index
    # cuda_ipc's address is the source GPU's UUID
    mask_holds = desc.buffer.address == str(torch.cuda.get_device_properties(1).uuid)
    tx.close()
    return got, (opened_on, mask_holds)


def test_workers_that_see_the_gpus_in_another_order_still_pull_across_them():
    need_devices("cuda:0", "cuda:1")
    opened_on, mask_holds = pull_in_fresh_process(destination_with_gpus_reordered, 4, 1 << 20, 9)
    assert mask_holds, "CUDA_VISIBLE_DEVICES=1,0 did not reorder the destination's GPUs"
    assert opened_on == 1, "the source's memory must be opened on its own GPU, cuda:1 in this view"
