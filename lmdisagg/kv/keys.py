"""Chunk keys: one name for the same KV bytes everywhere (engine, tiers, transports, router).

Scheme ``v1`` (KEY_SCHEME_VERSION = 1)::

    key_0 = XXH3_128( b"lmdisagg-kv" | version | namespace | 16 zero bytes | tokens_0 )
    key_i = XXH3_128( b"lmdisagg-kv" | version | namespace | key_{i-1}      | tokens_i )

    namespace = model fingerprint | dtype name | layout version     (see ``KeyNamespace.digest``)
    tokens_i  = token ids of chunk i as little-endian int32, exactly ``chunk_tokens`` of them

A request with a cache salt (vLLM's ``cache_salt``) starts its chain from ``salt_root(salt)``
instead of the 16 zero bytes: its keys, and so its cached chunks in every tier and index, are
found only by requests with the same salt (tenants cannot probe each other's prompts by timing).

Only full chunks get keys: a chunk's bytes are defined by every token before it (the parent
chain) and its own tokens, under one model, dtype and byte layout. Any change of those inputs
changes every key, so a stale chunk can never be found. Keys are 16 raw bytes; ``.hex()`` is used
in text (logs, Redis, file names).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import xxhash

KEY_SCHEME_VERSION = 1
_MAGIC = b"lmdisagg-kv"
_ROOT = bytes(16)

ChunkKey = bytes  # 16 bytes


@dataclass(frozen=True)
class KeyNamespace:
    """What, besides tokens, decides a chunk's bytes."""

    model_fingerprint: str  # lmdisagg.models.fingerprint(): config + weights identity
    dtype: str              # "float32", "bfloat16", ...
    layout_version: int     # KVLayout.VERSION

    def digest(self) -> bytes:
        text = f"{self.model_fingerprint}|{self.dtype}|{self.layout_version}"
        return xxhash.xxh3_128_digest(text.encode())


def salt_root(salt: str | None) -> ChunkKey:
    """The chain's first parent: 16 zero bytes, or a digest of the request's cache salt."""
    return _ROOT if not salt else xxhash.xxh3_128_digest(_MAGIC + b"-salt|" + salt.encode())


def chunk_keys(token_ids: Sequence[int], chunk_tokens: int, namespace: KeyNamespace | bytes,
               parent: ChunkKey = _ROOT) -> list[ChunkKey]:
    """Keys of every full chunk of ``token_ids`` (a trailing partial chunk gets none).
    ``namespace`` is a KeyNamespace or its ``digest()`` (what workers report to the router)."""
    ns = namespace if isinstance(namespace, bytes) else namespace.digest()
    head = _MAGIC + KEY_SCHEME_VERSION.to_bytes(2, "little") + ns
    arr = np.asarray(token_ids, dtype="<i4")
    keys = []
    for start in range(0, len(arr) - chunk_tokens + 1, chunk_tokens):
        parent = xxhash.xxh3_128_digest(head + parent + arr[start:start + chunk_tokens].tobytes())
        keys.append(parent)
    return keys
