"""Attention over the paged KV cache: the metadata of one step and two backends.

Cache layout (see lmdisagg.kv.layout)::

    kv_cache: [num_blocks, L, 2, T, H_kv, D]      block b, layer l: K = kv_cache[b, l, 0], V = [b, l, 1]
    token i of a sequence lives in block  block_table[i // T]  at row  i % T

One forward step holds a flat batch of N new tokens: first the prefill sequences (each any
number of new tokens, possibly after a cached prefix), then the decode sequences (one new token
each). Per layer, the new K/V are written into their slots first; then each prefill attends to
its new tokens directly (or, after a cached prefix, to its whole context read back from the
cache) and each decode token attends to its context read back from the cache.

Backends (the model runner picks one; both take the same ``AttentionMetadata``):

    TorchAttention    plain PyTorch: copies / index_put writes, SDPA prefill, gathered decode.
                      The reference, and the CPU path.
    TritonAttention   CUDA: Triton KV write and paged flash-decoding (lmdisagg.kernels), SDPA
                      (flash) prefill with a bottom-right causal mask after a cached prefix.
                      With ``meta.paged`` (the prefill graphs), one Triton paged prefill kernel
                      reads every prefill's context from the cache instead. Every tensor it reads
                      is in the metadata, so decode and short prefill steps can be captured in
                      CUDA graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    """One prefill sequence of the step: new tokens [q_start, q_start + q_len) of the batch."""

    q_start: int
    q_len: int
    ctx_len: int                          # cached + new tokens: the keys it attends to
    block_table: torch.Tensor | None = None  # [ceil(ctx_len / T)] when a cached prefix is read back
    mask: torch.Tensor | None = None      # [q_len, ctx_len] bool, bottom-right causal (torch backend)


@dataclass
class PagedPrefill:
    """Prefill attention read entirely from the cache, described by tensors only (CUDA graphs of
    prefill steps; lmdisagg.kernels.prefill_attention has the layouts)."""

    block_tables: torch.Tensor            # [S, max_blocks]
    tiles: torch.Tensor                   # [max_tiles, 4] (sequence, first row, rows, first position)
    token_lens: torch.Tensor              # [N] position + 1 (0: padded row)
    max_model_len: int                    # fixes the kernel's split size and grid


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built once per step by the model runner."""

    slot_blocks: torch.Tensor             # [N] block of each new token's slot (-1: padded row, skip)
    slot_offsets: torch.Tensor            # [N] row inside that block
    prefills: list[PrefillSeq] = field(default_factory=list)
    # decode part: the last num_decode tokens of the batch, one per sequence
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks] int64 (padded with 0)
    decode_ctx_lens: torch.Tensor | None = None      # [D] int64 (0: padded row of a graph batch)
    decode_max_ctx: int = 0                          # max(decode_ctx_lens) (torch backend)
    decode_num_splits: int = 0                       # Triton grid: ceil(max ctx / PART), or the graph's max
    decode_gather: torch.Tensor | None = None        # [D * nb] int64 block ids to gather (torch backend)
    decode_mask: torch.Tensor | None = None          # [D, 1, 1, max_ctx] bool, True = attend (torch backend)
    # torch backend: prefill tokens written as plain copies: (blocks, row in block, count, first
    # row in the batch) where blocks is a block id (part of one block) or a slice of consecutive
    # block ids (whole blocks). Decode rows use slot_*.
    prefill_runs: list[tuple[int | slice, int, int, int]] | None = None
    paged: PagedPrefill | None = None      # Triton backend: every row is a prefill token, read back

    @property
    def num_prefill_tokens(self) -> int:
        return sum(p.q_len for p in self.prefills)


