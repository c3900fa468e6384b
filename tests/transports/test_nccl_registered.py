"""NCCL user-buffer registration (transports/_nccl_mem.py): a pair runs registered (zero-copy)
only when both ends hold nothing but NCCL memory from the transport's allocate, and moves the
same bytes either way; pushes whose source blocks must be gathered gather into registered
memory; ``register_memory`` is checked."""
from __future__ import annotations

import pytest
import torch

from lmdisagg.transports import TransferError, TransferState, create_transport
from lmdisagg.transports._blocks import block_checksums
from tests.transports.conftest import MEDIA, Peer, gpu, need_devices, side_options

MiB = 1 << 20
NBYTES, BLOCK = 64 * MiB, 4 * MiB
MEDIUM = "nccl-cuda"


def test_register_memory_true_is_refused_where_it_cannot_work():
    with pytest.raises(TransferError, match="register_memory"):
        create_transport("nccl", backend="gloo", register_memory=True)


def test_register_memory_reaches_the_worker_from_the_config():
    """``transport.register_memory`` is an nccl option; a worker's transport gets it (here, on a
    CPU, true is refused: registration needs NCCL through cupy)."""
    from pydantic import ValidationError

    from lmdisagg.config import TransportSettings
    from lmdisagg.workers.kv_transfer import KVTransfer
    with pytest.raises(ValidationError, match="register_memory"):
        TransportSettings(name="shm", register_memory=False)
    settings = TransportSettings(name="nccl", register_memory=True).model_dump()
    if not torch.cuda.is_available():
        with pytest.raises(TransferError, match="register_memory"):
            KVTransfer.create(settings, "w0")
    off = KVTransfer.create({**settings, "register_memory": False}, "w1")
    try:
        assert off.transport.registers_memory is False
    finally:
        off.transport.close()


@pytest.fixture(scope="module")
def source():
    _, _, src, dst = MEDIA[MEDIUM]
    need_devices(src, dst)
    p = Peer(MEDIUM)
    bid = p.call("raw", NBYTES, 5)
    yield p, p.call("describe", bid, list(range(NBYTES // BLOCK)), BLOCK, False)
    p.stop()


def pull_once(local, desc, want, foreign: bool):
    dev = MEDIA[MEDIUM][3]
    t = torch.zeros(NBYTES, dtype=torch.uint8, device=dev) if foreign else local.allocate((NBYTES,), torch.uint8, dev)
    dst = local.register(t)
    ids = list(range(NBYTES // BLOCK))
    x = local.pull(desc, dst, ids)
    x.wait(60)
    assert x.state is TransferState.DONE
    assert list(block_checksums(dst.flat, ids, BLOCK)) == want
    return x.link.plane.registered


@gpu
def test_a_pair_of_nccl_memory_runs_registered(source):
    peer, (desc, want) = source
    local = create_transport("nccl", **side_options(MEDIUM, MEDIA[MEDIUM][3]), register_memory=True)
    try:
        assert pull_once(local, desc, want, foreign=False) is True
        x = local.pull(desc, next(iter(local._buffers.values())), list(range(NBYTES // BLOCK)))
        x.wait(60)  # again on the same registered pair
        assert x.state is TransferState.DONE
        # a plain buffer registered now: the next pull moves it on a new, staged pair
        assert pull_once(local, desc, want, foreign=True) is False
    finally:
        local.close()


@gpu
@pytest.mark.parametrize("how", ["foreign buffer", "register_memory=False"])
def test_a_pair_with_a_plain_buffer_runs_staged(source, how):
    peer, (desc, want) = source
    opts = side_options(MEDIUM, MEDIA[MEDIUM][3])
    if how == "register_memory=False":
        opts["register_memory"] = False
    local = create_transport("nccl", **opts)
    try:
        assert pull_once(local, desc, want, foreign=how == "foreign buffer") is False
    finally:
        local.close()


@gpu
def test_a_source_buffer_from_elsewhere_moves_over_a_new_staged_pair():
    """The source registers ordinary memory after a registered pair formed: its descriptor says
    so, and the destination pulls it over a new, staged pair (the registered pair would have to
    refuse it)."""
    _, _, src, dst = MEDIA[MEDIUM]
    need_devices(src, dst)
    peer = Peer(MEDIUM)
    local = create_transport("nccl", **side_options(MEDIUM, dst), register_memory=True)
    ids = list(range(NBYTES // BLOCK))
    try:
        desc, want = peer.call("describe", peer.call("raw", NBYTES, 5), ids, BLOCK, False)
        assert pull_once(local, desc, want, foreign=False) is True
        desc, want = peer.call("describe", peer.call("plain", NBYTES, 6), ids, BLOCK, False)
        into = local.register(local.allocate((NBYTES,), torch.uint8, dst))
        x = local.pull(desc, into, ids)
        x.wait(60)
        assert list(block_checksums(into.flat, ids, BLOCK)) == want
        assert x.link.plane.registered is False
    finally:
        local.close()
        peer.stop()


@gpu
def test_a_gathered_push_goes_through_registered_memory(source):
    """Source blocks out of order: the source gathers them into pool memory, on a registered
    pair, and the destination gets them in its order."""
    peer, (desc, want) = source
    local = create_transport("nccl", **side_options(MEDIUM, MEDIA[MEDIUM][3]), register_memory=True)
    try:
        dst = local.register(local.allocate((NBYTES,), torch.uint8, MEDIA[MEDIUM][3]))
        n = NBYTES // BLOCK
        src_ids = list(reversed(range(n)))
        x = local.expect(desc.buffer, dst, list(range(n)), BLOCK)
        assert peer.call("push", desc.buffer.buffer_id, x.ticket.pack(), src_ids, True) == "done"
        x.wait(60)
        assert x.state is TransferState.DONE and x.link.plane.registered
        assert list(block_checksums(dst.flat, list(range(n)), BLOCK)) == list(reversed(want))
    finally:
        local.close()


@gpu
def test_allocated_memory_goes_back_to_the_device_at_close_or_as_it_ends_after():
    """NCCL memory from allocate: a tensor that ends before close keeps its memory until close (a
    communicator may hold its registration); one that outlives close frees it as it ends. Asked
    of this process's driver (is the address still mapped device memory?), not of the device's
    free memory, which other processes move."""
    import gc

    from cupy.cuda import runtime as rt
    need_devices("cuda:0")

    def mapped(ptr: int) -> bool:  # device memory (cudaMemoryTypeDevice), not an unknown address
        try:
            attrs = rt.pointerGetAttributes(ptr)
        except rt.CUDARuntimeError:
            return False
        return getattr(attrs, "type", getattr(attrs, "memoryType", None)) == 2
    tx = create_transport("nccl", backend="nccl", register_memory=True, device=0)
    early = tx.allocate((64 * MiB,), torch.uint8, "cuda:0")
    late = tx.allocate((16 * MiB, 2), torch.float16, "cuda:0")
    a, b = early.data_ptr(), late.data_ptr()
    assert mapped(a) and mapped(b)
    del early
    gc.collect()
    tx.allocate((1,), torch.uint8, "cuda:0")  # reclaims what has ended: held, not freed
    assert mapped(a)
    tx.close()
    assert not mapped(a)  # early's memory went back at close
    assert mapped(b)
    del late
    gc.collect()
    assert not mapped(b)  # and late's as it ended
