"""No lost requests: a worker process killed while it serves a request (SIGKILL, as the OOM
killer or a crashed node does it) costs the client nothing. The router resumes the request on live
workers with the tokens already streamed, and the client, the official openai client over HTTP
against `lmdisagg serve`, gets exactly the tokens one uninterrupted engine gives."""
from __future__ import annotations

import concurrent.futures
import os
import signal

import httpx
import pytest
import yaml

from lmdisagg.engine import SamplingParams
from tests.serving.conftest import ROOT, start_serve, stop_serve, wait_until

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def served2x2(tmp_path_factory):
    """local-cpu.yaml with 2 prefill and 2 decode actors."""
    cfg = yaml.safe_load((ROOT / "cluster_configs/local-cpu.yaml").read_text())
    cfg["prefill"]["replicas"] = cfg["decode"]["replicas"] = 2
    path = tmp_path_factory.mktemp("migration") / "2p2d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s = start_serve(str(path))
    yield s
    assert stop_serve(s) == 0, "".join(s.log[-40:])


def migrations(s) -> dict[str, float]:
    out = {}
    for line in httpx.get(s.base + "/metrics", timeout=30).text.splitlines():
        if line.startswith("lmdisagg_request_migrations_total{"):
            role = line.split('role="')[1].split('"')[0]
            out[role] = float(line.rsplit(" ", 1)[1])
    return out


def kill(s, pred, what: str) -> dict:
    """SIGKILL the one live worker process that ``pred`` picks from /stats."""
    ws = [w for w in s.stats()["workers"].values() if w["alive"] and pred(w)]
    assert len(ws) == 1, f"expected one {what} worker, got {ws}"
    os.kill(ws[0]["pid"], signal.SIGKILL)
    return ws[0]


def test_decode_worker_killed_mid_stream(served2x2, engine):
    s = served2x2
    n = 64
    messages = [{"role": "user", "content": "Tell me a long story about a dragon and a lighthouse."}]
    expected = engine.generate([messages], SamplingParams(max_tokens=n, ignore_eos=True), chat=True)[0]
    stream = s.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=n, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks, victim = [], None
    for ch in stream:
        chunks.append(ch)
        if victim is None and sum(1 for c in chunks if c.choices) >= 8:  # decoding on one decode worker
            victim = kill(s, lambda w: w["role"] == "decode" and w["running"] > 0, "decoding")
    assert victim is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra or {}).get("token_ids") or []]
    if ids:  # streamed token ids (vLLM's return_token_ids), where the server sends them per chunk
        assert ids == expected.token_ids
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == expected.prompt_tokens and usage.completion_tokens == n
    assert migrations(s) == {"decode": 1.0}
    health = httpx.get(s.base + "/health", timeout=30).json()
    dead = [wid for wid, w in health["workers"].items() if not w["alive"]]
    assert len(dead) == 1 and health["status"] == "ok"


def test_prefill_worker_killed_mid_prefill(served2x2, engine):
    """Killed before the first token: the request is placed again from scratch."""
    s = served2x2
    prompt = " ".join(["the lighthouse keeper counted the waves and wrote them down"] * 280)  # ~3k tokens
    expected = engine.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True))[0]
    before = migrations(s)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(lambda: s.client().completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                            extra_body={"ignore_eos": True}))
        busy = lambda w: w["role"] == "prefill" and w["router_in_flight_prompt_tokens"] > 0  # prefilling it
        wait_until(lambda: any(w["alive"] and busy(w) for w in s.stats()["workers"].values()), 60, interval=0.02)
        kill(s, busy, "prefilling")
        r = fut.result(timeout=300)
    assert r.choices[0].text == expected.text
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == expected.prompt_tokens
    assert migrations(s) == {**before, "prefill": 1.0}


def test_survivors_serve_and_free_everything(served2x2, engine):
    """After both kills one prefill and one decode worker are left: they serve, and the requests
    that were moved off the dead workers left nothing allocated on them."""
    s = served2x2
    r = s.client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text == engine.generate("The capital of France is", SamplingParams(max_tokens=8))[0].text

    def idle():
        ws = [w for w in s.stats()["workers"].values() if w["alive"]]
        ok = len(ws) == 2 and all(w["running"] == 0 and w["held"] == 0 and w["free_blocks"] == w["total_blocks"]
                                  for w in ws)
        return ws if ok else None
    wait_until(idle, 30)
