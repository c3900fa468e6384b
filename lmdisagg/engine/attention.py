"""Attention over the paged KV cache, in plain PyTorch (the reference path; Triton kernels in
``lmdisagg.kernels`` replace pieces of it on CUDA).

Cache layout (see lmdisagg.kv.layout)::

    kv_cache: [num_blocks, L, 2, T, H_kv, D]      block b, layer l: K = kv_cache[b, l, 0], V = [b, l, 1]
    token i of a sequence lives in block  block_table[i // T]  at row  i % T

One forward step holds a flat batch of N new tokens: first the prefill sequences (each any
number of new tokens, possibly after a cached prefix), then the decode sequences (one new token
each). Per layer, the new K/V are written into their slots first, then each sequence attends to
its whole context read back from the cache, so cached prefixes and new tokens are treated alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built by the model runner."""

    slot_blocks: torch.Tensor        # [N] block id of each new token's slot
    slot_offsets: torch.Tensor       # [N] row inside that block
    # prefill part: sequences 0..P-1 own tokens [q_starts[i], q_starts[i] + q_lens[i])
    prefill_q_starts: list[int]
    prefill_q_lens: list[int]
    prefill_ctx_lens: list[int]       # cached + new tokens: the keys each sequence attends to
    prefill_block_tables: list[torch.Tensor]  # [blocks_i] per sequence
    # decode part: the last D tokens of the batch, one per sequence
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks] (padded with 0)
    decode_ctx_lens: torch.Tensor | None = None      # [D]
    decode_max_ctx: int = 0                          # max(decode_ctx_lens), a Python int
    decode_mask: torch.Tensor | None = None          # [D, 1, 1, max_blocks * T] bool, True = attend

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_q_lens)


def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    # k, v: [N, H_kv, D] -> their slots in kv_cache[:, layer]
    kv_cache[:, layer, 0].index_put_((meta.slot_blocks, meta.slot_offsets), k)
    kv_cache[:, layer, 1].index_put_((meta.slot_blocks, meta.slot_offsets), v)


def gather_kv(kv_cache: torch.Tensor, layer: int, block_table: torch.Tensor, length: int):
    # block_table: [nb] -> k, v: [length, H_kv, D]
    blocks = kv_cache[block_table, layer]            # [nb, 2, T, H, D]
    nb, _, t, h, d = blocks.shape
    k = blocks[:, 0].reshape(nb * t, h, d)[:length]
    v = blocks[:, 1].reshape(nb * t, h, d)[:length]
    return k, v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    layer: int, meta: AttentionMetadata) -> torch.Tensor:
    """q: [N, Hq, D], k/v: [N, Hkv, D] (new tokens) -> out: [N, Hq * D]."""
    n, hq, d = q.shape
    write_kv(kv_cache, layer, k, v, meta)
    out = torch.empty_like(q)
    for start, qlen, ctx, table in zip(meta.prefill_q_starts, meta.prefill_q_lens,
                                       meta.prefill_ctx_lens, meta.prefill_block_tables):
        qs = q[start:start + qlen]
        if ctx == qlen:  # nothing cached before: attend to the new tokens directly
            ks, vs = k[start:start + qlen], v[start:start + qlen]
        else:
            ks, vs = gather_kv(kv_cache, layer, table, ctx)
        out[start:start + qlen] = _causal_sdpa(qs, ks, vs)
    if meta.num_decode:
        s = n - meta.num_decode
        out[s:] = _decode_sdpa(q[s:], kv_cache, layer, meta)
    return out.view(n, hq * d)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # q: [Sq, Hq, D], k/v: [Sk, Hkv, D], Sk >= Sq; query i sits at key position Sk - Sq + i
    sq, sk = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if sq == sk:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    else:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1)  # [Sq, Hq, D]


def _decode_sdpa(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata):
    # q: [B, Hq, D]; keys gathered per sequence from its blocks, padded and masked
    b = q.shape[0]
    t = kv_cache.shape[3]
    nb = (meta.decode_max_ctx + t - 1) // t
    table = meta.decode_block_tables[:, :nb]                   # [B, nb]
    blocks = kv_cache[table, layer]                            # [B, nb, 2, T, H, D]
    h, d = blocks.shape[-2:]
    k = blocks[:, :, 0].reshape(b, nb * t, h, d).transpose(1, 2)  # [B, H, S, D]
    v = blocks[:, :, 1].reshape(b, nb * t, h, d).transpose(1, 2)
    mask = meta.decode_mask[..., :nb * t]                      # [B, 1, 1, S]
    o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, enable_gqa=True)
    return o[:, :, 0, :]                                       # [B, Hq, D]
