"""Push (``Transport.expect`` / ``push``): the destination posts its receives first, the source
sends when its bytes are ready. Checked on every medium that pushes (nccl: gloo here and in CI,
cupy's NCCL across two GPUs): real engine chunks byte-identical, scattered blocks on both sides,
pushes made out of their order, checksums, abort on either side, a wait that times out, a source
or a destination killed, and misuse refused."""
from __future__ import annotations

import random
import time

import pytest
import torch

from lmdisagg.transports import (
    PeerLostError, PushTicket, TransferAbortedError, TransferError, TransferState, TransferTimeoutError,
    create_transport,
)
from lmdisagg.transports._blocks import block_checksums
from tests.transports.conftest import MEDIA, Peer, engine_round_trip, gpu, need_devices, prompt_for, side_options

MiB = 1 << 20
PUSH_MEDIA = [pytest.param("nccl-gloo", id="nccl-gloo"), pytest.param("nccl-cuda", id="nccl-cuda", marks=gpu)]


@pytest.fixture(scope="module", params=PUSH_MEDIA)
def medium(request):
    _, _, src, dst = MEDIA[request.param]
    need_devices(src, dst)
    return request.param


def digests(buf, ids, block_nbytes):
    return list(block_checksums(buf.flat, list(ids), block_nbytes))


def dst_buffer(local, medium, nbytes):
    return local.register(local.allocate((nbytes,), torch.uint8, MEDIA[medium][3]))


def test_engine_chunks_pushed_round_trip(medium, peer, local, dst_engine):
    """Prefill in the peer; the decode side reserves blocks and expects them first; the peer
    pushes its pinned chunks: the bytes match and the decode engine serves the prompt from them
    with the same first token."""
    def push(desc, dst, blocks):
        x = local.expect(desc.buffer, dst, blocks, desc.block_nbytes)
        assert x.state is TransferState.PENDING
        assert peer.call("push", desc.buffer.buffer_id, x.ticket.pack(), list(desc.block_ids), True) == "done"
        return x
    # chunks no other test put in the shared engine
    engine_round_trip(peer, local, dst_engine, prompt_for(medium + "-push", 120), push)


def source_buffer(peer, local, medium, nbytes: int, seed: int, dst_nbytes: int | None = None):
    """A filled source buffer in the peer and a destination here: (its id, its descriptor, dst)."""
    bid = peer.call("raw", nbytes, seed)
    return bid, peer.call("bufdesc", bid), dst_buffer(local, medium, dst_nbytes or nbytes)


def test_scattered_pushes_made_out_of_order(medium, peer, local):
    """Twelve expectations over scattered destination blocks, pushed from scattered source blocks
    in a shuffled order: each push waits for its turn, every one lands whole."""
    bn, nblocks = 256 << 10, 64
    bid = peer.call("raw", nblocks * bn, 21)
    src = peer.call("bufdesc", bid)
    rng = random.Random(1)
    free = list(range(96))
    rng.shuffle(free)
    plans = []
    for _ in range(12):
        k = rng.randint(1, 6)
        plans.append((rng.sample(range(nblocks), k), [free.pop() for _ in range(k)]))
    dst = dst_buffer(local, medium, 96 * bn)
    try:
        xs = [local.expect(src, dst, d, bn) for _, d in plans]
        assert [x.ticket.seq for x in xs] == list(range(xs[0].ticket.seq, xs[0].ticket.seq + 12))
        order = list(range(12))
        rng.shuffle(order)
        for i in order:  # not waited on: later turns wait on the source for earlier ones
            assert peer.call("push", bid, xs[i].ticket.pack(), plans[i][0], False) in ("pending", "transferring", "done")
        for x, (s, d) in zip(xs, plans):
            x.wait(60)
            _, want = peer.call("describe", bid, s, bn, False)
            assert digests(dst, d, bn) == want
    finally:
        local.deregister(dst)


def test_a_256mib_push(medium, peer, local):
    bn = 16 * MiB
    bid, src, dst = source_buffer(peer, local, medium, 256 * MiB, 22, 320 * MiB)
    try:
        d = list(range(19, 3, -1))  # 16 blocks, reversed: 16 receives
        x = local.expect(src, dst, d, bn)
        assert len(x.ticket.sizes) == 16
        peer.call("push", bid, x.ticket.pack(), list(range(16)), False)
        x.wait(120)
        _, want = peer.call("describe", bid, list(range(16)), bn, False)
        assert digests(dst, d, bn) == want
    finally:
        local.deregister(dst)


