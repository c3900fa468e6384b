"""KV-cache write: scatter each new token's K and V into its slot of the paged cache.

    kv_cache: [num_blocks, L, 2, T, H_kv, D]     (lmdisagg.kv.layout)
    token i -> kv_cache[slot_blocks[i], layer, 0 / 1, slot_offsets[i]] = k[i] / v[i]

A negative ``slot_blocks[i]`` means "no slot" (a padded row of a CUDA-graph batch) and is
skipped. ``write_kv`` is the Triton kernel (one program per token); ``write_kv_ref`` is the
plain-PyTorch reference it is tested against. Both are called by the attention backend once per
layer, from the step-loop thread; neither synchronizes the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def write_kv_ref(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    # k, v: [N, H_kv, D]; slot_blocks, slot_offsets: [N] integer
    keep = slot_blocks >= 0
    if not bool(keep.all()):
        k, v, slot_blocks, slot_offsets = k[keep], v[keep], slot_blocks[keep], slot_offsets[keep]
    idx = (slot_blocks.long(), slot_offsets.long())
    kv_cache[:, layer, 0].index_put_(idx, k)
    kv_cache[:, layer, 1].index_put_(idx, v)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, blocks_ptr, offsets_ptr,
                     stride_kn, stride_kh, stride_vn, stride_vh,
                     stride_cb, stride_ckv, stride_ct, stride_ch,
                     H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    blk = tl.load(blocks_ptr + i).to(tl.int64)
    if blk >= 0:
        off = tl.load(offsets_ptr + i).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < H) & (d[None, :] < D)
        k = tl.load(k_ptr + i * stride_kn + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + i * stride_vn + h[:, None] * stride_vh + d[None, :], mask=mask)
        dst = cache_ptr + blk * stride_cb + off * stride_ct + h[:, None] * stride_ch + d[None, :]
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             slot_blocks: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Triton version of ``write_kv_ref`` (same contract). ``k``/``v`` may be strided views (e.g.
    slices of the fused qkv output) as long as their last dim is contiguous."""
    n, h, d = k.shape
    if n == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.is_contiguous()
    cache = kv_cache[:, layer]  # [NB, 2, T, H, D] view: the kernel gets its base pointer
    _write_kv_kernel[(n,)](
        k, v, cache, slot_blocks, slot_offsets,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        H=h, D=d, BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d),
        num_warps=1 if h * d <= 512 else 4)
