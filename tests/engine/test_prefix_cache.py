"""Prefix cache by chunk key, and the export/import seam."""
from __future__ import annotations

import random

from lmdisagg.engine import Engine, SamplingParams


def long_prompt(engine, n_tokens: int, seed: int = 0) -> list[int]:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jam".split()
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += engine.encode(" ".join(rng.choice(words) for _ in range(64)) + ".")
    return ids[:n_tokens]


def test_shared_prefix_computes_only_new_chunks(engine):
    t = engine.config.chunk_tokens
    prefix = long_prompt(engine, 1000)
    a = prefix + engine.encode(" Question one: what did the fox do?")
    b = prefix + engine.encode(" Question two: who boxed the jam?")
    params = SamplingParams(max_tokens=24, ignore_eos=True)

    before = engine.stats.computed_prompt_tokens
    first = engine.generate(a, params)[0]
    assert first.cached_tokens == 0
    assert engine.stats.computed_prompt_tokens - before == len(a)

    before = engine.stats.computed_prompt_tokens
    second = engine.generate(b, params)[0]
    shared_chunks = 1000 // t                      # full chunks inside the shared 1000 tokens
    assert second.cached_tokens == shared_chunks * t
    assert engine.stats.computed_prompt_tokens - before == len(b) - shared_chunks * t

    # identical output to a cold engine computing everything
    cold = Engine(model="smollm2-135m", kv_cache_bytes=1 << 29)
    ref = cold.generate(b, params)[0]
    assert ref.cached_tokens == 0
    assert second.token_ids == ref.token_ids


def test_cache_salt_keeps_prefixes_apart(engine):
    """vLLM's cache_salt: a salted request reuses only chunks computed under the same salt; the
    tokens do not change."""
    t = engine.config.chunk_tokens
    prompt = long_prompt(engine, 2 * t + 40, seed=7)
    keys = {s: engine.chunk_keys(prompt, s) for s in (None, "a", "b")}
    assert len({tuple(k) for k in keys.values()}) == 3 and keys["a"] == engine.chunk_keys(prompt, "a")
    outs = {}
    for salt, cached in ((None, 0), ("a", 0), ("b", 0), ("a", 2 * t), (None, 2 * t), ("b", 2 * t)):
        r = engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True, cache_salt=salt))[0]
        assert r.cached_tokens == cached, (salt, r.cached_tokens)
        outs.setdefault(tuple(r.token_ids), []).append(salt)
    assert len(outs) == 1  # the same tokens under every salt


def test_export_import_into_fresh_engine(engine):
    t = engine.config.chunk_tokens
    prompt = long_prompt(engine, 3 * t + 37, seed=1)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    src = engine.generate(prompt, params)[0]
    keys = engine.chunk_keys(prompt)
    assert len(keys) == 3
    payloads = [p.clone() for p in engine.export_chunks(keys)]
    assert tuple(payloads[0].shape) == engine.layout.chunk_shape
    assert payloads[0].numel() * payloads[0].element_size() == engine.layout.chunk_nbytes

    fresh = Engine(model="smollm2-135m", kv_cache_bytes=1 << 29)
    assert fresh.chunk_keys(prompt) == keys            # same model, dtype, layout -> same keys
    assert fresh.import_chunks(keys, payloads) == 3
    assert fresh.import_chunks(keys, payloads) == 0    # already there: nothing copied twice
    before = fresh.stats.computed_prompt_tokens
    got = fresh.generate(prompt, params)[0]
    assert got.cached_tokens == 3 * t
    assert fresh.stats.computed_prompt_tokens - before == 37
    assert got.token_ids == src.token_ids
    assert fresh.blocks.num_free == fresh.blocks.num_blocks


def test_whole_prompt_cached_recomputes_last_chunk(engine):
    t = engine.config.chunk_tokens
    prompt = long_prompt(engine, 2 * t, seed=2)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a = engine.generate(prompt, params)[0]
    b = engine.generate(prompt, params)[0]
    assert b.cached_tokens == t  # the last full chunk is recomputed to get logits
    assert a.token_ids == b.token_ids


def test_keys_depend_on_model_dtype_and_position(engine):
    from lmdisagg.kv.keys import KeyNamespace, chunk_keys
    ids = list(range(100, 100 + 64))
    ns = KeyNamespace("m", "float32", 1)
    k = chunk_keys(ids, 16, ns)
    assert len(k) == 4 and len(set(k)) == 4 and all(len(x) == 16 for x in k)
    assert chunk_keys(ids, 16, KeyNamespace("m", "bfloat16", 1)) != k
    assert chunk_keys(ids, 16, KeyNamespace("other", "float32", 1)) != k
    # chained: the same chunk tokens after a different prefix give a different key
    shifted = list(range(1, 17)) + ids[16:]
    assert chunk_keys(shifted, 16, ns)[1] != k[1]
    assert chunk_keys(ids[:40], 16, ns) == k[:2]


def test_kv_events_report_stored_and_evicted():
    e = Engine(model="smollm2-135m", num_blocks=8, max_model_len=1024)
    e.enable_kv_events()
    t = e.config.chunk_tokens
    p1 = long_prompt(e, 3 * t + 5, seed=40)
    e.generate(p1, SamplingParams(max_tokens=4, ignore_eos=True))
    ev = e.drain_kv_events()
    assert ev == [("stored", k) for k in e.chunk_keys(p1)]
    assert e.drain_kv_events() == []
    p2 = long_prompt(e, 3 * t + 5, seed=41)  # 8 blocks: p1's 4 + p2's 4 fit...
    p3 = long_prompt(e, 3 * t + 5, seed=42)  # ... p3 must evict p1's cached chunks (LRU)
    e.generate(p2, SamplingParams(max_tokens=4, ignore_eos=True))
    e.generate(p3, SamplingParams(max_tokens=4, ignore_eos=True))
    ev = e.drain_kv_events()
    evicted = [k for kind, k in ev if kind == "evicted"]
    assert set(evicted) == set(e.chunk_keys(p1))
    assert e.cached_prefix(e.chunk_keys(p1)) == 0 and e.cached_prefix(e.chunk_keys(p3)) == 3
