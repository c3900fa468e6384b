"""Fused RMSNorm (+ residual add), SwiGLU activation and in-place RoPE equal their references."""
from __future__ import annotations

import pytest
import torch

from lmdisagg.kernels.activation import silu_and_mul, silu_and_mul_ref
from lmdisagg.kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from lmdisagg.kernels.rope import rope_, rope_ref

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def rand(*shape, dtype, device, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576])
def test_rms_norm(device, dtype, tol, hidden):
    x = rand(7, hidden, dtype=dtype, device=device, seed=1)
    r = rand(7, hidden, dtype=dtype, device=device, seed=2)
    w = rand(hidden, dtype=dtype, device=device, seed=3)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), atol=tol, rtol=tol)
    out, res = add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_res = add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(res, ref_res, atol=tol, rtol=tol)  # interpreter: 1-ulp bf16 rounding
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_silu_and_mul(device, dtype, tol):
    x = rand(5, 2 * 1536, dtype=dtype, device=device, seed=4) * 3
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 2, 16)])
def test_rope_in_place_on_qkv_view(device, dtype, tol, heads, kv_heads, dim):
    n = 6
    qkv = rand(n, (heads + 2 * kv_heads) * dim, dtype=dtype, device=device, seed=5).view(n, -1, dim)
    before = qkv.clone()
    pos = torch.arange(n, device=device).float()[:, None] * torch.rand(dim // 2, generator=torch.Generator().manual_seed(6)).to(device)
    emb = torch.cat((pos, pos), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    qk = qkv[:, :heads + kv_heads]
    ref = rope_ref(qk, cos, sin)
    assert rope_(qk, cos, sin) is qk
    torch.testing.assert_close(qkv[:, :heads + kv_heads], ref, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, heads + kv_heads:], before[:, heads + kv_heads:])   # v untouched
