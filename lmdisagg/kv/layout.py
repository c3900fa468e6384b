"""The byte layout of one KV chunk, shared by the engine's cache, every transport and every tier.

The engine's paged cache is one tensor ``kv: [num_blocks, L, 2, T, H_kv, D]`` (T = chunk_tokens
tokens per block, one block = one chunk). So one chunk is one contiguous slab::

    chunk payload: [L, 2, T, H_kv, D]   (layer, K/V, token, kv head, head dim), C order
                   nbytes = L * 2 * T * H_kv * D * itemsize

and block ``b`` of the cache sits at byte offset ``b * chunk_nbytes`` of the cache buffer. That
lets a transport register the whole cache once and move chunks by (offset, length) with no
gather; transports never need to know what the bytes mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class KVLayout:
    VERSION = 1  # bump when the byte order of a chunk changes (it is part of every chunk key)

    num_layers: int
    num_kv_heads: int
    head_dim: int
    chunk_tokens: int
    dtype: str  # "float32" | "bfloat16" | "float16"

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.chunk_tokens, self.num_kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=torch_dtype(self.dtype)).element_size()

    @property
    def chunk_nbytes(self) -> int:
        n = 1
        for s in self.chunk_shape:
            n *= s
        return n * self.itemsize
