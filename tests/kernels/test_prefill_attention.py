"""The Triton paged prefill attention equals its PyTorch reference and plain causal attention."""
from __future__ import annotations

import math

import pytest
import torch

from lmdisagg.kernels.prefill_attention import (
    make_tiles, paged_prefill_attention, paged_prefill_attention_ref, split_size, tile_tokens,
)


def random_case(device, dtype, hq, hkv, d, t, seqs, seed, pad_rows=0, pad_tiles=0):
    """seqs: [(cached, new)] -> q, cache, block tables, tiles, token lens (new tokens of every
    sequence, back to back, then ``pad_rows`` padding rows)."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-(c + n) // t) for c, n in seqs)
    nb = len(seqs) * width + 3
    cache = torch.randn(nb, 2, 2, t, hkv, d, generator=g).to(dtype).to(device)
    perm = torch.randperm(nb, generator=g)[:len(seqs) * width].view(len(seqs), width)  # shuffled blocks
    tables = perm.to(torch.int32).to(device)
    rows, lens, row = [], [], 0
    for c, n in seqs:
        rows.append((row, n, c))
        lens += list(range(c + 1, c + n + 1))
        row += n
    tiles = make_tiles(rows, tile_tokens(hq, hkv, dtype)) + [(0, 0, 0, 0)] * pad_tiles
    q = torch.randn(row + pad_rows, hq, d, generator=g).to(dtype).to(device)
    return (q, cache, tables, torch.tensor(tiles, dtype=torch.int64, device=device),
            torch.tensor(lens + [0] * pad_rows, dtype=torch.int64, device=device))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hkv,d,t", [(9, 3, 64, 16), (8, 2, 32, 32), (4, 4, 16, 64)])
def test_prefill_attention_matches_reference(device, dtype, atol, hq, hkv, d, t):
    # a prompt from scratch, a suffix after a cached prefix that crosses a split, one token after
    # a prefix, and padding rows / tiles as a graph bucket has them
    max_len = 2 * 1024 + 200
    seqs = [(0, 37), (1024 + 70, 21), (5, 1)]
    q, cache, tables, tiles, lens = random_case(device, dtype, hq, hkv, d, t, seqs, seed=hq * d + t,
                                                pad_rows=5, pad_tiles=2)
    ref = paged_prefill_attention_ref(q, cache, 1, tables, tiles, lens)
    out = paged_prefill_attention(q, cache, 1, tables, tiles, lens, max_len)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)
    assert torch.all(out[-5:] == 0)                      # padded rows
    assert split_size(max_len) == 1024                   # the second sequence really spans 2 splits


def test_reference_is_causal_softmax_attention(device):
    """The reference against dense causal attention of one contiguous sequence (no prefix)."""
    q, cache, tables, tiles, lens = random_case(device, torch.float32, 4, 2, 16, 8, [(0, 20)], seed=5)
    out = paged_prefill_attention_ref(q, cache, 0, tables, tiles, lens)
    blocks = tables[0, :3].long()
    k = cache[blocks, 0, 0].reshape(-1, 2, 16)[:20]
    v = cache[blocks, 0, 1].reshape(-1, 2, 16)[:20]
    for i in (0, 7, 19):
        for h in range(4):
            s = (k[:i + 1, h // 2] @ q[i, h]) / math.sqrt(16)
            torch.testing.assert_close(out[i, h], torch.softmax(s, 0) @ v[:i + 1, h // 2])


def test_prefill_attention_writes_into_strided_out(device):
    q, cache, tables, tiles, lens = random_case(device, torch.float32, 8, 2, 32, 16, [(3, 30)], seed=9)
    buf = torch.full((30, 8 * 32 + 7), 7.0, device=device)
    out = buf[:, :8 * 32].view(30, 8, 32)
    paged_prefill_attention(q, cache, 0, tables, tiles, lens, 64, out=out)
    torch.testing.assert_close(out, paged_prefill_attention_ref(q, cache, 0, tables, tiles, lens), atol=2e-5, rtol=0)
    assert torch.all(buf[:, 8 * 32:] == 7.0)
