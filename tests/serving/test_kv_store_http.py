"""The tiered KV store through the HTTP API on a disaggregated CPU deployment: the same ~1K-token
prompt again is served from the engine (L1), host memory (L2), local disk (L3) or Redis (L4) with
identical text and the cached tokens reported; a restarted deployment reuses disk and Redis; a
request's cache_salt keeps its chunks apart in every tier; a Redis outage only costs recomputation."""
from __future__ import annotations

import random

import httpx
import pytest

from lmdisagg.engine import SamplingParams
from tests.store.conftest import RedisServer

MODEL = "smollm2-135m"
WORDS = ("river stone cloud maple lantern harbor quiet ember orbit velvet meadow signal copper "
         "thistle glacier compass").split()


def prompt(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(900))  # ~1K tokens: 3 full 256-token chunks


def deploy(local_ray, store: dict):
    from lmdisagg import Pipeline, Role
    # L1 made tiny: the prefill engine holds 5 blocks, so a second 1K prompt (4 blocks) evicts the first
    return Pipeline(model=MODEL, prefill=Role(), decode=Role(), transport="shm", max_model_len=1280,
                    num_blocks=5, store=store).start()


def ask(pipe, text: str, **extra):
    from openai import OpenAI
    r = OpenAI(base_url=pipe.url, api_key="x", max_retries=0, timeout=600).completions.create(
        model=MODEL, prompt=text, max_tokens=12, temperature=0, extra_body={"ignore_eos": True, **extra})
    return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens


def served(pipe) -> dict:
    w = httpx.get(pipe.url[:-3] + "/stats", timeout=30).json()["workers"]["prefill-0"]
    return {t: w.get(f"store_{t}_chunks", 0) for t in ("cpu", "disk", "redis")}


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis-http")).start()
    yield srv
    srv.stop()


def test_reuse_from_every_tier_and_after_restart(local_ray, redis, engine, tmp_path):
    a, b = prompt(1), prompt(2)
    expect = {p: engine.generate(p, SamplingParams(max_tokens=12, ignore_eos=True))[0].text for p in (a, b)}
    disk = str(tmp_path / "kv")
    full = {"cpu_bytes": 1 << 30, "disk_path": disk, "disk_bytes": 1 << 30, "remote_url": redis.url}

    pipe = deploy(local_ray, full)
    try:
        text, cached, n = ask(pipe, a)
        assert text == expect[a] and cached == 0
        chunks = n // 256
        text, cached, _ = ask(pipe, a)                 # L1: still in the prefill engine
        assert text == expect[a] and cached == chunks * 256
        assert served(pipe) == {"cpu": 0, "disk": 0, "redis": 0}
        text, cached, _ = ask(pipe, b)                 # evicts a from the 12-block engine
        assert text == expect[b] and cached == 0
        text, cached, _ = ask(pipe, a)                 # L2 host memory fills what L1 lost
        assert text == expect[a] and cached == chunks * 256
        assert served(pipe)["cpu"] > 0
    finally:
        pipe.shutdown()

    pipe = deploy(local_ray, {**full, "cpu_bytes": 0})  # restart, L2 off: local disk survived
    try:
        text, cached, _ = ask(pipe, a)
        assert text == expect[a] and cached == chunks * 256
        assert served(pipe)["disk"] == chunks
    finally:
        pipe.shutdown()

    pipe = deploy(local_ray, {"remote_url": redis.url})  # restart, only Redis (another node's view)
    try:
        # a request with a cache salt finds none of the unsalted chunks Redis holds (its chain has
        # other keys), nor another salt's, but its own again
        text, cached, _ = ask(pipe, b, cache_salt="tenant-x")
        assert text == expect[b] and cached == 0 and served(pipe)["redis"] == 0
        text, cached, _ = ask(pipe, b, cache_salt="tenant-y")
        assert text == expect[b] and cached == 0
        text, cached, _ = ask(pipe, b, cache_salt="tenant-y")
        assert text == expect[b] and cached == chunks * 256
        text, cached, _ = ask(pipe, b)
        assert text == expect[b] and cached == chunks * 256
        assert served(pipe)["redis"] == chunks
        redis.stop()                                   # Redis gone mid-run: recompute, no hang
        try:
            text, cached, _ = ask(pipe, a)
            assert text == expect[a] and cached == 0
            st = httpx.get(pipe.url[:-3] + "/stats", timeout=30).json()["workers"]["prefill-0"]
            assert st["store_errors"] > 0
        finally:
            redis.start()
    finally:
        pipe.shutdown()
