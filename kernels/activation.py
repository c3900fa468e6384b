"""SwiGLU activation: silu(gate) * up over the fused gate_up projection, in one pass.

    gate_up: [N, 2 * I]  (gate = [:, :I], up = [:, I:])  ->  [N, I]

Computed in fp32 and rounded once (HF rounds silu(gate) to the dtype first). One Triton program
per (row, BLOCK columns). ``silu_and_mul_ref`` is the plain-PyTorch reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, -1)
    return (F.silu(gate) * up).to(gate_up.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton version of ``silu_and_mul_ref``; gate_up: [N, 2 * I], last dim contiguous."""
    n, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty(n, i, dtype=gate_up.dtype, device=gate_up.device)
    if n:
        _silu_and_mul_kernel[(n, triton.cdiv(i, BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0),
                                                         I=i, BLOCK=BLOCK, num_warps=4)
    return out
