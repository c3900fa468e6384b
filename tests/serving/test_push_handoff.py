"""``transport.push``: the decode worker expects a prompt's KV while it is prefilled, and the prefill
worker pushes it (nccl; gloo on this CPU), through the Python API on a real Ray cluster."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from lmdisagg.engine import SamplingParams
from tests.serving.conftest import wait_until

LONG = "Three facts about the moon: " * 100  # full chunks of 256 tokens and a tail


def blocks(engine, prompt: str) -> tuple[int, int]:
    """(full chunks, blocks) of a prompt's KV."""
    n, t = len(engine.encode(prompt)), engine.config.chunk_tokens
    return n // t, -(-n // t)


def test_push_gives_the_same_tokens_and_frees_every_block(local_ray, engine):
    """With checksums: the source sends an xxh3 per block with its push, checked on arrival (the
    migration tests push without)."""
    from lmdisagg import Pipeline, Role
    from lmdisagg.config import TransportSettings
    pipe = Pipeline(model="smollm2-135m", prefill=Role(), decode=Role(), kv_cache_bytes=1 << 29,
                    transport=TransportSettings(name="nccl", push=True, checksum=True)).start()

    def stats(role: str) -> dict:
        return pipe.worker_stats()[f"{role}-0"].stats

    full, n_long = blocks(engine, LONG)
    assert full >= 2 and n_long == full + 1
    try:
        # greedy and seeded requests: the tokens of one engine, the KV pushed, never pulled
        for prompt, kw in [(LONG, {}), ("Write a limerick about a cat.", {"temperature": 0.8, "seed": 11})]:
            expected = engine.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True, **kw))[0]
            assert pipe.generate(prompt, max_tokens=16, ignore_eos=True, **kw).token_ids == expected.token_ids
        d, p = stats("decode"), stats("prefill")
        assert d["pushed_chunks"] == n_long + 1 and p["pushed_chunks"] == d["pushed_chunks"]
        assert d["pulled_chunks"] == 0 and d["transfer_failures"] == 0 and d["recomputed_prompts"] == 0
        assert d["push_seconds"] > 0 and p["push_failures"] == 0

        # the long prompt again: its full chunks are cached on the decode worker, only the tail moves
        expected = engine.generate(LONG, SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert pipe.generate(LONG, max_tokens=8, ignore_eos=True).token_ids == expected.token_ids
        d = stats("decode")
        assert d["pushed_chunks"] == n_long + 2 and d["reused_chunks"] == full and d["pulled_chunks"] == 0

        # the first token ends the request: nothing is pushed, and the blocks the decode worker
        # held for it are freed; the pair's next push is not stuck behind it
        other = "List the planets of the solar system in order: " * 30
        expected = engine.generate(other, SamplingParams(max_tokens=1))[0]
        assert pipe.generate(other, max_tokens=1).token_ids == expected.token_ids
        expected = engine.generate("Name a colour.", SamplingParams(max_tokens=6, ignore_eos=True))[0]
        assert pipe.generate("Name a colour.", max_tokens=6, ignore_eos=True).token_ids == expected.token_ids
        assert stats("decode")["pushed_chunks"] == n_long + 3

        # six requests at once: their expectations and pushes interleave on one pair
        prompts = [f"Question {i}: why is the sky blue? " * (5 + 7 * i) for i in range(6)]
        want = [engine.generate(q, SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids for q in prompts]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda q: pipe.generate(q, max_tokens=8, ignore_eos=True).token_ids, prompts))
        assert got == want
        d, p = stats("decode"), stats("prefill")
        assert d["pulled_chunks"] == 0 and d["transfer_failures"] == 0 and d["recomputed_prompts"] == 0
        assert p["push_failures"] == 0 and p["pushed_chunks"] == d["pushed_chunks"]

        # nothing stays held or reserved on either side
        wait_until(lambda: all(s.free_blocks == s.total_blocks and s.stats["held"] == 0 and s.running == 0
                               for s in pipe.worker_stats().values()), 20)
    finally:
        pipe.shutdown()


def test_push_needs_a_medium_that_can_push():
    from pydantic import ValidationError

    from lmdisagg.config import ClusterConfig, TransportSettings
    with pytest.raises(ValidationError, match="transport.push needs a two-sided medium"):
        TransportSettings(name="shm", push=True)
    assert ClusterConfig.model_validate({"transport": {"name": "nccl", "push": True}}).transport.push
