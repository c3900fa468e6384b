"""Paged decode attention (one query token per sequence), flash-decoding style, with GQA.

    q:            [B, Hq, D]                    the new token of each sequence
    kv_cache:     [num_blocks, L, 2, T, Hkv, D] (lmdisagg.kv.layout); layer ``layer`` is read
    block_tables: [B, max_blocks] int           token j of sequence b: block_tables[b, j // T], row j % T
    ctx_lens:     [B] int                       keys to attend to (0 = padded row: output zeros)
    -> out:       [B, Hq, D]                    softmax(q k^T * scale) v over each sequence's context

Two kernels (the split-K scheme of flash-decoding):

    1. partial:  grid (B, Hkv, num_splits). Program (b, h, s) takes the keys
                 [s * PART, (s + 1) * PART) of sequence b, kv head h, and all G = Hq / Hkv query
                 heads that share it as one [G (padded to 16), D] tile, so K/V are read once per
                 kv head. It walks the keys in tiles of BLOCK_N tokens (each token looks up its
                 block in the table, so any power-of-two T works), keeps an online softmax, and
                 writes its normalized partial output and log-sum-exp (base 2).
    2. reduce:   grid (B, Hq). Merges the splits a sequence really has (ceil(ctx / PART)) by
                 their log-sum-exp.

``num_splits`` only sets the grid: programs past a sequence's context return at once, so a CUDA
graph captured with ``num_splits = ceil(max_model_len / PART)`` serves every context length.
``paged_decode_attention_ref`` is the plain-PyTorch reference. Neither synchronizes the device.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lmdisagg.kernels._paged import attend_tile, reduce_splits

PART = 256      # keys per split
BLOCK_N = 64    # keys per inner tile


def paged_decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                               block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """Gather each sequence's keys, then plain masked softmax attention in fp32."""
    b, hq, d = q.shape
    t, hkv = kv_cache.shape[3], kv_cache.shape[4]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, hq, d, dtype=q.dtype, device=q.device)
    for i in range(b):
        n = int(ctx_lens[i])
        if n == 0:
            continue
        blocks = block_tables[i, :(n + t - 1) // t].long()
        kv = kv_cache[blocks, layer]                                   # [nb, 2, T, Hkv, D]
        k = kv[:, 0].reshape(-1, hkv, d)[:n].float().repeat_interleave(hq // hkv, 1)  # [n, Hq, D]
        v = kv[:, 1].reshape(-1, hkv, d)[:n].float().repeat_interleave(hq // hkv, 1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale                       # [Hq, n]
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def _partial_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, mid_o_ptr, mid_lse_ptr, qk_scale,
                    stride_qb, stride_qh, stride_cb, stride_ckv, stride_ct, stride_ch, stride_tb,
                    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                    T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PART: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    start = s * PART
    if start < ctx:
        end = tl.minimum(start + PART, ctx)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gmask = g < G
        dmask = d < D
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)          # [BLOCK_G, BLOCK_D]
        if UPCAST:  # the CPU interpreter's dot mishandles 16-bit floats
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        head = cache_ptr + h * stride_ch
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, head, tables_ptr + b * stride_tb, n, nmask,
                                        nmask[None, :], d, dmask, qk_scale, stride_cb, stride_ct, stride_ckv,
                                        T, UPCAST, PRECISION)
        o_ptr = mid_o_ptr + b * stride_ob + (h * G + g)[:, None] * stride_oh + s * stride_os + d[None, :]
        tl.store(o_ptr, acc / l_i[:, None], mask=gmask[:, None] & dmask[None, :])
        tl.store(mid_lse_ptr + b * stride_lb + (h * G + g) * stride_lh + s, m_i + tl.log2(l_i), mask=gmask)


def max_splits(max_model_len: int) -> int:
    """Splits that cover any context up to ``max_model_len`` (the grid a CUDA graph captures)."""
    return triton.cdiv(max_model_len, PART)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, num_splits: int,
                           scale: float | None = None, out: torch.Tensor | None = None,
                           split_slots: int | None = None) -> torch.Tensor:
    """Triton version of ``paged_decode_attention_ref``; ``num_splits * PART`` must cover the
    longest context (pass ``max_splits(max_model_len)`` inside CUDA graphs, or
    ``ceil(max(ctx_lens) / PART)`` eagerly). ``out`` may be a strided [B, Hq, D] view.
    ``split_slots`` (>= num_splits) fixes the reduce kernel's width: calls with the same value
    give the same bits whatever their grid (graph-replayed and eager decode agree exactly)."""
    b, hq, d = q.shape
    t, hkv = kv_cache.shape[3], kv_cache.shape[4]
    g = hq // hkv
    assert hq % hkv == 0 and g <= 16 and q.stride(-1) == 1 and kv_cache.is_contiguous()
    assert t & (t - 1) == 0, "block size must be a power of two"
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    splits = max(1, num_splits)
    block_s = max(16, triton.next_power_of_2(max(splits, split_slots or 0)))
    mid_o = torch.empty(b, hq, block_s, d, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(b, hq, block_s, dtype=torch.float32, device=q.device)
    cache = kv_cache[:, layer]  # [NB, 2, T, Hkv, D] view
    interpret = q.device.type == "cpu"
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = triton.next_power_of_2(d)
    _partial_kernel[(b, hkv, splits)](
        q, cache, block_tables, ctx_lens, mid_o, mid_lse, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        block_tables.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        T=t, G=g, D=d, BLOCK_G=16, BLOCK_D=block_d, BLOCK_N=BLOCK_N, PART=PART,
        UPCAST=interpret, PRECISION=precision, num_warps=4, num_stages=2)
    reduce_splits[(b, hq)](
        mid_o, mid_lse, ctx_lens, out, PART,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4)
    return out
