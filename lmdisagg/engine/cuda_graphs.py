"""CUDA graphs of decode steps and of short prefill steps, one per size bucket.

A decode step of a Llama-8B is ~400 small kernels; launched one by one from Python they cost
more than the ~4-5 ms the GPU needs to read the weights. A prefill of a few hundred tokens (the
suffix of a prompt whose prefix came from the KV cache, or a short prompt) is the same story:
~1,300 launches that took ~40 ms of host time on an H200 host for ~13 ms of GPU work. So both
replay graphs:

    engine start           capture every bucket (largest first, one memory pool per kind):
                           warm up eagerly (compiles the Triton kernels), then record
                           embed → layers → norm → logits over static input buffers
    each step              write the batch into one pinned host array laid out like the static
                           buffers, one async copy host → device, replay the bucket's graph,
                           return the rows of its logits the batch uses

DecodeGraphs: decode-only steps, buckets of sequences. Padding rows (B < bucket) get slot block
-1 (the KV write skips them) and context length 0 (decode attention returns zeros for them), so
they touch no real block. The decode attention grid is captured with
``max_splits(max_model_len)`` splits; splits past a sequence's context return at once.

PrefillGraphs: prefill-only steps of up to ``max_seqs`` sequences and MAX_PREFILL_TOKENS new
tokens, buckets of tokens. Attention is the Triton paged prefill kernel (every context read
from the cache, cached prefix or not), described by tiles; padding tiles have 0 rows, padding
tokens slot -1 and length 0. Longer prefills, and mixed prefill + decode steps, run eagerly.
"""
from __future__ import annotations

import gc

import numpy as np
import torch

from lmdisagg.engine.attention import AttentionMetadata, PagedPrefill
from lmdisagg.engine.model import LlamaModel
from lmdisagg.engine.request import Sequence

