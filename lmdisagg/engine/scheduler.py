"""Continuous batching: which sequences run in the next step.

One step holds every running sequence (one new token each: decode) plus newly admitted
sequences (all their uncomputed tokens: prefill), within ``max_num_batched_tokens``.

    add ──▶ waiting ──admit (prefix-cache hit + fresh blocks)──▶ running ──finish/abort──▶ freed
                ▲                                                  │
                └──────────── preempt (out of blocks: recompute) ──┘

Admission looks up the prompt's chunk keys in the block manager: the leading cached chunks are
shared (reference taken), only the rest is computed. If a whole prompt is cached, its last chunk
is recomputed anyway so the step has a token to take logits from.
"""
from __future__ import annotations

from collections import deque

from lmdisagg.engine.block_manager import BlockManager
from lmdisagg.engine.request import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, key_fn):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.key_fn = key_fn  # Sequence -> chunk keys of its full chunks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """-> (prefills, decodes) for this step. Blocks are taken here."""
        decodes = self._reserve_decode_slots()
        prefills: list[Sequence] = []
        budget = self.max_num_batched_tokens - len(decodes)
        while self.waiting and len(self.running) + len(prefills) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, budget, first=not prefills and not decodes):
                break
            self.waiting.popleft()
            budget -= len(seq) - seq.num_computed_tokens
            prefills.append(seq)
        for seq in prefills:
            seq.status = Status.RUNNING
        self.running.extend(prefills)
        return prefills, decodes

    def _admit(self, seq: Sequence, budget: int, first: bool) -> bool:
        t = self.blocks.chunk_tokens
        keys = self.key_fn(seq)
        # prompt logprobs need the logits of every prompt token: none of it comes from the cache
        hit = 0 if seq.wants_prompt_logprobs else self.blocks.lookup(keys)
        if hit * t >= len(seq):
            hit -= 1  # need at least one token to compute
        new_tokens = len(seq) - hit * t
        if new_tokens > budget and not first:
            return False
        need = -(-len(seq) // t) - hit
        # hit blocks that sit in the free list are taken out of it by acquire()
        revived = sum(1 for k in keys[:hit] if self.blocks.blocks[self.blocks.by_key[k]].ref_count == 0)
        if self.blocks.num_free - revived < need:
            return False
        seq.block_table = self.blocks.acquire_prefix(keys[:hit])
        seq.block_table += [self.blocks.allocate() for _ in range(need)]
        seq.num_cached_tokens = seq.num_computed_tokens = hit * t
        seq.num_registered = hit
        return True

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Make sure each running sequence has a slot for its next token; preempt if not."""
        t = self.blocks.chunk_tokens
        kept: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            if len(seq) <= len(seq.block_table) * t:
                kept.append(seq)
                continue
            while not self.blocks.num_free and queue:
                self._preempt(queue.pop())  # the newest gives way
            if not self.blocks.num_free:
                self._preempt(seq)
                continue
            seq.block_table.append(self.blocks.allocate())
            kept.append(seq)
        self.running = kept
        return list(kept)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_table(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose prompt KV is already in its (held) blocks: goes straight to decode."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def detach(self, seq: Sequence) -> None:
        """Stop scheduling ``seq`` but keep its blocks (prefill_only requests)."""
        if seq in self.running:
            self.running.remove(seq)
        seq.status = Status.FINISHED

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_table(seq.block_table)
        seq.status = Status.FINISHED
