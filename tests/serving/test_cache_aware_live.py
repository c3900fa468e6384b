"""Cache-aware placement live: `lmdisagg serve` with 2 prefill workers (cluster_configs/
cache-aware-cpu.yaml). Prompts sharing a long prefix go to the worker holding it and report
cached tokens; once that worker evicts the chunks, the router's index forgets them within one
event batch (one poll)."""
from __future__ import annotations

import random

import httpx
import pytest

from tests.serving.conftest import start_serve, stop_serve, wait_until

MODEL = "smollm2-135m"


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    vocab = "apple river stone cloud north garden silver window bridge candle forest harbor".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def served_ca():
    s = start_serve("cluster_configs/cache-aware-cpu.yaml")
    yield s
    assert stop_serve(s) == 0


def test_prefix_lands_where_cached_and_index_follows_evictions(served_ca, engine):
    s = served_ca
    c = s.client()

    def ask(text):
        r = c.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0)
        return r.usage.prompt_tokens_details.cached_tokens

    def stats():
        return s.stats()

    def holders(text, **extra):
        r = httpx.post(s.base + "/debug/placement", json={"prompt": text, **extra}, timeout=30).json()
        return {w: v["chunks"] for w, v in r["workers"].items()}

    prefix = words(1, 800)                      # ~1000 tokens: 3 full chunks
    n_chunks = len(engine.chunk_keys(engine.encode(prefix + " Question 0?"))) 
    assert ask(prefix + " Question 0?") == 0
    where = wait_until(lambda: [w for w, n in holders(prefix).items() if n == n_chunks], 5)
    assert len(where) == 1
    home = where[0]
    assert set(holders(prefix, cache_salt="tenant-b").values()) == {0}  # a salted request's chain differs
    before = stats()["placement"]["decisions"]
    for i in range(1, 4):                       # same prefix: every one goes home, reuses it
        assert ask(prefix + f" Question {i}?") == n_chunks * 256
    after = stats()["placement"]["decisions"]
    assert after.get(home, 0) - before.get(home, 0) == 3
    # unrelated long prompts until home has evicted the prefix (8-block pools)
    for seed in range(2, 12):
        ask(words(seed, 800))
        if holders(prefix)[home] < n_chunks:
            break

    def index_matches_engines():
        st = stats()
        return all(st["index"]["workers"][w]["keys"] == st["workers"][w]["cached_blocks"]
                   for w in st["index"]["workers"]) and st
    st = wait_until(index_matches_engines, 2.0, 0.1)   # one poll = one event batch
    assert holders(prefix)[home] < n_chunks
    assert st["index"]["stats"]["evicted"] > 0 and st["index"]["stats"]["gaps"] == 0
    assert st["workers"][home]["cached_blocks"] <= 8
    # both prefill workers took work: the guard keeps load spread
    assert all(n > 0 for n in st["placement"]["decisions"].values()) and len(st["placement"]["decisions"]) == 2
