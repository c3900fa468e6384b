"""The Triton KV-cache write equals its PyTorch reference (index_put) on random inputs."""
from __future__ import annotations

import pytest
import torch

from lmdisagg.kernels.kv_write import write_kv, write_kv_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,dim", [(2, 32), (3, 64)])
def test_write_kv_matches_reference(device, dtype, heads, dim):
    g = torch.Generator().manual_seed(heads * 100 + dim)
    nb, layers, t, n = 7, 3, 16, 40
    before = torch.randn(nb, layers, 2, t, heads, dim, generator=g).to(dtype).to(device)
    # a guard block in front of the cache catches writes of skipped rows to block -1
    store = torch.cat([torch.zeros_like(before[:1]), before])
    cache, ref = store[1:], before.clone()
    # k, v as strided slices of one fused projection output, like the model's qkv split
    qkv = torch.randn(n, 6 * heads * dim, generator=g).to(dtype).to(device)
    k = qkv[:, 4 * heads * dim:5 * heads * dim].view(n, heads, dim)
    v = qkv[:, 5 * heads * dim:].view(n, heads, dim)
    slots = torch.randperm(nb * t, generator=g)[:n]
    blocks, offsets = (slots // t).to(torch.int32), (slots % t).to(torch.int32)
    blocks[::7] = -1  # padded rows of a graph batch: no slot
    blocks, offsets = blocks.to(device), offsets.to(device)

    write_kv(cache, 1, k, v, blocks, offsets)
    write_kv_ref(ref, 1, k, v, blocks, offsets)

    assert torch.equal(cache, ref)
    keep = blocks >= 0
    assert torch.equal(cache[blocks[keep].long(), 1, 0, offsets[keep].long()], k[keep])
    assert torch.equal(cache[blocks[keep].long(), 1, 1, offsets[keep].long()], v[keep])
    changed = (cache != before).flatten(2).any(-1)            # [nb, layers]
    assert not changed[:, [0, 2]].any()                       # other layers untouched
    assert not store[0].any()                                 # skipped rows wrote nothing
