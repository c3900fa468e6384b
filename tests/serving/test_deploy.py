"""Deployments through the Python API, `ray job submit`, and where everything listens."""
from __future__ import annotations

import ipaddress
import itertools
import json
import os
import secrets
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from lmdisagg.engine import SamplingParams
from lmdisagg.errors import InvalidRequestError
from tests.serving.conftest import ROOT, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_python_pipeline(local_ray, engine, mode):
    from openai import OpenAI
    from lmdisagg import Pipeline, Role
    kw = {"colocated": Role(replicas=1)} if mode == "colocated" else {
        "prefill": Role(replicas=1), "decode": Role(replicas=1)}
    pipe = Pipeline(model="smollm2-135m", transport="shm", kv_cache_bytes=1 << 29, **kw).start()
    names = [a._actor_id for a in pipe.actors]
    try:
        prompt = "A short poem about autumn leaves:"
        expected = engine.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True))[0]
        got = pipe.generate(prompt, max_tokens=24, ignore_eos=True)
        assert got.token_ids == expected.token_ids and got.text == expected.text
        assert got.prompt_tokens == expected.prompt_tokens and got.completion_tokens == 24
        streamed = list(pipe.stream(prompt, max_tokens=24, ignore_eos=True))
        assert "".join(d.text for d in streamed) == expected.text and streamed[-1].finished
        # the new sampling fields through the Python API, in both modes: logprobs, a bias as a dict
        ban = {expected.token_ids[0]: -100}
        want = engine.generate(prompt, SamplingParams(max_tokens=6, logprobs=2, logit_bias=ban))[0]
        lp = pipe.generate(prompt, max_tokens=6, logprobs=2, logit_bias=ban)
        assert lp.token_ids == want.token_ids and lp.token_ids[0] != expected.token_ids[0]
        assert [v for v, _ in lp.logprobs] == pytest.approx([v for v, _ in want.logprobs], abs=1e-4)
        chat = pipe.generate("What is 2+2?", chat=True, max_tokens=30)
        assert chat.text == engine.generate("What is 2+2?", SamplingParams(max_tokens=30), chat=True)[0].text
        # structured outputs through the Python API: a schema as a dict, the same tokens as one engine;
        # a constraint that does not compile is refused before any worker runs it
        from tests.engine.test_structured import ASK, PERSON
        want = engine.generate([ASK], SamplingParams(max_tokens=60, structured=("json", PERSON)), chat=True)[0]
        got = pipe.generate(ASK, chat=True, max_tokens=60, structured=("json", PERSON))
        assert got.token_ids == want.token_ids and json.loads(got.text).keys() == PERSON["properties"].keys()
        with pytest.raises(InvalidRequestError, match="regex"):
            pipe.generate("hi", max_tokens=4, structured=("regex", "(unclosed"))
        # the router's URL is the same path, over HTTP
        r = OpenAI(base_url=pipe.url, api_key="x").completions.create(
            model="smollm2-135m", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].text == expected.text
    finally:
        pipe.shutdown()
    # shutdown() removes every actor
    from ray.util.state import list_actors  # noqa: F401 - state API may be unavailable without dashboard
    alive = [a for a in local_ray.util.list_named_actors(all_namespaces=True) if "lmdisagg-" in str(a)]
    assert alive == []
    assert names and pipe.actors == []


@pytest.mark.parametrize("transport", ["nccl", "mooncake", "fake"])
def test_every_transport_gives_the_same_tokens(local_ray, engine, transport):
    """Greedy and seeded requests served disaggregated over each transport equal one engine."""
    from lmdisagg import Pipeline, Role
    pipe = Pipeline(model="smollm2-135m", prefill=Role(), decode=Role(), transport=transport,
                    kv_cache_bytes=1 << 29).start()
    try:
        for prompt, kw in [("Three facts about the moon: " * 40, {}),
                           ("Write a limerick about a cat.", {"temperature": 0.8, "seed": 11})]:
            expected = engine.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True, **kw))[0]
            got = pipe.generate(prompt, max_tokens=16, ignore_eos=True, **kw)
            assert got.token_ids == expected.token_ids
        st = pipe.worker_stats()["decode-0"].stats
        assert st["pulled_chunks"] > 0 and st["transfer_failures"] == 0 and st["recomputed_prompts"] == 0
        assert 0 < st["transfer_seconds"] <= st["pull_seconds"]  # the transport's time, within the pull's
    finally:
        pipe.shutdown()