MAX_PREFILL_TOKENS = 512   # new tokens of the largest prefill graph
MAX_PREFILL_SEQS = 8       # prefills per graph step


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16, ending at ``max_batch``."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return out + [max_batch]


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, ... up to ``max_tokens``."""
    out, b = [], 16
    while b < max_tokens:
        out.append(b)
        b *= 2
    return out + [max_tokens]


class _Graphs:
    """Static buffers + one graph per bucket; subclasses lay out the inputs."""

    buckets: list[int]

    def __init__(self, model: LlamaModel, kv: torch.Tensor, size: int, capture: bool):
        """``capture=False`` runs the same static-buffer steps eagerly, without graphs: how the
        padding and buffer layout are tested on machines without CUDA."""
        self.model, self.kv = model, kv
        self.static = torch.zeros(size, dtype=torch.int64, device=kv.device)
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=kv.device.type == "cuda")
        self.host_np = self.host.numpy()
        self.use_graphs = capture
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.steps = 0  # steps run through the static buffers (replayed, or eager without capture)

    def _forward(self, bucket: int) -> torch.Tensor:
        raise NotImplementedError

    def _fill_padding(self) -> None:
        raise NotImplementedError

    def capture(self) -> None:
        """Record every bucket's graph. The static buffers hold padding only, so the warm-up
        runs write no KV and read none."""
        self._fill_padding()
        self.static.copy_(self.host)
        pool = None
        stream = torch.cuda.Stream(self.kv.device)
        stream.wait_stream(torch.cuda.current_stream(self.kv.device))
        with torch.cuda.stream(stream):
            for bucket in self.buckets:
                self._forward(bucket)          # compile kernels, pick cuBLAS algorithms
        torch.cuda.current_stream(self.kv.device).wait_stream(stream)
        # No garbage collection while capturing: it runs on this thread, and freeing an older
        # engine there (its graphs, buffers) invalidates the capture (seen on 2xH200, in a process
        # that had dropped engines; tests/engine/test_cuda.py reproduces it)
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for bucket in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                # thread_local: a KV pull's event query on another thread of this worker must not
                # invalidate the capture (the default "global" mode forbids it process-wide)
                # capture on a stream of the engine's device (torch's default capture stream is
                # made once per process, on whichever device captured first)
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    logits = self._forward(bucket)
                pool = graph.pool()
                self.graphs[bucket] = (graph, logits)
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize(self.kv.device)

    def _launch(self, bucket: int, used: int) -> torch.Tensor:
        """Copy the first ``used`` fields host -> device and replay (or run) the bucket. The
        pinned buffer is free to reuse: the previous step's sampled tokens were read back (a
        sync) after its copy."""
        if self.use_graphs and not self.graphs:
            self.capture()
        self.steps += 1
        self.static[:used].copy_(self.host[:used], non_blocking=True)
        if not self.use_graphs:
            return self._forward(bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits


class DecodeGraphs(_Graphs):
    """Owned by the ModelRunner; ``run`` is called from the step-loop thread for decode-only
    steps that fit the largest bucket. It launches the graph and returns without waiting for it
    (the sampler's read of the tokens is the step's one sync)."""

    # static input layout (int64): [ids B | positions B | slot blocks B | slot offsets B |
    #                               context lens B | block tables B x max_blocks]
    FIELDS = 5

    def __init__(self, model: LlamaModel, kv: torch.Tensor, max_batch: int, max_model_len: int,
                 chunk_tokens: int, *, capture: bool = True):
        from lmdisagg.kernels.decode_attention import max_splits
        self.chunk_tokens = chunk_tokens
        self.buckets = batch_buckets(max_batch)
        self.max_batch = b = self.buckets[-1]
        self.max_blocks = -(-max_model_len // chunk_tokens)
        self.num_splits = max_splits(max_model_len)
        super().__init__(model, kv, self.FIELDS * b + b * self.max_blocks, capture)

    def fits(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def _views(self, buf, bucket: int):
        b = self.max_batch
        ids, pos, blocks, offs, lens = (buf[i * b:i * b + bucket] for i in range(self.FIELDS))
        tables = buf[self.FIELDS * b:].reshape(b, self.max_blocks)[:bucket]
        return ids, pos, blocks, offs, lens, tables

    def _meta(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids, pos, blocks, offs, lens, tables = self._views(self.static, bucket)
        meta = AttentionMetadata(slot_blocks=blocks, slot_offsets=offs, num_decode=bucket,
                                 decode_block_tables=tables, decode_ctx_lens=lens,
                                 decode_num_splits=self.num_splits)
        return ids, pos, meta

    def _forward(self, bucket: int) -> torch.Tensor:
        ids, pos, meta = self._meta(bucket)
        return self.model.logits(self.model(ids, pos, self.kv, meta))  # [bucket, vocab] fp32

    def _fill_padding(self) -> None:
        ids, pos, blocks, offs, lens, _ = self._views(self.host_np, self.max_batch)
        ids[:] = pos[:] = offs[:] = lens[:] = 0
        blocks[:] = -1

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Replay the smallest bucket that holds ``seqs`` (all decoding one token) -> logits
        [len(seqs), vocab] fp32, a view of the graph's output (valid until the next replay)."""
        n = len(seqs)
        bucket = next(b for b in self.buckets if b >= n)
        t = self.chunk_tokens
        ids, pos, blocks, offs, lens, tables = self._views(self.host_np, bucket)
        lens[:n] = [len(s) for s in seqs]
        lens[n:] = 0
        ids[:n] = [s.token_ids[-1] for s in seqs]
        ids[n:] = 0
        pos[:n] = lens[:n] - 1
        pos[n:] = 0
        for row, s in enumerate(seqs):
            tables[row, :len(s.block_table)] = s.block_table
        blocks[:n] = tables[np.arange(n), pos[:n] // t]
        blocks[n:] = -1
        np.remainder(pos, t, out=offs)
        # one copy of the fields and the bucket's table rows
        logits = self._launch(bucket, self.FIELDS * self.max_batch + bucket * self.max_blocks)
        return logits[:n]


class PrefillGraphs(_Graphs):
    """Owned by the ModelRunner; ``run`` is called for prefill-only steps that ``fit``. Like
    DecodeGraphs it returns without waiting for the GPU."""

    # static input layout (int64), N = the largest bucket, S = max_seqs, M = tiles of bucket N:
    # [ids N | positions N | slot blocks N | slot offsets N | lens N | last S | tiles M x 4 |
    #  block tables S x max_blocks]
    FIELDS = 5

    def __init__(self, model: LlamaModel, kv: torch.Tensor, max_seqs: int, max_model_len: int,
                 chunk_tokens: int, *, max_tokens: int = MAX_PREFILL_TOKENS, capture: bool = True):
        from lmdisagg.kernels.prefill_attention import tile_tokens
        cfg = model.cfg
        self.chunk_tokens = chunk_tokens
        self.max_model_len = max_model_len
        self.max_seqs = max_seqs
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = n = self.buckets[-1]
        self.tile_tokens = tile_tokens(cfg.num_heads, cfg.num_kv_heads, kv.dtype)  # q has the cache's dtype
        self.max_blocks = -(-max_model_len // chunk_tokens)
        self.max_tiles = self._tiles(n)
        self._tables_at = self.FIELDS * n + max_seqs + 4 * self.max_tiles
        super().__init__(model, kv, self._tables_at + max_seqs * self.max_blocks, capture)

    def _tiles(self, bucket: int) -> int:
        # each sequence adds at most one partial tile
        return -(-bucket // self.tile_tokens) + self.max_seqs

    def fits(self, seqs: list[Sequence]) -> bool:
        return 0 < len(seqs) <= self.max_seqs and \
            sum(len(s) - s.num_computed_tokens for s in seqs) <= self.max_tokens

    def _views(self, buf, bucket: int):
        n, s = self.max_tokens, self.max_seqs
        ids, pos, blocks, offs, lens = (buf[i * n:i * n + bucket] for i in range(self.FIELDS))
        last = buf[self.FIELDS * n:self.FIELDS * n + s]
        tiles = buf[self.FIELDS * n + s:self._tables_at].reshape(self.max_tiles, 4)[:self._tiles(bucket)]
        tables = buf[self._tables_at:].reshape(s, self.max_blocks)
        return ids, pos, blocks, offs, lens, last, tiles, tables

    def _forward(self, bucket: int) -> torch.Tensor:
        ids, pos, blocks, offs, lens, last, tiles, tables = self._views(self.static, bucket)
        meta = AttentionMetadata(slot_blocks=blocks, slot_offsets=offs,
                                 paged=PagedPrefill(tables, tiles, lens, self.max_model_len))
        hidden = self.model(ids, pos, self.kv, meta)                       # [bucket, hidden]
        return self.model.logits(hidden.index_select(0, last))             # [max_seqs, vocab] fp32

    def _fill_padding(self) -> None:
        ids, pos, blocks, offs, lens, last, tiles, _ = self._views(self.host_np, self.max_tokens)
        ids[:] = pos[:] = offs[:] = lens[:] = last[:] = 0
        blocks[:] = -1
        tiles[:] = 0

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Replay the smallest bucket that holds the new tokens of ``seqs`` -> logits
        [len(seqs), vocab] fp32 of each one's last token (a view, valid until the next replay)."""
        from lmdisagg.kernels.prefill_attention import make_tiles
        spans = [(len(s) - s.num_computed_tokens, s.num_computed_tokens) for s in seqs]
        n = sum(q for q, _ in spans)
        bucket = next(b for b in self.buckets if b >= n)
        t = self.chunk_tokens
        ids, pos, blocks, offs, lens, last, tiles, tables = self._views(self.host_np, bucket)
        rows, i = [], 0
        for row, (seq, (q, start)) in enumerate(zip(seqs, spans)):
            ids[i:i + q] = seq.token_ids[start:]
            pos[i:i + q] = np.arange(start, start + q)
            tables[row, :len(seq.block_table)] = seq.block_table
            blocks[i:i + q] = tables[row, pos[i:i + q] // t]
            rows.append((i, q, start))
            i += q
            last[row] = i - 1
        ids[n:] = pos[n:] = 0
        blocks[n:] = -1
        np.remainder(pos, t, out=offs)
        np.add(pos, 1, out=lens)
        lens[n:] = 0
        last[len(seqs):] = 0
        tile_rows = make_tiles(rows, self.tile_tokens)
        tiles[:len(tile_rows)] = tile_rows
        tiles[len(tile_rows):] = 0
        logits = self._launch(bucket, len(self.host_np))
        return logits[:len(seqs)]
