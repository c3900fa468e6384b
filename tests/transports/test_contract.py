"""The one contract every transport keeps (base.py), checked on every medium available here:
source in another process, real KV chunks from the engine, concurrency (several sources and
destinations at once too), tiny and 256 MiB payloads, abort, a killed or hung source, a killed or
stopped destination, corruption, truncation, and nothing leaked on close."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmdisagg.transports import (
    PeerLostError, TransferAbortedError, TransferCorruptError, TransferError, TransferState,
    TransferTimeoutError,
)
from lmdisagg.transports._blocks import block_checksums
from tests.transports.conftest import DRAIN_S, GPU_MEDIA, MEDIA, Peer, engine_round_trip, gpu, prompt_for

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
BIG, BIG_BLOCK = 256 * MiB, 16 * MiB
ONE_SIDED = {"shm", "fake", "cuda_ipc", "cuda_ipc-torch", "cuda_ipc-2gpu", "shm-cuda"}  # pulls need nothing of the peer
SLEEP_CYCLES = 1_500_000_000  # torch.cuda._sleep: ~0.75 s at ~2 GHz, far longer than an 8 MiB pull
GPU_FAST = {"cuda_ipc", "cuda_ipc-torch", "cuda_ipc-2gpu", "nccl-cuda", "nccl-cuda-torch", "shm-cuda"}  # 256 MiB may finish before abort


def dst_buffer(local, medium, nbytes):
    t = local.allocate((nbytes,), torch.uint8, MEDIA[medium][3])
    return local.register(t)


def digests(buf, ids, block_nbytes):
    return list(block_checksums(buf.flat, list(ids), block_nbytes))


def wait_until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.0005)


@pytest.fixture(scope="module")
def big(peer):
    """A 256 MiB source buffer of 16 blocks, described whole: (desc, block digests)."""
    bid = peer.call("raw", BIG, 7)
    return peer.call("describe", bid, list(range(BIG // BIG_BLOCK)), BIG_BLOCK, False)


@pytest.fixture(scope="module")
def big_dst(local, medium):
    buf = dst_buffer(local, medium, BIG)
    yield buf
    local.deregister(buf)


def test_engine_chunks_round_trip(medium, peer, local, dst_engine):
    """Prefill in the peer, pull its pinned chunks into reserved blocks here, commit: the bytes
    match and the decode engine serves the prompt from them with the same first token."""
    engine_round_trip(peer, local, dst_engine, prompt_for(medium), local.pull)


def test_many_concurrent_transfers(medium, peer, local):
    bn, nblocks = 256 << 10, 64
    bid = peer.call("raw", nblocks * bn, 1)
    rng = random.Random(0)
    plans = [rng.sample(range(nblocks), rng.randint(1, 8)) for _ in range(24)]
    descs = [peer.call("describe", bid, ids, bn, False) for ids in plans]
    dst = dst_buffer(local, medium, sum(map(len, plans)) * bn)
    try:
        xs, slot = [], 0
        for desc, _ in descs:  # all submitted before any is waited on
            xs.append((local.pull(desc, dst, range(slot, slot + len(desc.block_ids))), slot))
            slot += len(desc.block_ids)
        for (x, slot), (desc, want) in zip(xs, descs):
            x.wait(60)
            assert digests(dst, range(slot, slot + len(want)), bn) == want
    finally:
        local.deregister(dst)


def test_several_sources_and_destinations_at_once(medium, fresh_peer, local):
    """A decode worker pulls from several prefill workers, and a prefill worker serves several
    decode workers, at once: two source processes × two destinations (this process and another),
    all four 64 MiB pulls in flight together, every byte right."""
    other, far = Peer(medium), Peer(medium, role="destination")
    try:
        descs = []
        for seed, src in enumerate((fresh_peer, other), 11):
            bid = src.call("raw", 64 * MiB, seed)
            descs.append(src.call("describe", bid, list(range(4)), 16 * MiB, False))
        far.start("pulls", [d for d, _ in descs])  # the other destination pulls both meanwhile
        dsts = [dst_buffer(local, medium, 64 * MiB) for _ in descs]
        try:
            xs = [local.pull(d, dst, range(4)) for (d, _), dst in zip(descs, dsts)]
            for x in xs:
                x.wait(60)
            assert [digests(dst, range(4), 16 * MiB) for dst in dsts] == [want for _, want in descs]
        finally:
            for dst in dsts:
                local.deregister(dst)
        assert far.result("pulls") == [want for _, want in descs]
    finally:
        other.stop()
        far.stop()


def test_tiny_payload(medium, peer, local):
    bid = peer.call("raw", 4 * 8, 2)
    desc, want = peer.call("describe", bid, [2], 8, False)
    dst = dst_buffer(local, medium, 8 * 3)
    try:
        x = local.pull(desc, dst, [1])
        x.wait(30)
        assert digests(dst, [1], 8) == want and x.bytes_done == 8
    finally:
        local.deregister(dst)


def test_empty_pull_is_done_at_once(medium, peer, local):
    bid = peer.call("raw", 4096, 12)
    desc, _ = peer.call("describe", bid, [], 4096, False)
    dst = dst_buffer(local, medium, 4096)
    try:
        x = local.pull(desc, dst, [])
        x.wait(5)
        assert x.state is TransferState.DONE and x.nbytes == 0
    finally:
        local.deregister(dst)


def test_256mib_payload_scattered(medium, big, big_dst, local):
    desc, want = big
    ids = list(reversed(range(len(want))))  # no two blocks coalesce
    x = local.pull(desc, big_dst, ids)
    x.wait(120)
    assert digests(big_dst, ids, BIG_BLOCK) == want


@pytest.mark.parametrize("medium", [pytest.param(m, id=m, marks=gpu) for m in GPU_MEDIA], indirect=True)
def test_cuda_pull_orders_after_the_callers_stream_only(medium, peer, local):
    """On CUDA a pull lands after the work queued on the caller's current stream, and waits for
    no other stream: a decode worker pulls from an idle stream while its engine's steps run on
    the default one."""
    dev = torch.device(MEDIA[medium][3])
    n, block = 8 * MiB, 1 * MiB
    ids = list(range(n // block))
    desc, want = peer.call("describe", peer.call("raw", n, 5), ids, block, False)
    dst = dst_buffer(local, medium, n)
    try:
        # the caller's stream holds a long kernel, then a fill of dst: the pull lands after both
        caller = torch.cuda.Stream(dev)
        with torch.cuda.stream(caller):
            torch.cuda._sleep(SLEEP_CYCLES)
            dst.flat.fill_(0xAB)
            x = local.pull(desc, dst, ids)
        x.wait(60)
        assert digests(dst, ids, block) == want, "the pull landed before the caller's queued fill"

        # the engine's (default) stream is busy; a pull from an idle stream does not wait for it
        dst.flat.zero_()
        torch.cuda.synchronize(dev)
        busy = torch.cuda.default_stream(dev)
        with torch.cuda.stream(busy):
            torch.cuda._sleep(SLEEP_CYCLES)
            busy_done = torch.cuda.Event()
            busy_done.record(busy)
        with torch.cuda.stream(torch.cuda.Stream(dev)):
            y = local.pull(desc, dst, ids)
        y.wait(60)
        assert not busy_done.query(), "the pull waited for the busy default stream"
        torch.cuda.synchronize(dev)
        assert digests(dst, ids, block) == want
    finally:
        torch.cuda.synchronize(dev)
        local.deregister(dst)


def test_abort_mid_transfer(medium, peer, big, big_dst, local):
    desc, want = big
    ids = list(range(len(want)))
    big_dst.flat.zero_()
    x = local.pull(desc, big_dst, ids)
    wait_until(lambda: x.poll().terminal or x.bytes_done > 0, 60)
    x.abort()
    if x.state is TransferState.DONE:  # only a GPU copy can outrun us
        assert medium in GPU_FAST
    else:
        assert x.state is TransferState.FAILED and isinstance(x.error, TransferAbortedError)
        assert not x.error.quarantine
        snap = digests(big_dst, ids, BIG_BLOCK)
        time.sleep(0.2)
        assert digests(big_dst, ids, BIG_BLOCK) == snap, "bytes landed after abort() returned"
    y = local.pull(desc, big_dst, ids)  # the transport is still fine
    y.wait(120)
    assert digests(big_dst, ids, BIG_BLOCK) == want


def test_peer_killed_mid_transfer(medium, fresh_peer, big_dst, local):
    bid = fresh_peer.call("raw", BIG, 3)
    desc, want = fresh_peer.call("describe", bid, list(range(BIG // BIG_BLOCK)), BIG_BLOCK, False)
    pid = fresh_peer.pid
    ids = list(range(len(desc.block_ids)))
    x = local.pull(desc, big_dst, ids)
    wait_until(lambda: x.poll().terminal or x.bytes_done > 0, 60)
    fresh_peer.kill()
    t0 = time.monotonic()
    try:
        x.wait(20)
    except PeerLostError:
        assert x.state is TransferState.FAILED
    else:  # only a GPU medium can move every byte before the kill lands (a two-sided one then
        #    knows it did: its completed receives prove it, however soon the source died after)
        assert medium in GPU_FAST and digests(big_dst, ids, BIG_BLOCK) == want
    assert time.monotonic() - t0 < 20
    y = local.pull(desc, big_dst, ids)  # the dead peer is known: fails at once
    with pytest.raises(PeerLostError):
        y.wait(5)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"lmdisagg-{pid}-")]


def test_destination_killed_mid_transfer(medium, fresh_peer, big_dst, local):
    """A decode worker that dies mid-pull must not wedge its source (a prefill worker serves
    many): the source goes on serving other destinations, and closes with nothing left over."""
    bid = fresh_peer.call("raw", BIG, 5)
    desc, want = fresh_peer.call("describe", bid, list(range(BIG // BIG_BLOCK)), BIG_BLOCK, False)
    doomed = Peer(medium, role="destination")
    try:
        state = doomed.call("pull", desc, timeout=120)  # returns once its first bytes landed
        doomed.kill()
    finally:
        doomed.stop()
    assert state in ("transferring", "done")
    x = local.pull(desc, big_dst, range(len(desc.block_ids)))
    x.wait(60)
    assert x.state is TransferState.DONE and digests(big_dst, range(len(desc.block_ids)), BIG_BLOCK) == want
    left = fresh_peer.call("close", timeout=60)
    if medium in GPU_FAST:  # the peer's CUDA driver threads start lazily and stay: not ours
        left.pop("tasks", None)
    assert left == {}


def test_a_hung_destination_holds_up_no_other(medium, fresh_peer, big_dst, local):
    """A decode worker that stops answering (SIGSTOP) mid-pull must not hold up its source's
    other destinations: this process's pull of the same blocks finishes meanwhile, well within
    the stopped pair's own timeouts."""
    bid = fresh_peer.call("raw", BIG, 6)
    desc, want = fresh_peer.call("describe", bid, list(range(BIG // BIG_BLOCK)), BIG_BLOCK, False)
    ids = range(len(desc.block_ids))
    stuck = Peer(medium, role="destination")
    try:
        stuck.call("pull", desc, timeout=120)  # returns once its first bytes landed
        os.kill(stuck.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            x = local.pull(desc, big_dst, ids)
            x.wait(30)
            took = time.monotonic() - t0
        finally:
            os.kill(stuck.pid, signal.SIGCONT)
    finally:
        stuck.stop()
    assert x.state is TransferState.DONE and digests(big_dst, ids, BIG_BLOCK) == want
    assert took < 5.0, f"the pull took {took:.1f}s behind a stopped destination"
    left = fresh_peer.call("close", timeout=60)
    if medium in GPU_FAST:
        left.pop("tasks", None)
    assert left == {}


def test_hung_peer_never_hangs_the_puller(medium, fresh_peer, local):
    """A stopped (SIGSTOP) source: one-sided media do not need it; the others time out, abort,
    and return within the wait timeout plus the drain bound."""
    bid = fresh_peer.call("raw", 64 * MiB, 4)
    desc, want = fresh_peer.call("describe", bid, list(range(4)), 16 * MiB, False)
    dst = dst_buffer(local, medium, 64 * MiB)
    os.kill(fresh_peer.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        x = local.pull(desc, dst, range(4))
        try:
            x.wait(1.0)
            outcome = "done"
        except TransferTimeoutError:
            outcome = "timeout"
        assert time.monotonic() - t0 < 1.0 + DRAIN_S + 2.0
        if outcome == "done":
            assert medium in ONE_SIDED and digests(dst, range(4), 16 * MiB) == want
        else:
            assert medium not in ONE_SIDED and x.state is TransferState.FAILED
    finally:
        os.kill(fresh_peer.pid, signal.SIGCONT)
    if not (outcome == "timeout" and x.error.quarantine):
        local.deregister(dst)  # a quarantined buffer stays registered: the medium may still write


def test_corrupt_bytes_fail_the_checksum(medium, peer, local):
    bn = 64 << 10
    bid = peer.call("raw", 8 * bn, 5)
    desc, want = peer.call("describe", bid, list(range(8)), bn, True)
    assert len(desc.checksums) == 8
    dst = dst_buffer(local, medium, 8 * bn)
    try:
        local.pull(desc, dst, range(8)).wait(30)
        assert digests(dst, range(8), bn) == want
        peer.call("corrupt", bid, 3 * bn + 17)  # the source block changes after describe
        y = local.pull(desc, dst, range(8))
        with pytest.raises(TransferCorruptError, match="block 3 "):
            y.wait(30)
    finally:
        local.deregister(dst)


def test_truncated_descriptor_fails(medium, peer, local):
    bn = 4096
    bid = peer.call("raw", 4 * bn, 6)
    desc, want = peer.call("describe", bid, [1], bn, False)
    far = (1 << 40) // bn  # 1 TiB in: registered by nobody
    bad = dataclasses.replace(desc, block_ids=(far,),
                              buffer=dataclasses.replace(desc.buffer, nbytes=(far + 1) * bn))
    dst = dst_buffer(local, medium, 2 * bn)
    try:
        x = local.pull(bad, dst, [0])
        with pytest.raises(TransferError):
            x.wait(30)
        assert x.state is TransferState.FAILED
        y = local.pull(desc, dst, [1])  # the transport (and the pair) still work
        y.wait(30)
        assert digests(dst, [1], bn) == want
    finally:
        local.deregister(dst)


def test_close_releases_everything(medium):
    # in a process of its own (close_round.py says why): nothing else there opens fds or threads
    proc = subprocess.Popen([sys.executable, "-m", "tests.transports.close_round", medium], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a hang fails the test, and takes its peer processes with it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    left = json.loads(stdout.strip().splitlines()[-1])
    if medium in GPU_FAST:  # the peer's CUDA driver threads start lazily and stay: not ours
        left["peer"].pop("tasks", None)
    assert left["peer"] == {}  # nothing left in the peer
    assert left["here"] == {}  # nor in the destination
