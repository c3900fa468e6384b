"""Synthetic Mooncake-format traces with realistic prefix sharing (for tests and quick runs).

    shared system prompts (Zipf popularity)  ─┬─ session 1: turn 1 ─ turn 2 (turn 1 + new) ─ ...
                                              └─ session 2: ...
    fresh one-off prompts                        no sharing at all

Arrivals are Poisson. Every request is one JSON object exactly as in the Mooncake release:
``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids`` (one per 512-token block).
"""
from __future__ import annotations

import json
import random
from pathlib import Path


def synthetic_trace(n_requests: int, *, seed: int = 0, rate_per_s: float = 4.0, n_system: int = 20,
                    block_tokens: int = 512, p_continue: float = 0.5, p_fresh: float = 0.15) -> list[dict]:
    """``n_requests`` rows; ``p_continue`` of them continue an open session, ``p_fresh`` share nothing."""
    rng = random.Random(seed)
    next_id = 0

    def new_blocks(n: int) -> list[int]:
        nonlocal next_id
        out = list(range(next_id, next_id + n))
        next_id += n
        return out

    systems = [new_blocks(rng.randint(2, 24)) for _ in range(n_system)]
    weights = [1.0 / (i + 1) for i in range(n_system)]
    sessions: list[list[int]] = []
    rows, t = [], 0.0
    for _ in range(n_requests):
        t += rng.expovariate(rate_per_s)
        u = rng.random()
        if sessions and u < p_continue:
            i = rng.randrange(len(sessions))
            ids = sessions[i] + new_blocks(rng.randint(1, 6))
            sessions[i] = ids
        elif u < p_continue + p_fresh:
            ids = new_blocks(rng.randint(1, 40))
        else:
            ids = rng.choices(systems, weights)[0] + new_blocks(rng.randint(1, 10))
            sessions.append(ids)
            if len(sessions) > 64:
                sessions.pop(0)
        tokens = len(ids) * block_tokens - rng.randrange(block_tokens)
        rows.append({"timestamp": int(t * 1000), "input_length": tokens,
                     "output_length": rng.randint(1, 300), "hash_ids": ids})
    return rows


def write_trace(path: str | Path, rows: list[dict]) -> Path:
    p = Path(path)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p
