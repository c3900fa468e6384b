"""Runs one step of the model: flat batch in, one sampled token per sequence out.

    prepare (token ids, positions, slots, block tables) → model forward → logits of each
    sequence's last new token → sample

The KV cache is allocated here, once: ``kv: [num_blocks, L, 2, T, H_kv, D]``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lmdisagg.engine.attention import AttentionMetadata
from lmdisagg.engine.model import LlamaModel
from lmdisagg.engine.request import Sequence
from lmdisagg.engine.sampler import sample


def allocate_kv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed cache. Zeros matter: attention masks padded slots, but 0 * NaN would still leak.
    On CPU, numpy's calloc-backed zeros give lazily zeroed pages (torch.zeros writes every byte:
    seconds for a few GiB)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, chunk_tokens: int, dtype: torch.dtype,
                 device: torch.device, kv_allocator=None):
        cfg = model.cfg
        self.model = model
        self.device = device
        self.chunk_tokens = chunk_tokens
        # kv: [num_blocks, L, 2, T, H_kv, D]
        shape = (num_blocks, cfg.num_layers, 2, chunk_tokens, cfg.num_kv_heads, cfg.head_dim)
        self.kv = (kv_allocator or allocate_kv)(shape, dtype, device)
        assert tuple(self.kv.shape) == shape and self.kv.is_contiguous(), "kv_allocator broke the layout"

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def prepare(self, prefills: list[Sequence], decodes: list[Sequence]):
        t = self.chunk_tokens
        ids, pos, q_starts, q_lens, ctx_lens, tables, last = [], [], [], [], [], [], []
        for seq in prefills:
            start = seq.num_computed_tokens
            q_starts.append(len(ids))
            q_lens.append(len(seq) - start)
            ctx_lens.append(len(seq))
            tables.append(self._tensor(seq.block_table))
            ids += seq.token_ids[start:]
            pos += range(start, len(seq))
            last.append(len(ids) - 1)
        for seq in decodes:
            ids.append(seq.token_ids[-1])
            pos.append(len(seq) - 1)
            last.append(len(ids) - 1)
        positions = self._tensor(pos)
        blocks = []
        for seq in prefills:
            blocks += [seq.block_table[p // t] for p in range(seq.num_computed_tokens, len(seq))]
        blocks += [seq.block_table[(len(seq) - 1) // t] for seq in decodes]
        meta = AttentionMetadata(
            slot_blocks=self._tensor(blocks), slot_offsets=positions % t,
            prefill_q_starts=q_starts, prefill_q_lens=q_lens, prefill_ctx_lens=ctx_lens,
            prefill_block_tables=tables, num_decode=len(decodes))
        if decodes:
            width = max(len(s.block_table) for s in decodes)
            table = [s.block_table + [0] * (width - len(s.block_table)) for s in decodes]
            lens = [len(s) for s in decodes]
            meta.decode_block_tables = self._tensor(table)
            meta.decode_ctx_lens = self._tensor(lens)
            meta.decode_max_ctx = max(lens)
            span = torch.arange(width * t, device=self.device)
            meta.decode_mask = (span[None, :] < meta.decode_ctx_lens[:, None])[:, None, None, :]
        return self._tensor(ids), positions, meta, self._tensor(last)

    @torch.inference_mode()
    def run(self, prefills: list[Sequence], decodes: list[Sequence]) -> list[int]:
        ids, positions, meta, last = self.prepare(prefills, decodes)
        hidden = self.model(ids, positions, self.kv, meta)          # [N, hidden]
        logits = self.model.logits(hidden[last])                     # [B, vocab]
        return sample(logits, prefills + decodes)
