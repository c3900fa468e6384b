"""Runs one step of the model: flat batch in, one sampled token per sequence out.

    prepare (token ids, positions, slots, block tables: built in numpy, one host->device copy)
      → model forward (eager, or a captured CUDA graph for decode-only steps)
      → logits of each sequence's last new token → sample

The KV cache is allocated here, once: ``kv: [num_blocks, L, 2, T, H_kv, D]``.

Per device:
    CPU     TorchAttention; bf16 weights packed for oneDNN (lmdisagg.kernels.cpu_linear).
    CUDA    TritonAttention (Triton KV write + paged decode, SDPA prefill); for 16-bit dtypes
            also fused RMSNorm / RoPE / SwiGLU kernels; unless ``cuda_graphs=False``, decode-only
            steps and prefill-only steps of up to 512 new tokens (a cache hit's suffix, short
            prompts) replay CUDA graphs (cuda_graphs.DecodeGraphs / PrefillGraphs).
A step syncs the device once: when the sampled tokens come back to the host.
"""
from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
import torch

from lmdisagg.engine.attention import AttentionMetadata, PrefillSeq, TorchAttention
from lmdisagg.engine.model import LlamaModel
from lmdisagg.engine.request import Sequence
from lmdisagg.engine.sampler import sample, token_logprobs

