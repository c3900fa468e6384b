"""Mooncake-format request traces: load, validate, and turn hash ids into chunk keys and tokens.

One JSON object per line (blank lines are skipped)::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

``timestamp`` is the arrival in ms; ``hash_ids`` name the prompt's ``block_tokens``-token blocks
(the last one may be partial), and two requests sharing their first k ids share k blocks of
prefix. Chunk keys chain the ids (``key_i = XXH3_128(key_{i-1} | id_i)``), so equal id prefixes
give equal keys and a key names its whole prefix, exactly like the engine's chunk keys.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from lmdisagg.errors import InvalidRequestError

_ROOT = xxhash.xxh3_128_digest(b"lmdisagg-sim-trace-v1")
_MAX_REPORTED = 20


class TraceError(InvalidRequestError):
    """The trace file is missing, empty, or has malformed lines (``lines`` lists their numbers)."""

    def __init__(self, message: str, lines: list[int] | None = None):
        super().__init__(message, param="trace")
        self.lines = lines or []


@dataclass
class TraceRequest:
    index: int                 # position after sorting by arrival
    line: int                  # 1-based line number in the file
    arrival_s: float
    input_length: int          # prompt tokens
    output_length: int         # completion tokens
    hash_ids: list[int]        # one per block of the prompt

    def chunk_keys(self) -> list[bytes]:
        keys, parent = [], _ROOT
        for h in self.hash_ids:
            parent = xxhash.xxh3_128_digest(parent + h.to_bytes(8, "little"))
            keys.append(parent)
        return keys

    def token_ids(self, block_tokens: int) -> np.ndarray:
        """Synthetic prompt tokens: block ``h`` is ``h*block_tokens .. h*block_tokens+block_tokens-1``
        (equal ids give equal tokens); blocks past the ids get unique negative tokens."""
        ids = np.asarray(self.hash_ids, np.int64)
        toks = (ids[:, None] * block_tokens + np.arange(block_tokens, dtype=np.int64)).ravel()
        if len(toks) < self.input_length:
            tail = -(self.index * (1 << 24) + np.arange(1, self.input_length - len(toks) + 1, dtype=np.int64))
            toks = np.concatenate([toks, tail])
        return toks[:self.input_length]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(obj, block_tokens: int) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in ("timestamp", "input_length", "output_length", "hash_ids") if k not in obj]
    if missing:
        return f"missing field(s) {missing}"
    ts, il, ol, ids = obj["timestamp"], obj["input_length"], obj["output_length"], obj["hash_ids"]
    if not (_is_int(ts) or isinstance(ts, float)) or ts < 0:
        return f"timestamp must be a number >= 0 (ms), got {ts!r}"
    if not _is_int(il) or il < 1:
        return f"input_length must be an integer >= 1, got {il!r}"
    if not _is_int(ol) or ol < 1:
        return f"output_length must be an integer >= 1, got {ol!r}"
    if not isinstance(ids, list) or not all(_is_int(h) and h >= 0 for h in ids):
        return "hash_ids must be a list of integers >= 0"
    if len(ids) > -(-il // block_tokens):
        return f"{len(ids)} hash_ids for {il} tokens: more than one per {block_tokens}-token block"
    return None


def load_trace(path: str | Path, *, limit: int | None = None, block_tokens: int = 512,
               speedup: float = 1.0) -> list[TraceRequest]:
    """Read and validate a whole trace (first ``limit`` requests if given), sorted by arrival.
    ``speedup`` divides every arrival time (2.0 = twice the request rate).
    Raises ``TraceError`` naming every bad line (up to 20 of them)."""
    p = Path(path)
    try:
        f = p.open("rb")
    except OSError as e:
        raise TraceError(f"cannot read trace {p}: {e.strerror or e}") from None
    out: list[TraceRequest] = []
    bad: list[tuple[int, str]] = []
    with f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                bad.append((lineno, f"not JSON ({e.__class__.__name__}: {str(e)[:80]})"))
                continue
            why = _check(obj, block_tokens)
            if why:
                bad.append((lineno, why))
                continue
            out.append(TraceRequest(0, lineno, obj["timestamp"] / 1000.0 / speedup, obj["input_length"],
                                    obj["output_length"], obj["hash_ids"]))
    if bad:
        shown = "\n".join(f"  line {n}: {why}" for n, why in bad[:_MAX_REPORTED])
        more = f"\n  ... and {len(bad) - _MAX_REPORTED} more" if len(bad) > _MAX_REPORTED else ""
        raise TraceError(f"{len(bad)} malformed line(s) in trace {p}:\n{shown}{more}", [n for n, _ in bad])
    if not out:
        raise TraceError(f"trace {p} has no requests")
    out.sort(key=lambda r: r.arrival_s)
    for i, r in enumerate(out):
        r.index = i
    return out