def test_checksums_travel_with_the_push(medium, peer, local):
    bn = 64 << 10
    bid, src, dst = source_buffer(peer, local, medium, 16 * bn, 23)
    try:
        x = local.expect(src, dst, range(4), bn, checksum=True)
        assert x.ticket.checksum
        peer.call("push", bid, x.ticket.pack(), [9, 3, 4, 5], True)
        x.wait(60)
        _, want = peer.call("describe", bid, [9, 3, 4, 5], bn, False)
        assert list(x.desc.checksums) == want == digests(dst, range(4), bn)  # checked on arrival
    finally:
        local.deregister(dst)


def test_checksums_are_checked_on_arrival(medium, monkeypatch):
    """A source whose checksums do not match its bytes: the destination FAILS the push as
    corrupt, never DONE (the source here, its checksum function made to lie; the destination a
    peer process of its own)."""
    from lmdisagg.transports import _blocks
    name, _, src_dev, _ = MEDIA[medium]
    real = _blocks.block_checksums
    monkeypatch.setattr(_blocks, "block_checksums", lambda *a: tuple(v ^ 1 for v in real(*a)))
    here = create_transport(name, **side_options(medium, src_dev))
    dest = Peer(medium, role="destination")
    try:
        t = here.allocate((4 * MiB,), torch.uint8, src_dev)
        t.copy_(torch.arange(4 * MiB, dtype=torch.int64).to(torch.uint8))
        src = here.register(t)
        ticket = dest.call("expect", src.desc, 4, MiB, True)
        here.push(ticket, src, range(4)).wait(60)  # the bytes left whole
        state, err = dest.call("push_state", 60)
        assert state == "failed" and "TransferCorruptError" in err, err
    finally:
        dest.stop()
        here.close()


def test_abort_before_the_push_and_a_wait_that_times_out(medium, peer, local):
    """An expectation aborted before its push fails at once here; the source's later push of it
    fails; one that nobody pushes times out; pushes around them land whole."""
    bn = 1 * MiB
    bid, src, dst = source_buffer(peer, local, medium, 8 * bn, 24)
    try:
        a = local.expect(src, dst, [0, 1], bn)
        b = local.expect(src, dst, [2, 3], bn)
        c = local.expect(src, dst, [4, 5], bn)
        a.abort()
        assert a.state is TransferState.FAILED and isinstance(a.error, TransferAbortedError)
        with pytest.raises(TransferTimeoutError):
            b.wait(0.5)  # never pushed: aborted, its receives drained with the source's filler
        peer.call("push", bid, c.ticket.pack(), [6, 7], True)
        c.wait(60)
        _, want = peer.call("describe", bid, [6, 7], bn, False)
        assert digests(dst, [4, 5], bn) == want
        assert peer.call("push", bid, a.ticket.pack(), [6, 7], False) == "failed"  # too late
        state, err = peer.call("push_state", 5)
        assert state == "failed" and "aborted" in err
    finally:
        local.deregister(dst)


def test_the_source_aborts_a_push(medium, peer, local):
    """A push aborted on the source before its turn: the destination's expectation FAILS (it is
    never DONE with filler), and the next one lands."""
    bn = 1 * MiB
    bid, src, dst = source_buffer(peer, local, medium, 8 * bn, 25)
    try:
        a = local.expect(src, dst, [0, 1], bn)
        b = local.expect(src, dst, [2, 3], bn)
        c = local.expect(src, dst, [4, 5], bn)
        peer.call("push", bid, b.ticket.pack(), [0, 1], False)  # waits for a's turn on the source
        peer.call("abort_last")                                  # ... and is dropped there
        peer.call("push", bid, a.ticket.pack(), [2, 3], False)
        peer.call("push", bid, c.ticket.pack(), [4, 5], False)
        for x in (a, c):
            x.wait(60)
        with pytest.raises(TransferAbortedError, match="aborted by the source"):
            b.wait(60)
        _, want = peer.call("describe", bid, [2, 3, 4, 5], bn, False)
        assert digests(dst, [0, 1, 4, 5], bn) == want
    finally:
        local.deregister(dst)


def test_source_killed_before_it_pushes(medium, fresh_peer, local):
    bn = 1 * MiB
    bid, src, dst = source_buffer(fresh_peer, local, medium, 4 * bn, 26)
    try:
        first = local.expect(src, dst, range(4), bn)  # the pair is up (a source that dies while
        fresh_peer.call("push", bid, first.ticket.pack(), [0, 1, 2, 3], True)  # NCCL forms it is NCCL's
        first.wait(60)  # bootstrap timeout's to find)
        x = local.expect(src, dst, range(4), bn)
        fresh_peer.kill()
        t0 = time.monotonic()
        with pytest.raises(PeerLostError):
            x.wait(20)
        assert time.monotonic() - t0 < 10
        y = local.expect(src, dst, range(4), bn)  # the dead source is known: fails at once
        with pytest.raises(PeerLostError):
            y.wait(5)
    finally:
        local.deregister(dst)