@pytest.mark.parametrize("fault", [{"fail_prob": 1.0}, {"corrupt_prob": 1.0}], ids=["failed", "corrupt"])
def test_failed_transfers_recompute_and_lose_nothing(local_ray, engine, fault):
    """Every KV pull fails (or arrives corrupt, caught by checksums): each request still completes
    with the same tokens (the decode worker recomputes the prompt), and no block leaks."""
    from lmdisagg import Pipeline, Role
    from lmdisagg.config import TransportSettings
    pipe = Pipeline(model="smollm2-135m", prefill=Role(), decode=Role(), kv_cache_bytes=1 << 29,
                    transport=TransportSettings(name="fake", checksum=True, fake=fault)).start()
    try:
        prompt = "Seven rules for writing clear code: " * 30
        expected = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))[0]
        for _ in range(2):
            assert pipe.generate(prompt, max_tokens=12, ignore_eos=True).token_ids == expected.token_ids
        stats = pipe.worker_stats()
        d = stats["decode-0"]
        assert d.stats["transfer_failures"] == 2 and d.stats["recomputed_prompts"] == 2
        for s in stats.values():
            assert s.free_blocks == s.total_blocks and s.stats["held"] == 0 and s.running == 0
    finally:
        pipe.shutdown()


@pytest.fixture(scope="module")
def slow_kv(local_ray):
    """A disaggregated deployment whose KV takes 3 s to move (fake transport)."""
    from lmdisagg import Pipeline, Role
    from lmdisagg.config import TransportSettings
    pipe = Pipeline(model="smollm2-135m", prefill=Role(), decode=Role(), kv_cache_bytes=1 << 29,
                    transport=TransportSettings(name="fake", fake={"latency_s": 3.0})).start()
    yield pipe
    pipe.shutdown()


def _all_free(pipe):
    ws = pipe.worker_stats()
    return all(w.free_blocks == w.total_blocks and w.running == 0 and w.stats["held"] == 0
               for w in ws.values()) and ws


