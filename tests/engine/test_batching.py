"""Continuous batching gives the same tokens as running each request alone."""
from __future__ import annotations

from lmdisagg.engine import SamplingParams
from tests.engine.test_prefix_cache import long_prompt


def test_eight_concurrent_requests_match_sequential(engine):
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    lengths = [3, 17, 60, 129, 255, 256, 300, 520]
    prompts = [long_prompt(engine, n, seed=10 + i) for i, n in enumerate(lengths)]
    alone = [engine.generate(p, params)[0].token_ids for p in prompts]
    engine.blocks.__init__(engine.blocks.num_blocks, engine.blocks.chunk_tokens)  # drop the prefix cache
    steps = engine.stats.steps
    together = engine.generate(prompts, params)
    assert engine.stats.steps - steps <= 16 + 1   # really batched: about one step per token
    for a, t in zip(alone, together):
        assert t.token_ids == a


def test_requests_arriving_mid_decode(engine):
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    p1, p2 = long_prompt(engine, 40, seed=31), long_prompt(engine, 90, seed=32)
    ref1, ref2 = (engine.generate(p, params)[0].token_ids for p in (p1, p2))
    engine.add_request("a", p1, params)
    got = {"a": [], "b": []}
    for i in range(100):
        if i == 5:
            engine.add_request("b", p2, params)
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        if not engine.has_unfinished():
            break
    assert got == {"a": ref1, "b": ref2}


def test_seeded_sampling_is_reproducible(engine):
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    a = engine.generate("Write a poem about the sea.", p)[0]
    b = engine.generate(["Write a poem about the sea.", "Another prompt"], p)[0]
    assert a.token_ids == b.token_ids
    c = engine.generate("Write a poem about the sea.", SamplingParams(**{**p.__dict__, "seed": 99}))[0]
    assert c.token_ids != a.token_ids


def test_stop_strings_and_stop_tokens(engine):
    base = engine.generate("Count: 1, 2, 3, 4,", SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert " 6" in base.text
    cut = engine.generate("Count: 1, 2, 3, 4,", SamplingParams(max_tokens=20, stop=(" 6",), ignore_eos=True))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base.text[:base.text.index(" 6")]
    tok = base.token_ids[3]
    st = engine.generate("Count: 1, 2, 3, 4,", SamplingParams(max_tokens=20, stop_token_ids=(tok,),
                                                              ignore_eos=True))[0]
    assert st.finish_reason == "stop" and st.token_ids == base.token_ids[:base.token_ids.index(tok) + 1]