def test_destination_killed_before_the_push(medium, local):
    """A decode worker that dies holding an expectation: the source's push of it FAILS within its
    timeout, and the source still pushes to others."""
    name, _, src_dev, dst_dev = MEDIA[medium]
    here = create_transport(name, **side_options(medium, src_dev))  # the source, in this process
    try:
        t = here.allocate((4 * MiB,), torch.uint8, src_dev)
        t.copy_(torch.arange(4 * MiB, dtype=torch.int64).to(torch.uint8))
        src = here.register(t)
        doomed = Peer(medium, role="destination")
        try:
            ticket = doomed.call("expect", src.desc, 4, MiB)
            deadline = time.monotonic() + 30
            while not here._push_peers and time.monotonic() < deadline:  # its pair is up
                time.sleep(0.01)
            doomed.kill()
        finally:
            doomed.stop()
        y = here.push(ticket, src, range(4))
        t0 = time.monotonic()
        with pytest.raises(PeerLostError):
            y.wait(30)
        assert time.monotonic() - t0 < 20
        other = Peer(medium, role="destination")  # a live one is served
        try:
            ticket = other.call("expect", src.desc, 4, MiB)
            z = here.push(ticket, src, [3, 2, 1, 0])
            z.wait(60)
            assert z.state is TransferState.DONE
        finally:
            other.stop()
    finally:
        here.close()


def test_misuse_is_refused(medium, peer, local):
    bid, src, dst = source_buffer(peer, local, medium, 4 * MiB, 27)
    try:
        with pytest.raises(TransferError, match="no destination blocks"):
            local.expect(src, dst, [], MiB)
        with pytest.raises(TransferError, match="outside"):
            local.expect(src, dst, [4], MiB)
        x = local.expect(src, dst, range(2), MiB)
        mine = local.register(local.allocate((4 * MiB,), torch.uint8, MEDIA[medium][3]))
        try:
            with pytest.raises(TransferError, match="the ticket is for"):
                local.push(x.ticket, mine, range(2))  # addressed to the peer, not to this transport
        finally:
            local.deregister(mine)
        with pytest.raises(RuntimeError, match="expects 2"):
            peer.call("push", bid, x.ticket.pack(), [0, 1, 2], True)
        assert PushTicket.unpack(x.ticket.pack()) == x.ticket
        x.abort()
    finally:
        local.deregister(dst)
    shm = create_transport("shm")
    try:
        with pytest.raises(TransferError, match="cannot push"):
            shm.expect(src, shm.register(torch.zeros(MiB, dtype=torch.uint8)), [0], MiB)
    finally:
        shm.close()


def test_torch_nccl_runtime_says_it_cannot_push():
    tx = create_transport("nccl", backend="nccl", runtime="torch")
    try:
        assert not tx.supports_push
        with pytest.raises(TransferError, match="push needs cupy's NCCL"):
            tx.push(b"", None, [])
    finally:
        tx.close()


def test_expectations_made_from_many_threads(medium, peer, local):
    """Four threads make expectations at once (a decode worker's request threads): each gets its
    own seq, the receives are posted in that order, and the pushes, made in another order, land
    whole (on NCCL a receive posted out of seq order would take another push's bytes; gloo
    matches by tag, so there only the numbering and the source's queue are checked)."""
    import threading
    bn = 256 << 10
    bid, src, dst = source_buffer(peer, local, medium, 32 * bn, 28, 64 * bn)
    got: list = []
    lock = threading.Lock()

    def expect_some(t: int):
        for i in range(4):
            d = [t * 16 + i * 4 + j for j in range(4)][::-1 if i % 2 else 1]
            x = local.expect(src, dst, d, bn)
            with lock:
                got.append((x, d))
    try:
        threads = [threading.Thread(target=expect_some, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        seqs = sorted(x.ticket.seq for x, _ in got)
        assert seqs == list(range(seqs[0], seqs[0] + 16))  # one each, none skipped
        rng = random.Random(3)
        plans = {id(x): rng.sample(range(32), 4) for x, _ in got}
        for x, _ in sorted(got, key=lambda g: -g[0].ticket.seq):  # the last expectation first
            peer.call("push", bid, x.ticket.pack(), plans[id(x)], False)
        for x, d in got:
            x.wait(60)
            _, want = peer.call("describe", bid, plans[id(x)], bn, False)
            assert digests(dst, d, bn) == want
    finally:
        local.deregister(dst)