def test_a_request_aborted_while_its_kv_moves_is_dropped_when_it_lands(slow_kv):
    """The client goes away while the decode worker pulls the prompt's KV. The router aborts the
    decode worker before the prefill worker, whose abort frees the blocks the pull reads (another
    prompt may then overwrite them): once the KV lands the request is dropped, not decoded to
    its 2000 tokens, and its blocks are freed, not cached (their bytes are not trusted)."""
    from openai import OpenAI
    pipe = slow_kv
    before = pipe.worker_stats()["decode-0"].stats
    client = OpenAI(base_url=pipe.url, api_key="x", max_retries=0, timeout=300)
    stream = client.completions.create(model="smollm2-135m", prompt="Tell me a long story. " * 100,
                                       max_tokens=2000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # the first token: the prefill of ~600 tokens (2 whole chunks) is done
    # the decode worker has claimed blocks for the KV: the pull has begun (it takes 3 s)
    wait_until(lambda: (d := pipe.worker_stats()["decode-0"]).free_blocks < d.total_blocks, 30, 0.05)
    stream.close()
    d = pipe.worker_stats()["decode-0"]
    assert d.stats["pulled_chunks"] == before["pulled_chunks"], "the pull ended before the client left: make it slower"
    ws = wait_until(lambda: _all_free(pipe), 15)  # 3 s of pull; decoding 2000 tokens here takes far longer
    d = ws["decode-0"]
    assert d.stats["pulled_chunks"] > before["pulled_chunks"], "the pull did not land"
    assert d.stats["aborted_before_admit"] == before["aborted_before_admit"] + 1
    assert d.stats["cached_blocks"] == 0, "the dropped pull's blocks were cached"
    assert d.stats["recomputed_prompts"] == before["recomputed_prompts"]


def test_a_decode_call_that_its_abort_overtook_moves_nothing(slow_kv):
    """The router's abort can reach the decode worker before its decode call does (both are
    sent at once when the client leaves right after the first token). That call then pulls
    nothing and computes nothing: it lets the prefill worker's blocks go and ends at once.
    The calls are the router's, made on the deployment's own actors in that order."""
    import ray

    from lmdisagg.workers.messages import GenerateRequest
    pipe = slow_kv
    prefill, decode = pipe.actors  # prefill-0, decode-0
    before = pipe.worker_stats()
    ids = pipe.router.tokenizer.encode("A prompt whose decode call comes late. " * 80)
    req = GenerateRequest("overtaken-1", ids, SamplingParams(max_tokens=50, ignore_eos=True))
    res = ray.get(prefill.prefill.remote(req), timeout=120)
    assert res.handle is not None and pipe.worker_stats()["prefill-0"].stats["held"] == 1
    ray.get(decode.abort.remote(req.request_id), timeout=30)
    deltas = [ray.get(ref, timeout=60) for ref in decode.decode.remote(req, res.handle)]
    assert deltas == []  # no token decoded
    ws = wait_until(lambda: _all_free(pipe), 15)  # the prefill worker's held blocks are released
    d, b = ws["decode-0"].stats, before["decode-0"].stats
    assert d["pulled_chunks"] == b["pulled_chunks"] and d["recomputed_prompts"] == b["recomputed_prompts"]
    assert d["aborted_before_admit"] == b["aborted_before_admit"] + 1


def test_kv_that_lands_after_its_source_let_it_go_is_recomputed(slow_kv, engine):
    """The prefill worker's hold on a prompt's blocks ends while the decode worker still pulls
    them (its hold timer, ``hold_s``, fires for a decode call that came late): another prompt may
    then overwrite them mid-pull. What lands is not trusted: the decode worker frees it, caches
    none of it, recomputes the prompt, and the tokens equal one engine's. The release here is
    the call that timer makes, on the deployment's own prefill actor, mid-pull."""
    import ray

    from lmdisagg.workers.messages import GenerateRequest
    pipe = slow_kv
    prefill, decode = pipe.actors  # prefill-0, decode-0
    b = pipe.worker_stats()["decode-0"].stats
    ids = pipe.router.tokenizer.encode("A decode call that came late, after the hold. " * 60)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    req = GenerateRequest("let-go-1", ids, params)
    res = ray.get(prefill.prefill.remote(req), timeout=120)
    assert res.handle is not None
    gen = decode.decode.remote(req, res.handle)
    # the decode worker has claimed blocks for the KV: the pull has begun (it takes 3 s)
    wait_until(lambda: (d := pipe.worker_stats()["decode-0"]).free_blocks < d.total_blocks, 30, 0.05)
    assert ray.get(prefill.release.remote(req.request_id), timeout=30) is True
    deltas = [ray.get(ref, timeout=120) for ref in gen]
    got = res.first.token_ids + [t for d in deltas for t in d.token_ids]
    assert got == engine.generate(ids, params)[0].token_ids
    d = wait_until(lambda: _all_free(pipe), 15)["decode-0"].stats
    assert d["pulled_chunks"] > b["pulled_chunks"], "the pull did not land"
    assert d["recomputed_prompts"] == b["recomputed_prompts"] + 1
    assert d["kv_released_early"] == b["kv_released_early"] + 1
    assert d["reused_chunks"] == b["reused_chunks"]  # nothing of what landed was admitted


def test_ray_job_submit():
    """A real head on 127.0.0.1 and the README's `ray job submit --working-dir . -- lmdisagg serve`,
    with an API key in the job's environment."""
    from openai import OpenAI
    key = secrets.token_urlsafe(16)
    venv_bin = Path(sys.executable).parent  # the job's shell finds `lmdisagg` where a user's would
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PATH": str(venv_bin) + os.pathsep + os.environ.get("PATH", "")}
    gcs, dash, port = free_port(), free_port(), free_port()
    ray_bin = str(venv_bin / "ray")
    address = f"http://127.0.0.1:{dash}"
    temp = tempfile.mkdtemp(prefix="lmd-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={temp}",
                             # the job agent's ports, free ones: another local cluster (a fixture's,
                             # a user's) may hold the defaults, and then no agent takes jobs
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--ray-client-server-port={free_port()}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)

    def ray_job(*args, timeout=120) -> tuple[int, str]:
        r = subprocess.run([ray_bin, "job", args[0], "--address", address, *args[1:]], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=timeout)
        return r.returncode, r.stdout + r.stderr  # the CLI reports on stderr
    def answers(url: str) -> bool:  # any HTTP answer (a probe with no token may get 401)
        try:
            httpx.get(url, timeout=5)
            return True
        except httpx.HTTPError:
            return False
    try:
        # the dashboard's HTTP server first (each `ray job` CLI call costs seconds of CPU here,
        # taken from the head and the job as they start), then the job API itself
        wait_until(lambda: answers(address + "/api/version"), 120, 0.5)
        wait_until(lambda: ray_job("list")[0] == 0, 120, 2.0)

        outputs = []

        def submit():  # the head's job agent may need a moment more than its HTTP server
            rc, out = ray_job("submit", "--working-dir", ".", "--no-wait",
                              "--runtime-env-json", json.dumps({"env_vars": {"LMDISAGG_API_KEY": key}}),
                              "--", "lmdisagg", "serve", "--config", "cluster_configs/local-cpu.yaml",
                              "--port", str(port))
            outputs.append(out)
            m = re.search(r"(raysubmit_\w+)", out)
            return m.group(1) if rc == 0 and m else None
        try:
            job = wait_until(submit, 180, 3.0)
        except AssertionError:
            pytest.fail("ray job submit kept failing:\n" + outputs[-1][-3000:])

        polls = itertools.count()

        def up():  # its port answers; the job's status read only now and then (a CLI call)
            if answers(f"http://127.0.0.1:{port}/health"):
                return True
            if next(polls) % 10 == 9 and any(s in ray_job("status", job)[1] for s in ("FAILED", "STOPPED", "SUCCEEDED")):
                pytest.fail("job ended early:\n" + ray_job("logs", job)[1][-3000:])
        try:
            wait_until(up, 300, 1.0)
            # and the job says where it serves
            url = wait_until(lambda: (m := re.search(r"serving .* at (http://\S+/v1)", ray_job("logs", job)[1]))
                             and m.group(1), 60, 2.0)
        except AssertionError:
            pytest.fail("job did not come up:\n" + ray_job("logs", job)[1][-4000:])
        assert url == f"http://127.0.0.1:{port}/v1"
        ask = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
                   temperature=0)
        r = OpenAI(base_url=url, api_key=key, max_retries=0).chat.completions.create(**ask)
        assert r.choices[0].message.content and r.usage.completion_tokens <= 12
        # the job's LMDISAGG_API_KEY guards the API; probes and scrapers stay open
        for wrong in ("x", key + "x"):
            with pytest.raises(openai.AuthenticationError):
                OpenAI(base_url=url, api_key=wrong, max_retries=0).chat.completions.create(**ask)
        assert httpx.get(url + "/models", timeout=30).status_code == 401
        assert httpx.get(url[:-len("/v1")] + "/health", timeout=30).status_code == 200
        assert httpx.get(url[:-len("/v1")] + "/metrics", timeout=30).status_code == 200
        assert ray_job("stop", job, timeout=180)[0] == 0
        status = ray_job("status", job)[1]
        assert "was stopped" in status or "STOPPED" in status, status
        assert "lmdisagg: stopped" in ray_job("logs", job)[1]  # serve tore its actors down on SIGTERM
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_everything_listens_on_loopback(served):
    """Every listening socket of `lmdisagg serve` and of the Ray processes it started."""
    root = psutil.Process(served.proc.pid)
    procs = [root] + root.children(recursive=True)
    listening = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    assert len(procs) > 3 and listening  # the router, GCS, raylet, workers ...
    assert any(port == int(served.url.rsplit(":", 1)[1].split("/")[0]) for _, _, port in listening)
    def loopback(ip: str) -> bool:
        a = ipaddress.ip_address(ip.split("%")[0])
        return (getattr(a, "ipv4_mapped", None) or a).is_loopback
    outside = [x for x in listening if not loopback(x[1])]
    assert outside == [], outside