class TorchAttention:
    """The plain-PyTorch backend. fp32 runs exactly the ops HF runs (SDPA) so greedy tokens match
    HF bit for bit on CPU; other dtypes compute decode attention in fp32 matmuls, which on CPU is
    several times faster than SDPA's bf16 kernel for one query token. With ``paged_decode`` (bf16
    / fp16 on CPU, where the C++ kernel builds), decode reads K and V in place from the cache
    (lmdisagg.kernels.cpu_attention) instead of gathering them."""

    def __init__(self, paged_decode: bool = False):
        self.paged_decode = paged_decode
        if paged_decode:  # bound once: decode calls it for every layer of every step
            from lmdisagg.kernels.cpu_attention import paged_decode as kernel
            self._paged_decode = kernel

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 layer: int, meta: AttentionMetadata) -> torch.Tensor:
        """q: [N, Hq, D], k/v: [N, Hkv, D] (new tokens) -> out: [N, Hq * D]."""
        n, hq, d = q.shape
        self.write(kv_cache, layer, k, v, meta)
        if not meta.num_decode and len(meta.prefills) == 1:  # one prefill: no copy into `out`
            return self.prefill(q, k, v, kv_cache, layer, meta.prefills[0]).reshape(n, hq * d)
        if not meta.prefills:                                  # decode only (and CUDA graphs)
            return self.decode(q, kv_cache, layer, meta).reshape(n, hq * d)
        out = torch.empty_like(q)
        for p in meta.prefills:
            s = slice(p.q_start, p.q_start + p.q_len)
            out[s] = self.prefill(q[s], k[s], v[s], kv_cache, layer, p)
        if meta.num_decode:
            out[n - meta.num_decode:] = self.decode(q[n - meta.num_decode:], kv_cache, layer, meta)
        return out.view(n, hq * d)

    def write(self, kv_cache, layer, k, v, meta) -> None:
        # k, v: [N, H_kv, D] -> their slots in kv_cache[:, layer]
        if meta.prefill_runs is None:
            idx = (meta.slot_blocks, meta.slot_offsets)
            kv_cache[:, layer, 0].index_put_(idx, k)
            kv_cache[:, layer, 1].index_put_(idx, v)
            return
        cache = kv_cache[:, layer]                                      # [NB, 2, T, H, D]
        for blocks, off, count, row in meta.prefill_runs:               # copies, no per-token index math
            if isinstance(blocks, int):
                cache[blocks, 0, off:off + count] = k[row:row + count]
                cache[blocks, 1, off:off + count] = v[row:row + count]
            else:  # whole consecutive blocks: [m, T, H, D] <- m * T rows
                shape = (blocks.stop - blocks.start, cache.shape[2], *k.shape[1:])
                cache[blocks, 0] = k[row:row + count].view(shape)
                cache[blocks, 1] = v[row:row + count].view(shape)
        if meta.num_decode:
            s = k.shape[0] - meta.num_decode
            idx = (meta.slot_blocks[s:], meta.slot_offsets[s:])
            cache[:, 0].index_put_(idx, k[s:])
            cache[:, 1].index_put_(idx, v[s:])

    def prefill(self, q, k, v, kv_cache, layer, p: PrefillSeq) -> torch.Tensor:
        # q: [Sq, Hq, D], k/v: [Sq, Hkv, D] -> [Sq, Hq, D]
        if p.block_table is not None:  # attend to cached prefix + new tokens, read back from the cache
            k, v = gather_kv(kv_cache, layer, p.block_table, p.ctx_len)
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if q.device.type == "cpu":  # CPU flash kernel: a few % faster on [1, H, S, D] (same bits)
            qt, kt, vt = qt.contiguous(), kt.contiguous(), vt.contiguous()
        if p.mask is None:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=p.mask, enable_gqa=True)
        return o[0].transpose(0, 1)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata):
        # q: [B, Hq, D] -> [B, Hq, D]; each sequence's blocks gathered whole, cut to the longest context
        b, hq, d = q.shape
        if self.paged_decode:
            return self._paged_decode(q, kv_cache, layer, meta.decode_block_tables, meta.decode_ctx_lens, d ** -0.5)
        t, hkv = kv_cache.shape[3], kv_cache.shape[4]
        s = meta.decode_max_ctx
        nb = meta.decode_gather.numel() // b
        k = kv_cache[:, layer, 0].index_select(0, meta.decode_gather).view(b, nb * t, hkv, d)[:, :s]
        v = kv_cache[:, layer, 1].index_select(0, meta.decode_gather).view(b, nb * t, hkv, d)[:, :s]
        if q.dtype == torch.float32:
            o = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=meta.decode_mask, enable_gqa=True)
            return o[:, :, 0]
        g = hq // hkv
        kf = k.float().permute(0, 2, 3, 1)                              # [B, Hkv, D, S]
        vf = v.float().transpose(1, 2)                                  # [B, Hkv, S, D]
        scores = torch.matmul(q.view(b, hkv, g, d).float(), kf).mul_(d ** -0.5)  # [B, Hkv, G, S]
        scores.masked_fill_(~meta.decode_mask, float("-inf"))
        return torch.matmul(scores.softmax(-1), vf).view(b, hq, d).to(q.dtype)


