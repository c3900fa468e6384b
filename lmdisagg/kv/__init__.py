"""KV chunk keys, the chunk layout, and (later) the tiered store."""
from lmdisagg.kv.keys import KEY_SCHEME_VERSION, ChunkKey, chunk_keys
from lmdisagg.kv.layout import KVLayout

__all__ = ["KEY_SCHEME_VERSION", "ChunkKey", "chunk_keys", "KVLayout"]
