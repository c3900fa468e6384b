"""A time model of one GPU worker: the cache-aware policy's estimate and the simulator's clock.

All times in seconds. The defaults describe Llama-3-8B in bf16 on one H100 SXM (80 GB); each is
a CLI option of ``lmdisagg simulate`` and a keyword of ``make_policy("cache_aware", ...)``, so a
deployment can put in what it measured (e.g. with ``benchmarks/`` on its own GPUs)::

    prefill_s(new, cached) = overhead + new / prefill_tokens_per_s            (GEMMs, linear)
                             + new * (cached + (new + 1) / 2) * attn_pair_s  (causal attention)
    decode step            = decode_step_s + running * decode_seq_s
                             + kv_tokens_in_batch * kv_bytes_per_token / HBM bandwidth
    load / transfer        = bytes / bandwidth of the tier or link
"""
from __future__ import annotations

from dataclasses import dataclass

_GB = 1e9


@dataclass(frozen=True)
class CostModel:
    chunk_tokens: int = 256             # tokens per chunk (engine default 256; Mooncake traces 512)
    kv_bytes_per_token: int = 131072    # 32 layers * 2 (K, V) * 8 KV heads * 128 dims * 2 bytes
    prefill_tokens_per_s: float = 20000.0  # GEMMs: 2 * 8.0e9 FLOP/token at ~320 TFLOP/s (~1/3 of
                                           # the H100's 989 dense bf16 TFLOP/s)
    attn_pair_s: float = 1.3e-12        # one (query, key) pair: 4 * 32 layers * 32 heads * 128 dims
                                        # = 0.52 MFLOP at ~400 TFLOP/s (FlashAttention)
    prefill_overhead_s: float = 0.005   # per prefill: scheduling, kernel launches, first sample
    decode_step_s: float = 0.008        # one step at batch 1: 16 GB of weights / 3.35 TB/s + launches
    decode_seq_s: float = 5e-5          # per running sequence per step (sampling, small GEMM rows)
    hbm_gbps: float = 3350.0            # HBM3: every step reads each running sequence's KV
    cpu_gbps: float = 25.0              # host DRAM -> GPU (PCIe Gen5 x16, pinned, practical)
    disk_gbps: float = 5.0              # local NVMe -> GPU
    remote_gbps: float = 12.5           # remote KV store (100 Gb/s)
    intra_node_gbps: float = 300.0      # GPU -> GPU inside a node (NVLink)
    inter_node_gbps: float = 50.0       # GPU -> GPU across nodes (one 400 Gb/s RDMA NIC per GPU)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_tokens * self.kv_bytes_per_token

    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Compute time of a prefill of ``new_tokens`` after ``cached_tokens`` of cached prefix."""
        new = max(new_tokens, 1)  # a fully cached prompt still runs its last token
        return (self.prefill_overhead_s + new / self.prefill_tokens_per_s
                + new * (cached_tokens + (new + 1) / 2) * self.attn_pair_s)

    def load_s(self, tier: str, chunks: int) -> float:
        """Time to bring ``chunks`` from ``tier`` into GPU memory (0 for gpu / pending)."""
        gbps = {"cpu": self.cpu_gbps, "disk": self.disk_gbps, "remote": self.remote_gbps}.get(tier)
        return 0.0 if gbps is None or chunks <= 0 else chunks * self.chunk_bytes / (gbps * _GB)

    def transfer_s(self, tokens: int, same_node: bool) -> float:
        """Time to move ``tokens`` of KV from a prefill GPU to another (decode) GPU."""
        gbps = self.intra_node_gbps if same_node else self.inter_node_gbps
        return tokens * self.kv_bytes_per_token / (gbps * _GB)

    def decode_step(self, running: int, kv_tokens: int) -> float:
        """One decode step with ``running`` sequences holding ``kv_tokens`` of KV in all."""
        return (self.decode_step_s + running * self.decode_seq_s
                + kv_tokens * self.kv_bytes_per_token / (self.hbm_gbps * _GB))