log = logging.getLogger(__name__)


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
                 device: torch.device, kv_allocator=None, *, max_num_seqs: int = 64,
                 max_model_len: int | None = None, cuda_graphs: bool = False):
        cfg = model.cfg
        self.model = model
        self.device = device
        self.chunk_tokens = chunk_tokens
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        # kv: [num_blocks, L, 2, T, H_kv, D]
        shape = (num_blocks, cfg.num_layers, 2, chunk_tokens, cfg.num_kv_heads, cfg.head_dim)
        self.kv = (kv_allocator or allocate_kv)(shape, dtype, device)
        assert tuple(self.kv.shape) == shape and self.kv.is_contiguous(), "kv_allocator broke the layout"
        self.triton = False
        # where a CUDA step's sampled tokens are read back: allocated once (pinned allocation is
        # slow and may synchronize with the device)
        self.tokens_host = torch.empty(max_num_seqs, dtype=torch.int64, pin_memory=True) \
            if device.type == "cuda" else None
        if device.type == "cuda":
            try:
                self.set_attention("triton")
                if dtype != torch.float32:  # fp32 keeps PyTorch's ops: HF's exact numerics
                    model.use_triton_ops()
            except ImportError as e:  # triton missing: the PyTorch path still runs, slower
                log.warning("Triton unavailable (%s): plain PyTorch attention, no CUDA graphs", e)
        else:
            from lmdisagg.kernels.cpu_linear import can_pack
            if can_pack(dtype, device):
                model.pack_linear_weights()
            if dtype != torch.float32:  # fp32 keeps SDPA: HF's exact numerics
                from lmdisagg.kernels import cpu_attention
                if cpu_attention.available():
                    self.set_attention("cpu")
        # Triton launches on the current device: steps run with the engine's device current
        # (an engine on cuda:1 in a process whose current device is cuda:0)
        self._on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        self.graphs = self.prefill_graphs = None
        if device.type == "cuda" and cuda_graphs and self.triton:
            from lmdisagg.engine.cuda_graphs import MAX_PREFILL_SEQS, DecodeGraphs, PrefillGraphs
            with self._on_device:  # now, before any request or KV transfer can run beside them
                self.graphs = DecodeGraphs(model, self.kv, max_num_seqs, self.max_model_len, chunk_tokens)
                self.graphs.capture()
                self.prefill_graphs = PrefillGraphs(model, self.kv, min(max_num_seqs, MAX_PREFILL_SEQS),
                                                    self.max_model_len, chunk_tokens)
                self.prefill_graphs.capture()

    def set_attention(self, kind: str) -> None:
        """"torch", "cpu" (torch with the C++ paged decode of lmdisagg.kernels.cpu_attention) or
        "triton" attention backend (CUDA picks triton, bf16 / fp16 on CPU "cpu"; tests also run
        triton on CPU through Triton's interpreter). Call before the first step."""
        from lmdisagg.engine.attention import TritonAttention
        if kind == "cpu":
            from lmdisagg.kernels import cpu_attention
            if not cpu_attention.available():
                raise RuntimeError(f"the CPU paged decode attention is unavailable: {cpu_attention.why_not()}")
        self.model.attention = TritonAttention(self.max_model_len) if kind == "triton" \
            else TorchAttention(paged_decode=kind == "cpu")
        self.triton = kind == "triton"

    # --- inputs ---------------------------------------------------------------------------------
    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(host)
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    def prepare(self, prefills: list[Sequence], decodes: list[Sequence]):
        """-> (input_ids [N], positions [N], metadata, last [B] or None = every row is a last
        token). All integer inputs travel in one int64 array: one host->device copy per step."""
        t = self.chunk_tokens
        spans = [(len(s) - s.num_computed_tokens, s.num_computed_tokens) for s in prefills]
        n = sum(q for q, _ in spans) + len(decodes)
        nd = len(decodes)
        width = max((len(s.block_table) for s in decodes), default=0)
        cached = [i for i, s in enumerate(prefills) if s.num_computed_tokens]
        tabs = sum(len(prefills[i].block_table) for i in cached)
        nlast = len(prefills) + nd if prefills else 0  # rows to take logits from (None: all)
        host = np.empty(4 * n + nd + nd * width + tabs + nlast, dtype=np.int64)
        ids, pos, blocks, offs = (host[i * n:(i + 1) * n] for i in range(4))
        lens = host[4 * n:4 * n + nd]
        tables = host[4 * n + nd:4 * n + nd + nd * width].reshape(nd, width)
        i = 0
        for seq, (q, start) in zip(prefills, spans):
            ids[i:i + q] = seq.token_ids[start:]
            pos[i:i + q] = np.arange(start, start + q)
            blocks[i:i + q] = np.asarray(seq.block_table)[pos[i:i + q] // t]
            i += q
        if nd:
            lens[:] = [len(s) for s in decodes]
            ids[i:] = [s.token_ids[-1] for s in decodes]
            pos[i:] = lens - 1
            tables[:] = 0
            for row, s in enumerate(decodes):
                tables[row, :len(s.block_table)] = s.block_table
            blocks[i:] = tables[np.arange(nd), pos[i:] // t]
        np.remainder(pos, t, out=offs)
        o = 4 * n + nd + nd * width
        for j in cached:
            bt = prefills[j].block_table
            host[o:o + len(bt)] = bt
            o += len(bt)
        if nlast:
            np.cumsum([q for q, _ in spans], out=host[o:o + len(prefills)])
            host[o:o + len(prefills)] -= 1
            host[o + len(prefills):] = np.arange(n - nd, n)

        dev = self._to_device(host)
        meta = AttentionMetadata(slot_blocks=dev[2 * n:3 * n], slot_offsets=dev[3 * n:4 * n], num_decode=nd)
        if not self.triton and prefills:
            meta.prefill_runs = self._prefill_runs(prefills, spans)
        i, o = 0, 4 * n + nd + nd * width
        for seq, (q, start) in zip(prefills, spans):
            p = PrefillSeq(i, q, start + q)
            if start:  # a cached prefix: read the whole context back from the cache
                p.block_table = dev[o:o + len(seq.block_table)]
                o += len(seq.block_table)
                if not self.triton:
                    p.mask = torch.ones(q, start + q, dtype=torch.bool, device=self.device).tril(start)
            meta.prefills.append(p)
            i += q
        if nd:
            self._decode_meta(meta, dev[4 * n:4 * n + nd], dev[4 * n + nd:4 * n + nd + nd * width].view(nd, width),
                              int(lens.max()))
        last = dev[len(host) - nlast:] if nlast else None
        return dev[:n], dev[n:2 * n], meta, last

    def _prefill_runs(self, prefills: list[Sequence], spans) -> list[tuple]:
        """Per prefill: a copy into a partly filled first / last block, and one copy per run of
        consecutive block ids in between (AttentionMetadata.prefill_runs)."""
        t, runs, row = self.chunk_tokens, [], 0
        for seq, (q, start) in zip(prefills, spans):
            end, p = start + q, start
            if p % t:                                                  # partial first block
                count = min(t - p % t, end - p)
                runs.append((seq.block_table[p // t], p % t, count, row))
                p += count
            while end - p >= t:                                        # whole blocks
                first = j = p // t
                while (j + 1) * t + t <= end and seq.block_table[j + 1] == seq.block_table[j] + 1:
                    j += 1
                b0 = seq.block_table[first]
                runs.append((slice(b0, b0 + j - first + 1), 0, (j - first + 1) * t, row + p - start))
                p = (j + 1) * t
            if p < end:                                                # partial last block
                runs.append((seq.block_table[p // t], 0, end - p, row + p - start))
            row += q
        return runs

    def _decode_meta(self, meta: AttentionMetadata, lens: torch.Tensor, tables: torch.Tensor, max_ctx: int):
        t = self.chunk_tokens
        meta.decode_ctx_lens, meta.decode_block_tables, meta.decode_max_ctx = lens, tables, max_ctx
        if self.triton:
            from lmdisagg.kernels.decode_attention import PART
            meta.decode_num_splits = -(-max_ctx // PART)
        elif not self.model.attention.paged_decode:  # the PyTorch decode gathers and masks
            nb = -(-max_ctx // t)
            meta.decode_gather = tables[:, :nb].reshape(-1)
            span = torch.arange(max_ctx, device=self.device)
            meta.decode_mask = (span[None, :] < lens[:, None])[:, None, None, :]

    # --- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prefills: list[Sequence], decodes: list[Sequence]) -> tuple[list[int], list]:
        """One step: each sequence's next token, and its logprobs (``sampler.sample``)."""
        with self._on_device:
            if not prefills and self.graphs is not None and self.graphs.fits(len(decodes)):
                logits = self.graphs.run(decodes)                          # [B, vocab]
            elif not decodes and self.prefill_graphs is not None and self.prefill_graphs.fits(prefills) \
                    and not any(s.wants_prompt_logprobs for s in prefills):  # the graphs keep last rows only
                logits = self.prefill_graphs.run(prefills)                 # [B, vocab]
            else:
                ids, positions, meta, last = self.prepare(prefills, decodes)
                hidden = self.model(ids, positions, self.kv, meta)         # [N, hidden]
                logits = self.model.logits(hidden if last is None else hidden[last])  # [B, vocab]
                self._prompt_logprobs(prefills, hidden)
            return sample(logits, prefills + decodes, self.tokens_host)

    PROMPT_LOGPROB_ROWS = 256  # rows of full-vocabulary logits made at a time

    def _prompt_logprobs(self, prefills: list[Sequence], hidden: torch.Tensor) -> None:
        """``seq.prompt_logprobs`` for the prefills that want them: row j of a prompt (computed whole)
        predicts its token j + 1; the last row predicts the first output, sampled as usual."""
        start = 0
        for seq in prefills:
            rows = len(seq) - seq.num_computed_tokens
            if seq.wants_prompt_logprobs:
                k = seq.params.prompt_logprobs
                out: list = [None]
                for a in range(0, rows - 1, self.PROMPT_LOGPROB_ROWS):
                    b = min(rows - 1, a + self.PROMPT_LOGPROB_ROWS)
                    lg = self.model.logits(hidden[start + a:start + b])    # [b - a, vocab]
                    out += token_logprobs(lg, list(range(b - a)), seq.token_ids[a + 1:b + 1], [k] * (b - a))
                seq.prompt_logprobs = out
            start += rows
