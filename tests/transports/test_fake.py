"""The fake medium walks the real states and fails on demand."""
from __future__ import annotations

import time

import pytest
import torch

from lmdisagg.transports import TransferCorruptError, TransferError, TransferState, create_transport


def _pair(tx, nbytes=1 << 20):
    src = tx.register(tx.allocate((nbytes,), torch.uint8, "cpu"))
    src.flat.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    dst = tx.register(torch.zeros(nbytes, dtype=torch.uint8))
    return src, dst


def test_states_are_walked_in_order():
    with create_transport("fake", latency_s=0.3, bandwidth_gbps=0.01, piece_nbytes=64 << 10) as tx:
        src, dst = _pair(tx)
        x = tx.pull(tx.describe(src, [0, 1, 2, 3], 256 << 10), dst, [0, 1, 2, 3])
        seen = [x.poll()]
        while not x.poll().terminal:
            if x.state is not seen[-1]:
                seen.append(x.state)
            time.sleep(0.005)
        seen.append(x.state)
        assert seen == [TransferState.PENDING, TransferState.TRANSFERRING, TransferState.DONE]
        assert torch.equal(dst.flat, src.flat)


def test_injected_failure_is_reported():
    with create_transport("fake", fail_prob=1.0) as tx:
        src, dst = _pair(tx)
        x = tx.pull(tx.describe(src, [0], 1 << 20), dst, [0])
        with pytest.raises(TransferError, match="injected failure"):
            x.wait(10)


def test_corruption_is_caught_only_with_checksums():
    with create_transport("fake", corrupt_prob=1.0) as tx:
        src, dst = _pair(tx)
        tx.pull(tx.describe(src, [0], 1 << 20), dst, [0]).wait(10)  # unchecked: silently wrong
        assert not torch.equal(dst.flat, src.flat)
        x = tx.pull(tx.describe(src, [0], 1 << 20, checksum=True), dst, [0])
        with pytest.raises(TransferCorruptError):
            x.wait(10)


def test_wait_timeout_aborts():
    with create_transport("fake", latency_s=30.0) as tx:
        src, dst = _pair(tx)
        x = tx.pull(tx.describe(src, [0], 1 << 20), dst, [0])
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="timed out"):
            x.wait(0.2)
        assert time.monotonic() - t0 < 5 and x.state is TransferState.FAILED
