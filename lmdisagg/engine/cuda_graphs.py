"""CUDA graphs of decode-only steps, one per batch-size bucket.

A decode step of a Llama-8B is ~400 small kernels; launched one by one from Python they cost
more than the ~4-5 ms the GPU needs to read the weights. So a decode-only step replays a graph:

    engine start           capture every bucket (largest first, one shared memory pool):
                           warm up eagerly (compiles the Triton kernels), then record
                           embed → layers → norm → logits over static input buffers
    each decode step       write the batch into one pinned host array laid out like the static
                           buffers, one async copy host → device, replay the bucket's graph,
                           return the first B rows of its logits

Padding rows (B < bucket) get slot block -1 (the KV write skips them) and context length 0
(decode attention returns zeros for them), so they touch no real block. The decode attention
grid is captured with ``max_splits(max_model_len)`` splits; splits past a sequence's context
return at once. Mixed prefill + decode steps run eagerly (prefill dominates them anyway).
"""
from __future__ import annotations

import numpy as np
import torch

from lmdisagg.engine.attention import AttentionMetadata
from lmdisagg.engine.model import LlamaModel
from lmdisagg.engine.request import Sequence


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16, ending at ``max_batch``."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return out + [max_batch]


class DecodeGraphs:
    """Owned by the ModelRunner; ``run`` is called from the step-loop thread for decode-only
    steps that fit the largest bucket. It launches the graph and returns without waiting for it
    (the sampler's read of the tokens is the step's one sync)."""

    # static input layout (int64): [ids B | positions B | slot blocks B | slot offsets B |
    #                               context lens B | block tables B x max_blocks]
    FIELDS = 5

    def __init__(self, model: LlamaModel, kv: torch.Tensor, max_batch: int, max_model_len: int,
                 chunk_tokens: int, *, capture: bool = True):
        """``capture=False`` runs the same static-buffer steps eagerly, without graphs: how the
        padding and buffer layout are tested on machines without CUDA."""
        from lmdisagg.kernels.decode_attention import max_splits
        self.model, self.kv = model, kv
        self.chunk_tokens = chunk_tokens
        self.buckets = batch_buckets(max_batch)
        self.max_batch = b = self.buckets[-1]
        self.max_blocks = -(-max_model_len // chunk_tokens)
        self.num_splits = max_splits(max_model_len)
        size = self.FIELDS * b + b * self.max_blocks
        self.static = torch.zeros(size, dtype=torch.int64, device=kv.device)
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=kv.device.type == "cuda")
        self.use_graphs = capture
        self.host_np = self.host.numpy()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

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

    def capture(self) -> None:
        """Record every bucket's graph. The static buffers hold padding only (slot -1, length
        0), so the warm-up runs write no KV and read none."""
        self._fill_padding()
        self.static.copy_(self.host)
        pool = None
        stream = torch.cuda.Stream(self.kv.device)
        stream.wait_stream(torch.cuda.current_stream(self.kv.device))
        with torch.cuda.stream(stream):
            for bucket in self.buckets:
                self._forward(bucket)          # compile kernels, pick cuBLAS algorithms
        torch.cuda.current_stream(self.kv.device).wait_stream(stream)
        for bucket in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            # thread_local: a KV pull's event query on another thread of this worker must not
            # invalidate the capture (the default "global" mode forbids it process-wide)
            # capture on a stream of the engine's device (torch's default capture stream is made
            # once per process, on whichever device captured first)
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                logits = self._forward(bucket)
            pool = graph.pool()
            self.graphs[bucket] = (graph, logits)
        torch.cuda.synchronize(self.kv.device)

    def _fill_padding(self) -> None:
        ids, pos, blocks, offs, lens, _ = self._views(self.host_np, self.max_batch)
        ids[:] = pos[:] = offs[:] = lens[:] = 0
        blocks[:] = -1

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Replay the smallest bucket that holds ``seqs`` (all decoding one token) -> logits
        [len(seqs), vocab] fp32, a view of the graph's output (valid until the next replay)."""
        if self.use_graphs and not self.graphs:
            self.capture()
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
        # one copy of the fields and the bucket's table rows. The pinned buffer is free to
        # reuse: the previous step's sampled tokens were read back (a sync) after its copy.
        used = self.FIELDS * self.max_batch + bucket * self.max_blocks
        self.static[:used].copy_(self.host[:used], non_blocking=True)
        if not self.use_graphs:
            return self._forward(bucket)[:n]
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:n]
