"""What both paged attention kernels share (decode_attention, prefill_attention): the inner step,
one tile of BLOCK_N keys looked up token by token in a block table and folded into a running
flash-attention softmax (base 2) of a tile of query rows; and the reduction that merges a
split-context row's partial results."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(q, m_i, l_i, acc, head, table_row, n, nmask, see, d, dmask, qk_scale,
                stride_cb, stride_ct, stride_ckv, T: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """q: [R, BLOCK_D]; keys ``n`` [BLOCK_N] of the sequence whose block-table row starts at
    ``table_row``, valid where ``nmask``; ``see`` [R, BLOCK_N]: which row sees which key.
    -> the updated (m_i [R], l_i [R], acc [R, BLOCK_D]). A row that sees no key yet keeps
    m_i = -inf and l_i = 0."""
    blk = tl.load(table_row + n // T, mask=nmask, other=0).to(tl.int64)
    row = head + blk * stride_cb + (n % T) * stride_ct                    # [BLOCK_N] pointers
    kvmask = nmask[:, None] & dmask[None, :]
    k = tl.load(row[:, None] + d[None, :], mask=kvmask, other=0.0)      # [BLOCK_N, BLOCK_D]
    v = tl.load(row[:, None] + stride_ckv + d[None, :], mask=kvmask, other=0.0)
    if UPCAST:  # the CPU interpreter's dot mishandles 16-bit floats
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale   # [R, BLOCK_N]
    qk = tl.where(see, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def reduce_splits(mid_o_ptr, mid_lse_ptr, lens_ptr, out_ptr, split,
                  stride_on, stride_oh, stride_os, stride_ln, stride_lh, stride_outn, stride_outh,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    # Merge the per-split partial results of one row (a query token, or a decoding sequence) and
    # query head: each split of `split` context tokens left its softmax-normalized output and
    # log2-sum-exp; splits past the row's context (`lens`) and empty ones (lse -inf) weigh
    # nothing. Grid (rows, query heads).
    t = tl.program_id(0)
    hq = tl.program_id(1)
    ctx = tl.load(lens_ptr + t)
    nsplit = (ctx + split - 1) // split
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < nsplit
    base = t.to(tl.int64)
    lse = tl.load(mid_lse_ptr + base * stride_ln + hq * stride_lh + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)                                                   # [BLOCK_S], 0 if masked
    o = tl.load(mid_o_ptr + base * stride_on + hq * stride_oh + s[:, None] * stride_os + d[None, :],
                mask=smask[:, None] & (d[None, :] < D), other=0.0)         # [BLOCK_S, BLOCK_D]
    out = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + base * stride_outn + hq * stride_outh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)
