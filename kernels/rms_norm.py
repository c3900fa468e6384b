"""Fused residual add + RMSNorm, HF's Llama numerics in one pass over the row.

    rms_norm(x, w)               -> w * (x * rsqrt(mean(x^2) + eps))
    add_rms_norm(x, res, w)      -> (w * norm(x + res), x + res)

As in HF, the residual sum is rounded to the input dtype before it is normalized, and the
normalized row is rounded to the input dtype before the weight multiplies it; statistics are in
fp32. One Triton program per row. The model uses these on CUDA for 16-bit dtypes (fp32 keeps
PyTorch's ops, matching HF bit for bit); ``*_ref`` are the plain-PyTorch references.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [N, H] -> [N, H]
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    # x, residual: [N, H] -> (normed [N, H], x + residual [N, H])
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                     eps, H: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    # arithmetic in fp32, rounded to the dtype where HF rounds (a product or sum of two 16-bit
    # values rounded once from fp32 is what a 16-bit op gives)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    ty = x.dtype
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / H
    normed = (xf * tl.rsqrt(var + eps)).to(ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps):
    n, h = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    r = residual if residual is not None else x
    block = triton.next_power_of_2(h)
    if n:
        _rms_norm_kernel[(n,)](x, r, weight, out, res_out, x.stride(0), r.stride(0), out.stride(0),
                               res_out.stride(0), eps, H=h, BLOCK=block, HAS_RES=residual is not None,
                               num_warps=min(16, max(1, block // 256)))
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton version of ``rms_norm_ref``; x: [N, H] with a contiguous last dim."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Triton version of ``add_rms_norm_ref``."""
    return _launch(x, residual, weight, eps)
