"""Rotary position embedding in place, HF's rotate-half convention, q and k heads together.

    x:   [N, H, D]  (a strided view is fine: the q and k heads of the fused qkv output)
    cos, sin: [N, D] (or [N, 1, D])
    x <- x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin

Computed in fp32 and rounded once. One Triton program per token, all its heads. ``rope_ref``
is the plain-PyTorch reference (out of place).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf, c, s = x.float(), cos.float().reshape(x.shape[0], 1, -1), sin.float().reshape(x.shape[0], 1, -1)
    rot = torch.cat((-xf[..., half:], xf[..., :half]), -1)
    return (xf * c + rot * s).to(x.dtype)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_xn, stride_xh, stride_c, stride_s,
                 H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < H) & (d[None, :] < HALF)
    p1 = x_ptr + n * stride_xn + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + n * stride_c + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + n * stride_c + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + n * stride_s + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + n * stride_s + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    ty = x_ptr.dtype.element_ty
    tl.store(p1, (x1 * c1 - x2 * s1).to(ty), mask=mask)
    tl.store(p1 + HALF, (x2 * c2 + x1 * s2).to(ty), mask=mask)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton, in place: ``x`` becomes ``rope_ref(x, cos, sin)``; returns ``x``."""
    n, h, d = x.shape
    assert x.stride(-1) == 1 and d % 2 == 0
    cos, sin = cos.reshape(n, d), sin.reshape(n, d)
    if n:
        _rope_kernel[(n,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                           H=h, HALF=d // 2, BLOCK_H=triton.next_power_of_2(h),
                           BLOCK_D=triton.next_power_of_2(d // 2), num_warps=4)
    return x
