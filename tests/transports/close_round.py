"""The leak check of the contract suite, run in a process of its own (``python -m
tests.transports.close_round MEDIUM``): a destination transport pulls from a source peer (and
takes a push, where the medium pushes), is closed with a pull in flight (and an expectation
open), and must leave nothing behind, here or in the peer.

It runs apart from the test process because that process also holds whatever earlier tests
left running (a Ray client's threads, HTTP and Redis connection pools), which may open a socket
in the middle of the check and be taken for the transport's leak. Here nothing else runs, so
every thread, fd, port or segment left over is the transport's. Prints one JSON line:
``{"peer": what the peer held after its close, "here": what this process held}``."""
from __future__ import annotations

import gc
import json
import sys

import pytest
import torch

from lmdisagg.transports import TransferError, create_transport
from lmdisagg.transports._blocks import block_checksums
from tests.transports import leaks
from tests.transports.conftest import MEDIA, Peer, side_options

MiB = 1 << 20


def use_and_close(medium: str) -> dict:
    """A peer and a transport; transfers (one in flight at close); both closed. Returns what the
    peer still held after its close."""
    name, _, _, dst_dev = MEDIA[medium]
    p = Peer(medium)
    tx = create_transport(name, **side_options(medium, dst_dev))
    bid = p.call("raw", 32 * MiB, 8)
    desc, want = p.call("describe", bid, list(range(8)), 4 * MiB, False)
    dst = tx.register(tx.allocate((32 * MiB,), torch.uint8, dst_dev))
    x = tx.pull(desc, dst, range(8))
    x.wait(60)
    assert list(block_checksums(dst.flat, list(range(8)), 4 * MiB)) == want
    y = tx.pull(desc, dst, range(8))
    pending = []
    if tx.supports_push:  # a push pair too: one push done, one expectation left open at close
        src = p.call("bufdesc", bid)
        z = tx.expect(src, dst, range(8), 4 * MiB)
        assert p.call("push", bid, z.ticket.pack(), list(range(8)), True) == "done"
        z.wait(60)
        pending.append(tx.expect(src, dst, range(8), 4 * MiB))
    tx.close()  # aborts whatever is in flight
    assert y.state.terminal and all(z.state.terminal for z in pending)
    with pytest.raises(TransferError):
        tx.pull(desc, dst, range(8))
    left = p.call("close")
    p.stop()
    return left


def main(medium: str) -> None:
    # one round first: process-wide state that starts on first use and stays (multiprocessing's
    # resource tracker, CUDA driver threads, library pools) is not the transport's
    use_and_close(medium)
    gc.collect()
    before = leaks.snapshot()
    peer = use_and_close(medium)
    print(json.dumps({"peer": peer, "here": leaks.left_over(before)}))


if __name__ == "__main__":
    main(sys.argv[1])
