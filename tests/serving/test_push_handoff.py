"""``transport.push``: the decode worker expects a prompt's KV while it is prefilled, and the prefill
worker pushes it (nccl; gloo on this CPU), through the Python API on a real Ray cluster."""
from __future__ import annotations

import time
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

        # an abort whose expectation must wait its turn behind an earlier one (a pair's pushes land
        # in order) answers at once: the router aborts the prefill worker only once it has. The
        # router's calls, made on the deployment's actors; the prefill worker never pushes these
        import ray

        from lmdisagg.workers.messages import GenerateRequest
        prefill, decode = pipe.actors
        source, layout, ns = ray.get(prefill.__ray_call__.remote(lambda w: (
            w.kv.buffer.desc, tuple(w.engine.layout.__dict__.values()), w.engine.namespace.digest())), timeout=60)
        reqs = [GenerateRequest(f"unpushed-{i}", engine.encode(f"Prompt {i}, never pushed. " * 20),
                                SamplingParams(max_tokens=4)) for i in range(2)]
        for r in reqs:
            assert ray.get(decode.expect.remote(r, source, layout, ns), timeout=60) is not None
        t0 = time.monotonic()
        ray.get(decode.abort.remote(reqs[1].request_id), timeout=60)
        assert time.monotonic() - t0 < 3, "the abort waited for its expectation's turn"
        ray.get(decode.abort.remote(reqs[0].request_id), timeout=60)

        # nothing stays held or reserved on either side
        wait_until(lambda: all(s.free_blocks == s.total_blocks and s.stats["held"] == 0 and s.running == 0
                               for s in pipe.worker_stats().values()), 20)
    finally:
        pipe.shutdown()


def test_a_slow_grammar_compile_holds_up_no_other_prompts_push(local_ray, engine):
    """Pushes to one decode worker land in the order of its expectations. A structured prompt's
    expectation is made only once its grammar is compiled (seconds for a large schema), so a
    plain prompt sent meanwhile is pushed, and finished, before the structured one's first token.
    With a KV store (host tier) on, so that every prompt reaches the engine through a store lookup."""
    import json
    import threading
    import time

    from lmdisagg import Pipeline, Role
    from lmdisagg.config import TransportSettings
    pipe = Pipeline(model="smollm2-135m", prefill=Role(), decode=Role(), kv_cache_bytes=1 << 29,
                    transport=TransportSettings(name="nccl", push=True), store={"cpu_bytes": 1 << 28}).start()
    # seconds to compile on the 2-core VM (xgrammar; 1000 fields: 17 s on an AVX2 EPYC under
    # load, 3000: 63 s); a plain request takes a fraction of that
    n = 800
    schema = json.dumps({"type": "object", "required": [f"f{i}" for i in range(n)], "properties": {
        f"f{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1},{i % 7 + 9}}}-[0-9]{{2,5}}$"} for i in range(n)}})
    seen: dict = {}

    def structured():
        try:
            for d in pipe.stream("Fill in the form.", max_tokens=2, structured=("json", schema)):
                seen.setdefault("first", time.monotonic())
        except Exception as e:  # noqa: BLE001 - reported below
            seen["error"] = e
    try:
        expected = engine.generate("Name a colour.", SamplingParams(max_tokens=6, ignore_eos=True))[0]
        th = threading.Thread(target=structured)
        th.start()
        wait_until(lambda: pipe.worker_stats()["prefill-0"].stats["requests"] >= 1, 30)  # compiling now
        assert pipe.generate("Name a colour.", max_tokens=6, ignore_eos=True).token_ids == expected.token_ids
        plain_done = time.monotonic()
        th.join(120)
        assert "error" not in seen and "first" in seen
        assert plain_done < seen["first"], "the plain prompt's push waited for the structured one's"
        d = pipe.worker_stats()["decode-0"].stats
        assert d["pushed_chunks"] == 2 and d["pulled_chunks"] == 0 and d["transfer_failures"] == 0
    finally:
        pipe.shutdown()


def test_push_needs_a_medium_that_can_push():
    from pydantic import ValidationError

    from lmdisagg.config import ClusterConfig, TransportSettings
    with pytest.raises(ValidationError, match="transport.push needs a two-sided medium"):
        TransportSettings(name="shm", push=True)
    assert ClusterConfig.model_validate({"transport": {"name": "nccl", "push": True}}).transport.push
