"""Block lists: validation (typed errors for misuse) and coalescing into byte runs, whose fast
paths (unbroken ranges, long lists through numpy) must give what a plain pairwise walk gives."""
from __future__ import annotations

import random

import numpy as np
import pytest

from lmdisagg.transports import TransferError
from lmdisagg.transports._blocks import byte_runs, check_blocks


def walk(src, dst, nbytes):
    runs = []
    for s, d in zip(src, dst):
        if runs and s * nbytes == runs[-1][0] + runs[-1][2] and d * nbytes == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += nbytes
        else:
            runs.append([s * nbytes, d * nbytes, nbytes])
    return [tuple(r) for r in runs]


@pytest.mark.parametrize("n", [1, 5, 9, 64, 65, 300])
def test_byte_runs_equal_a_plain_walk(n):
    rng = random.Random(n)
    cases = [(list(range(3, 3 + n)), list(range(40, 40 + n)))]                # one unbroken run
    broken = list(range(n))
    broken[n // 2] += 1000                                                     # one break in the middle
    cases.append((broken, list(range(n))))
    cases.append((rng.sample(range(4 * n), n), rng.sample(range(4 * n), n)))  # scattered
    for src, dst in cases:
        assert byte_runs(tuple(src), tuple(dst), 16) == walk(src, dst, 16)


def test_check_blocks():
    assert check_blocks([0, 3], 8, 64, "x") == (0, 3)
    assert check_blocks(np.arange(3), 8, 64, "x") == (0, 1, 2)      # numpy integers become ints
    assert all(type(i) is int for i in check_blocks(np.arange(3), 8, 64, "x"))
    for bad, match in (([8], "outside"), ([-1], "outside"), ([1.5], "integers"), (["1"], "integers")):
        with pytest.raises(TransferError, match=match):
            check_blocks(bad, 8, 64, "x")
    with pytest.raises(TransferError, match="positive"):
        check_blocks([0], 0, 64, "x")


def test_check_blocks_of_long_lists():
    """Long unbroken ranges take a shortcut; it must accept and refuse what the general path does."""
    assert check_blocks(list(range(4, 20)), 8, 160, "x") == tuple(range(4, 20))
    mixed = [4] + [np.int64(i) for i in range(5, 20)]                  # equal to the range, numpy ids
    assert all(type(i) is int for i in check_blocks(mixed, 8, 160, "x"))
    assert check_blocks([0, 2] + list(range(3, 12)), 8, 160, "x") == (0, 2, *range(3, 12))   # broken
    for bad, match in ((list(range(5, 21)), "block 20 .*outside"), (list(range(-1, 15)), "block -1 .*outside"),
                       (list(range(9)) + [2.5], "integers"), (list(range(9)) + [99], "block 99 .*outside")):
        with pytest.raises(TransferError, match=match):
            check_blocks(bad, 8, 160, "x")
