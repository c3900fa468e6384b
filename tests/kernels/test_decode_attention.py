"""The Triton paged decode attention equals its PyTorch reference on random paged caches."""
from __future__ import annotations

import math

import pytest
import torch

from lmdisagg.kernels.decode_attention import PART, max_splits, paged_decode_attention, paged_decode_attention_ref


def random_case(device, dtype, hq, hkv, d, t, ctx_lens, seed):
    g = torch.Generator().manual_seed(seed)
    width = max(1, max(-(-n // t) for n in ctx_lens))
    layers, nb = 2, len(ctx_lens) * width + 3
    cache = torch.randn(nb, layers, 2, t, hkv, d, generator=g).to(dtype).to(device)
    # each sequence gets distinct, shuffled blocks (a real block table is not in order)
    perm = torch.randperm(nb, generator=g)[:len(ctx_lens) * width].view(len(ctx_lens), width)
    tables = perm.to(torch.int32).to(device)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    q = torch.randn(len(ctx_lens), hq, d, generator=g).to(dtype).to(device)
    return q, cache, tables, lens


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hkv,d,t", [(9, 3, 64, 16), (8, 2, 128, 32), (4, 4, 32, 64)])
def test_decode_attention_matches_reference(device, dtype, atol, hq, hkv, d, t):
    ctx = [1, 37, PART + 5, 0, 2 * PART + 63]     # 0 = a padded row of a graph batch
    q, cache, tables, lens = random_case(device, dtype, hq, hkv, d, t, ctx, seed=hq * d + t)
    ref = paged_decode_attention_ref(q, cache, 1, tables, lens)
    exact_splits = -(-max(ctx) // PART)
    for splits in (exact_splits, max_splits(4 * PART)):   # eager grid, and a graph's larger grid
        out = paged_decode_attention(q, cache, 1, tables, lens, splits)
        assert out.dtype == q.dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)
    assert torch.all(out[3] == 0)
    # a graph's larger grid and an eager grid agree bit for bit at one reduce width
    wide = paged_decode_attention(q, cache, 1, tables, lens, max_splits(8 * PART), split_slots=64)
    assert torch.equal(wide, paged_decode_attention(q, cache, 1, tables, lens, exact_splits, split_slots=64))


def test_reference_is_softmax_attention(device):
    """The reference itself against a dense computation on one contiguous sequence."""
    q, cache, tables, lens = random_case(device, torch.float32, 4, 2, 16, 8, [20], seed=5)
    out = paged_decode_attention_ref(q, cache, 0, tables, lens)
    blocks = tables[0, :3].long()
    k = cache[blocks, 0, 0].reshape(-1, 2, 16)[:20]
    v = cache[blocks, 0, 1].reshape(-1, 2, 16)[:20]
    for h in range(4):
        s = (k[:, h // 2] @ q[0, h]) / math.sqrt(16)
        torch.testing.assert_close(out[0, h], torch.softmax(s, 0) @ v[:, h // 2])


def test_decode_attention_writes_into_strided_out(device):
    q, cache, tables, lens = random_case(device, torch.float32, 8, 2, 32, 16, [50, 3], seed=9)
    buf = torch.full((2, 8 * 32 + 7), 7.0, device=device)
    out = buf[:, :8 * 32].view(2, 8, 32)
    paged_decode_attention(q, cache, 0, tables, lens, 1, out=out)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, cache, 0, tables, lens), atol=2e-5, rtol=0)
    assert torch.all(buf[:, 8 * 32:] == 7.0)
