"""The nccl transport's windows: pulls cut into many small windows, a pair keeping a few in flight
across concurrent pulls (posted by the pulling thread or the link thread), an abort among them."""
from __future__ import annotations

import pytest
import torch

from lmdisagg.transports import TransferAbortedError, TransferState, create_transport
from tests.transports.conftest import MEDIA, Peer, gpu, need_devices, side_options

MiB = 1 << 20
PULL, BLOCK = 4 * MiB, 512 << 10  # 8 blocks a pull, 16 windows of 256 KiB


@pytest.fixture(scope="module", params=[pytest.param("nccl-gloo", id="gloo"),
                                        pytest.param("nccl-cuda", id="cuda", marks=gpu)])
def pair(request):
    medium = request.param
    _, _, src_dev, dst_dev = MEDIA[medium]
    need_devices(src_dev, dst_dev)

    def opts(device):
        return {**side_options(medium, device), "window_nbytes": 256 << 10, "windows_in_flight": 2}
    peer = Peer(medium, opts(src_dev))
    local = create_transport("nccl", **opts(dst_dev))
    bid = peer.call("raw", PULL, 11)
    desc, want = peer.call("describe", bid, list(range(PULL // BLOCK)), BLOCK, False)
    dst = local.register(torch.zeros(6 * PULL, dtype=torch.uint8, device=dst_dev))
    yield local, desc, want, dst
    local.close()
    peer.stop()


def blocks(i: int) -> list[int]:
    n = PULL // BLOCK
    return list(range(i * n, (i + 1) * n))


def digests(dst, ids):
    from lmdisagg.transports._blocks import block_checksums
    return list(block_checksums(dst.flat, ids, BLOCK))


def test_concurrent_multi_window_pulls(pair):
    local, desc, want, dst = pair
    dst.flat.zero_()
    xs = [local.pull(desc, dst, blocks(i)) for i in range(5)]  # 80 windows, 2 in flight
    for i, x in enumerate(xs):
        x.wait(60)
        assert x.state is TransferState.DONE and x.bytes_done == PULL
        assert digests(dst, blocks(i)) == want, f"pull {i} landed wrong bytes"


def test_abort_among_queued_pulls(pair):
    local, desc, want, dst = pair
    dst.flat.zero_()
    xs = [local.pull(desc, dst, blocks(i)) for i in range(3)]
    xs[1].abort()  # queued behind the first pull's windows, or partly posted: drained, then FAILED
    assert xs[1].state is TransferState.FAILED
    with pytest.raises(TransferAbortedError):
        xs[1].wait(1)
    for i in (0, 2):
        xs[i].wait(60)
        assert digests(dst, blocks(i)) == want, f"pull {i} landed wrong bytes next to an aborted one"
    after = local.pull(desc, dst, blocks(3))  # the pair is still good
    after.wait(60)
    assert digests(dst, blocks(3)) == want


def test_runtime_and_window_options_are_checked():
    from lmdisagg.transports import TransferError
    with pytest.raises(TransferError, match="needs backend 'nccl' and cupy"):
        create_transport("nccl", backend="gloo", runtime="cupy")  # gloo has no cupy path
    with pytest.raises(TransferError, match="runtime must be"):
        create_transport("nccl", backend="gloo", runtime="nvshmem")
    with pytest.raises(TransferError, match="windows_in_flight"):
        create_transport("nccl", backend="gloo", windows_in_flight=0)
    tx = create_transport("nccl", backend="gloo", runtime="auto")
    try:
        assert tx.runtime == "torch"  # CPU buffers move over a torch gloo group
    finally:
        tx.close()


def test_a_source_on_this_host_is_asked_over_its_unix_socket(pair):
    """The control connection (each window's request) to a source process on this host is a Unix
    socket, not loopback TCP."""
    import socket
    local, desc, want, dst = pair
    x = local.pull(desc, dst, blocks(0))
    x.wait(60)
    assert digests(dst, blocks(0)) == want
    assert x.link.ch.sock.family == socket.AF_UNIX


def test_a_unix_socket_is_found_by_the_name_in_the_address_not_by_pid_and_port():
    """The Unix socket's name is random and travels in the source's address: a process that
    shares the source's pid and port (in another network namespace of a host with the same name)
    cannot answer for it. Here an impostor listens on the name that pid and port gave before,
    and a new destination still reaches the source, over its Unix socket."""
    import socket
    peer = Peer("nccl-gloo", side_options("nccl-gloo", "cpu"))
    local = create_transport("nccl", **side_options("nccl-gloo", "cpu"))
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bid = peer.call("raw", PULL, 5)
        desc, want = peer.call("describe", bid, list(range(PULL // BLOCK)), BLOCK, False)
        host, ctl, store, token = desc.buffer.address.rsplit(":", 3)
        assert len(token) == 16
        impostor.bind(f"\0lmdisagg-ctl-{desc.buffer.pid}-{ctl}")  # free: the source is not listening there
        impostor.listen()
        impostor.settimeout(0.2)
        dst = local.register(torch.zeros(PULL, dtype=torch.uint8))
        x = local.pull(desc, dst, blocks(0))
        x.wait(60)
        assert digests(dst, blocks(0)) == want
        assert x.link.ch.sock.family == socket.AF_UNIX
        with pytest.raises(TimeoutError):
            impostor.accept()  # nobody knocked there
    finally:
        impostor.close()
        local.close()
        peer.stop()


def test_a_peer_without_a_unix_socket_is_reached_over_tcp():
    """Where the peer's Unix socket cannot be reached (another network namespace, or none), the
    channel connects over TCP."""
    import secrets
    import socket
    import threading

    from lmdisagg.transports._wire import Channel, local_name
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = []

    def answer():
        conn, _ = server.accept()
        ch = Channel(conn)
        got.append(ch.recv(timeout=10))
        ch.send({"op": "pong"})
        ch.close()
    th = threading.Thread(target=answer)
    th.start()
    ch = Channel.connect("127.0.0.1", port, 10, local_name(secrets.token_hex(8)))  # no one listens there
    try:
        assert ch.sock.family == socket.AF_INET
        ch.send({"op": "ping"})
        assert ch.recv(timeout=10) == {"op": "pong"}
    finally:
        ch.close()
        th.join(10)
        server.close()
    assert got == [{"op": "ping"}]
