"""Paged prefill attention: the new tokens of prefill sequences attend, causally, to their whole
context read from the paged cache (a cached prefix and the new tokens, written there just before),
with GQA. Every tensor it reads describes the step, none its shape: a CUDA graph captured once
per token bucket serves any mix of prompts and cached prefixes (lmdisagg.engine.cuda_graphs).

    q:            [N, Hq, D]                    the step's new tokens
    kv_cache:     [num_blocks, L, 2, T, Hkv, D] (lmdisagg.kv.layout); layer ``layer`` is read
    block_tables: [S, max_blocks] int           token j of sequence s: block_tables[s, j // T], row j % T
    tiles:        [max_tiles, 4] int            (sequence row, first row of q, rows, position of
                                                that first row); a tile's rows are consecutive
                                                tokens of one sequence, at most
                                                tile_tokens(Hq, Hkv, q.dtype);
                                                rows = 0: a padding tile (does nothing)
    token_lens:   [N] int                       keys each row attends to: its position + 1
                                                (0 = a padded row: output zeros)
    -> out:       [N, Hq, D]

Two kernels (split-K, as in flash-decoding, so a short suffix over a long prefix fills the GPU):

    1. partial:  grid (max_tiles, Hkv, num_splits). Program (i, h, s) takes tile i's tokens and the
                 G query heads of kv head h as one [tokens * G, D] tile of rows, and the keys
                 [s * split, (s + 1) * split) up to the tile's last position, in tiles of
                 BLOCK_N tokens looked up in the block table; row r sees key j iff j <= its
                 position. Writes its normalized partial output and log-sum-exp (base 2).
    2. reduce:   grid (N, Hq). Merges the ceil(len / split) splits a row has.

``paged_prefill_attention_ref`` is the plain-PyTorch reference. Neither synchronizes the device.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lmdisagg.kernels._paged import attend_tile, reduce_splits

ROWS = 64        # (token, head) rows per program (2-byte floats; half as many for fp32)
BLOCK_N = 64     # keys per inner tile (2-byte floats; half as many for fp32)
MIN_SPLIT = 1024  # keys per split, at least
MAX_SPLITS = 16   # splits per row, at most (bounds the partial buffers of long contexts)


def _wide(dtype: torch.dtype | None) -> bool:
    """fp32 tiles take twice the registers of 16-bit ones and get no tensor cores: at the 16-bit
    tile sizes they spill (an H100 probe: 3.7-36 ms per layer against 0.2-4.4 ms with half the rows
    and keys, at SmolLM2 and Llama-3-8B head shapes), so fp32 programs take half of each."""
    return dtype is not None and dtype.itemsize > 2


def tile_tokens(hq: int, hkv: int, dtype: torch.dtype | None = None) -> int:
    """Tokens per tile for queries of ``dtype``: a program holds ROWS (token, query head) rows
    (ROWS // 2 in fp32). The tiles a kernel call gets must be made with the same dtype."""
    rows = ROWS // 2 if _wide(dtype) else ROWS
    return max(1, rows // triton.next_power_of_2(hq // hkv))


def split_size(max_model_len: int) -> int:
    """Keys per split for contexts up to ``max_model_len``: at most MAX_SPLITS splits."""
    return max(MIN_SPLIT, triton.next_power_of_2(-(-max_model_len // MAX_SPLITS)))


def make_tiles(seqs: list[tuple[int, int, int]], tokens: int) -> list[tuple[int, int, int, int]]:
    """[(first row in q, new tokens, position of the first new token)] per sequence (row s of the
    block tables) -> tile rows (sequence, first row, rows, first position)."""
    out = []
    for s, (row, n, pos) in enumerate(seqs):
        for m in range(0, n, tokens):
            out.append((s, row + m, min(tokens, n - m), pos + m))
    return out


def paged_prefill_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                                block_tables: torch.Tensor, tiles: torch.Tensor, token_lens: torch.Tensor,
                                scale: float | None = None) -> torch.Tensor:
    """Per tile: gather the sequence's keys, then plain causal softmax attention in fp32."""
    n, hq, d = q.shape
    t, hkv = kv_cache.shape[3], kv_cache.shape[4]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(n, hq, d, dtype=q.dtype, device=q.device)
    for s, r0, rows, p0 in tiles.tolist():
        if rows == 0:
            continue
        ctx = p0 + rows
        blocks = block_tables[s, :(ctx + t - 1) // t].long()
        kv = kv_cache[blocks, layer]                                        # [nb, 2, T, Hkv, D]
        k = kv[:, 0].reshape(-1, hkv, d)[:ctx].float().repeat_interleave(hq // hkv, 1)  # [ctx, Hq, D]
        v = kv[:, 1].reshape(-1, hkv, d)[:ctx].float().repeat_interleave(hq // hkv, 1)
        qs = q[r0:r0 + rows].float()                                        # [rows, Hq, D]
        sc = torch.einsum("mhd,nhd->hmn", qs, k) * scale                    # [Hq, rows, ctx]
        pos = torch.arange(p0, ctx, device=q.device)
        sc = sc.masked_fill(torch.arange(ctx, device=q.device)[None, :] > pos[:, None], float("-inf"))
        o = torch.einsum("hmn,nhd->mhd", sc.softmax(-1), v)
        keep = token_lens[r0:r0 + rows].to(q.device) > 0
        out[r0:r0 + rows] = torch.where(keep[:, None, None], o, 0).to(q.dtype)
    return out


@triton.jit
def _partial_kernel(q_ptr, cache_ptr, tables_ptr, tiles_ptr, mid_o_ptr, mid_lse_ptr, qk_scale,
                    stride_qn, stride_qh, stride_cb, stride_ckv, stride_ct, stride_ch, stride_tb,
                    stride_on, stride_oh, stride_os, stride_ln, stride_lh, split,
                    T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    seq = tl.load(tiles_ptr + i * 4)
    r0 = tl.load(tiles_ptr + i * 4 + 1)
    rows = tl.load(tiles_ptr + i * 4 + 2)
    p0 = tl.load(tiles_ptr + i * 4 + 3)
    start = s * split
    end = tl.minimum(start + split, p0 + rows)          # keys past the tile's last position: none
    if rows > 0 and start < end:
        r = tl.arange(0, BLOCK_M * BLOCK_G)
        m = r // BLOCK_G                                 # token of the tile
        g = r % BLOCK_G                                  # query head within the group
        d = tl.arange(0, BLOCK_D)
        rmask = (m < rows) & (g < G)
        dmask = d < D
        qrow = (r0 + m).to(tl.int64) * stride_qn + (h * G + g) * stride_qh
        q = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's dot mishandles 16-bit floats
            q = q.to(tl.float32)
        pos = p0 + m                                     # each row's position: it sees keys <= pos
        m_i = tl.full([BLOCK_M * BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M * BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], tl.float32)
        head = cache_ptr + h * stride_ch
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            see = nmask[None, :] & (n[None, :] <= pos[:, None])
            m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, head, tables_ptr + seq * stride_tb, n, nmask, see,
                                        d, dmask, qk_scale, stride_cb, stride_ct, stride_ckv, T, UPCAST, PRECISION)
        out_row = (r0 + m).to(tl.int64) * stride_on + (h * G + g) * stride_oh + s * stride_os
        tl.store(mid_o_ptr + out_row[:, None] + d[None, :], acc / tl.maximum(l_i, 1e-30)[:, None],
                 mask=rmask[:, None] & dmask[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(mid_lse_ptr + (r0 + m).to(tl.int64) * stride_ln + (h * G + g) * stride_lh + s, lse, mask=rmask)


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                            block_tables: torch.Tensor, tiles: torch.Tensor, token_lens: torch.Tensor,
                            max_model_len: int, scale: float | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``paged_prefill_attention_ref``. ``tiles`` comes from ``make_tiles`` with
    ``tile_tokens(Hq, Hkv, q.dtype)`` (padded with rows = 0 as a graph needs); ``max_model_len``
    fixes the split size and grid, so every call of an engine takes the same reduction order.
    ``out`` may be a strided view."""
    n, hq, d = q.shape
    t, hkv = kv_cache.shape[3], kv_cache.shape[4]
    g = hq // hkv
    assert hq % hkv == 0 and q.stride(-1) == 1 and kv_cache.is_contiguous() and tiles.is_contiguous()
    assert t & (t - 1) == 0, "block size must be a power of two"
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    if n == 0:
        return out
    split = split_size(max_model_len)
    splits = -(-max_model_len // split)
    block_s = max(2, triton.next_power_of_2(splits))
    mid_o = torch.empty(n, hq, block_s, d, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(n, hq, block_s, dtype=torch.float32, device=q.device)
    cache = kv_cache[:, layer]  # [NB, 2, T, Hkv, D] view
    interpret = q.device.type == "cpu"
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = triton.next_power_of_2(d)
    block_g = triton.next_power_of_2(g)
    _partial_kernel[(tiles.shape[0], hkv, splits)](
        q, cache, block_tables, tiles, mid_o, mid_lse, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        block_tables.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), split,
        T=t, G=g, D=d, BLOCK_G=block_g, BLOCK_M=tile_tokens(hq, hkv, q.dtype), BLOCK_D=block_d,
        BLOCK_N=BLOCK_N // 2 if _wide(q.dtype) else BLOCK_N,
        UPCAST=interpret, PRECISION=precision, num_warps=4, num_stages=2)
    reduce_splits[(n, hq)](
        mid_o, mid_lse, token_lens, out, split,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4)
    return out