class TritonAttention(TorchAttention):
    """CUDA backend: Triton kernels for the KV write and decode, SDPA for prefill."""

    def __init__(self, max_model_len: int):
        super().__init__()
        from lmdisagg.kernels.decode_attention import max_splits, paged_decode_attention
        from lmdisagg.kernels.kv_write import write_kv
        from lmdisagg.kernels.prefill_attention import paged_prefill_attention
        self._write_kv = write_kv
        self._prefill = paged_prefill_attention
        self._decode = paged_decode_attention
        self._split_slots = max_splits(max_model_len)  # one reduce width: eager == graph, bit for bit

    def __call__(self, q, k, v, kv_cache, layer, meta):
        if meta.paged is None:
            return super().__call__(q, k, v, kv_cache, layer, meta)
        n, hq, d = q.shape
        self.write(kv_cache, layer, k, v, meta)
        p = meta.paged
        return self._prefill(q, kv_cache, layer, p.block_tables, p.tiles, p.token_lens,
                             p.max_model_len).view(n, hq * d)

    def write(self, kv_cache, layer, k, v, meta) -> None:
        self._write_kv(kv_cache, layer, k, v, meta.slot_blocks, meta.slot_offsets)

    def prefill(self, q, k, v, kv_cache, layer, p: PrefillSeq) -> torch.Tensor:
        if p.block_table is None:
            return super().prefill(q, k, v, kv_cache, layer, p)
        from torch.nn.attention.bias import causal_lower_right
        k, v = gather_kv(kv_cache, layer, p.block_table, p.ctx_len)       # [S, Hkv, D]
        g = q.shape[1] // k.shape[1]
        # heads expanded here: CausalBias's flash / efficient paths take no enable_gqa
        qt = q.transpose(0, 1)[None]                                      # [1, Hq, Sq, D]
        kt = k.repeat_interleave(g, 1).transpose(0, 1)[None]              # [1, Hq, S, D]
        vt = v.repeat_interleave(g, 1).transpose(0, 1)[None]
        bias = causal_lower_right(p.q_len, p.ctx_len)
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias)[0].transpose(0, 1)

    def decode(self, q, kv_cache, layer, meta):
        return self._decode(q, kv_cache, layer, meta.decode_block_tables, meta.decode_ctx_lens,
                            meta.decode_num_splits, split_slots=self._split_slots)


def gather_kv(kv_cache: torch.Tensor, layer: int, block_table: torch.Tensor, length: int):
    # block_table: [nb] -> k, v: [length, H_kv, D] (contiguous copies of the sequence's blocks)
    nb, t, h, d = block_table.numel(), *kv_cache.shape[3:]
    k = kv_cache[:, layer, 0].index_select(0, block_table).view(nb * t, h, d)[:length]
    v = kv_cache[:, layer, 1].index_select(0, block_table).view(nb * t, h, d)[:length]
    return k, v
