"""Block ids → byte runs, and per-block checksums. Transports move bytes; this is all they know
of the cache: a registered buffer is ``[num_blocks, block_nbytes]`` bytes, block b at offset
``b * block_nbytes`` (lmdisagg/kv/layout.py).
"""
from __future__ import annotations

import operator
from typing import Iterator, Sequence

import numpy as np

from lmdisagg.transports.transfer import TransferError


def byte_runs(src_blocks: Sequence[int], dst_blocks: Sequence[int],
              block_nbytes: int) -> list[tuple[int, int, int]]:
    """Coalesce block pairs into ``(src_offset, dst_offset, nbytes)`` runs: consecutive source
    blocks that land on consecutive destination blocks become one copy. Two unbroken ranges (a
    prompt's blocks in a fresh pool) are one comparison each; other long lists are vectorized (a
    pull of hundreds of blocks must cost microseconds); short ones skip numpy's fixed cost."""
    n = len(src_blocks)
    if n > 8:
        s0, d0 = src_blocks[0], dst_blocks[0]
        if tuple(src_blocks) == tuple(range(s0, s0 + n)) and tuple(dst_blocks) == tuple(range(d0, d0 + n)):
            return [(s0 * block_nbytes, d0 * block_nbytes, n * block_nbytes)]
    if n > 64:
        s = np.asarray(src_blocks, dtype=np.int64)
        d = np.asarray(dst_blocks, dtype=np.int64)
        cut = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1  # a run starts after each cut
        starts = np.concatenate(([0], cut))
        lengths = np.diff(np.concatenate((starts, [s.size])))
        return list(zip((s[starts] * block_nbytes).tolist(), (d[starts] * block_nbytes).tolist(),
                        (lengths * block_nbytes).tolist()))
    runs: list[list[int]] = []
    prev = None
    for s, d in zip(src_blocks, dst_blocks):
        if prev is not None and s == prev[0] + 1 and d == prev[1] + 1:
            runs[-1][2] += block_nbytes
        else:
            runs.append([s * block_nbytes, d * block_nbytes, block_nbytes])
        prev = (s, d)
    return [tuple(r) for r in runs]


def check_blocks(ids: Sequence[int], block_nbytes: int, nbytes: int, what: str) -> tuple[int, ...]:
    """``ids`` as a tuple of ints, each a whole block inside an ``nbytes`` buffer (else TransferError)."""
    if block_nbytes <= 0:
        raise TransferError(f"{what}: block_nbytes must be positive")
    ids = ids if type(ids) is tuple else tuple(ids)
    if not ids:
        return ids
    # one unbroken range (a prompt's blocks in a fresh pool) takes one comparison: each id then
    # equals an int of the range, and those ints are kept
    lo, n = ids[0], len(ids)
    whole = tuple(range(lo, lo + n)) if n > 8 and type(lo) is int else None
    if whole is not None and ids == whole:
        ids, hi = whole, whole[-1]
    else:
        if not set(map(type, ids)) <= {int}:  # numpy integers and the like: plain ints
            try:
                ids = tuple(map(operator.index, ids))
            except TypeError:
                raise TransferError(f"{what}: block ids must be integers") from None
        lo, hi = min(ids), max(ids)
    if lo < 0 or (hi + 1) * block_nbytes > nbytes:
        bad = lo if lo < 0 else hi
        raise TransferError(f"{what}: block {bad} of {block_nbytes} bytes lies outside the "
                            f"{nbytes}-byte buffer")
    return ids


def split_runs(runs: Sequence[tuple[int, int, int]], piece_nbytes: int) -> Iterator[tuple[int, int, int]]:
    """Cut runs into pieces of at most ``piece_nbytes`` (the unit of progress and of abort)."""
    for s, d, n in runs:
        for off in range(0, n, piece_nbytes):
            yield s + off, d + off, min(piece_nbytes, n - off)


def windows(pieces: Sequence[tuple[int, int, int]], window_nbytes: int) -> Iterator[list[tuple[int, int, int]]]:
    """Group pieces into windows of about ``window_nbytes`` (two-sided media request per window)."""
    win: list[tuple[int, int, int]] = []
    size = 0
    for p in pieces:
        if win and size + p[2] > window_nbytes:
            yield win
            win, size = [], 0
        win.append(p)
        size += p[2]
    if win:
        yield win


def block_checksums(flat_u8, block_ids: Sequence[int], block_nbytes: int) -> tuple[int, ...]:
    """xxh3_64 of each block of a flat uint8 tensor (CPU or CUDA; CUDA blocks are copied to host)."""
    import xxhash
    out = []
    for b in block_ids:
        view = flat_u8[b * block_nbytes:(b + 1) * block_nbytes]
        if view.device.type != "cpu":
            view = view.cpu()
        out.append(xxhash.xxh3_64_intdigest(view.numpy().data))
    return tuple(out)
