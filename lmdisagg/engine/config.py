"""Engine internals (a frozen dataclass; users set these through ClusterConfig / the CLI)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"          # a known name, a dummy shape, or a local HF directory
    device: str = "cpu"                  # "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"                  # "auto" (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    chunk_tokens: int = 256              # tokens per KV block = per chunk key
    num_blocks: int | None = None        # KV blocks; default from kv_cache_bytes
    kv_cache_bytes: int | None = None    # default: 2 GiB on CPU, 85% of free memory on CUDA
    max_model_len: int | None = None     # default: the model's max_position_embeddings (capped at 32K)
    max_num_seqs: int = 64               # running sequences at once
    max_num_batched_tokens: int | None = None  # new tokens per step; default max(max_model_len, 8192)
    seed: int = 0                        # dummy weights and unseeded sampling
    cuda_graphs: bool = True             # CUDA: graphs of decode steps and of prefill steps <= 512 tokens

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.device == "cpu" else "bfloat16"
