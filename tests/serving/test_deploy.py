"""Deployments through the Python API, `ray job submit`, and where everything listens."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lmdisagg.engine import SamplingParams
from tests.serving.conftest import ROOT, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    import ray
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", namespace="lmdisagg")
    yield ray
    ray.shutdown()


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
        chat = pipe.generate("What is 2+2?", chat=True, max_tokens=30)
        assert chat.text == engine.generate("What is 2+2?", SamplingParams(max_tokens=30), chat=True)[0].text
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


def test_ray_job_submit(tmp_path):
    """A real head on 127.0.0.1, `lmdisagg serve` submitted as a job with --working-dir."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from openai import OpenAI
    venv_bin = str(Path(sys.executable).parent)  # the job's shell finds `lmdisagg` where a user's would
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    gcs, dash, port = free_port(), free_port(), free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={tmp_path / 'ray'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    old = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        def client():
            try:
                return JobSubmissionClient(f"http://127.0.0.1:{dash}")
            except Exception:  # noqa: BLE001 - dashboard still starting
                return None
        jc = wait_until(client, 120, 1.0)
        job = jc.submit_job(entrypoint=f"lmdisagg serve --config cluster_configs/local-cpu.yaml --port {port}",
                            runtime_env={"working_dir": str(ROOT), "excludes": [".venv", ".git", "benchmarks/results"]})
        url = wait_until(lambda: (m := re.search(r"serving .* at (http://\S+/v1)", jc.get_job_logs(job))) and m.group(1)
                         or (jc.get_job_status(job).is_terminal() and pytest.fail(jc.get_job_logs(job))), 300, 1.0)
        assert url == f"http://127.0.0.1:{port}/v1"
        r = OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens <= 12
        jc.stop_job(job)
        status = wait_until(lambda: (s := jc.get_job_status(job)).is_terminal() and s, 120, 1.0)
        assert status in (JobStatus.STOPPED, JobStatus.SUCCEEDED)
        assert "stopped" in jc.get_job_logs(job)  # serve tore its actors down on SIGTERM
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


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
    outside = [x for x in listening if x[1] not in ("127.0.0.1", "::1")]
    assert outside == [], outside
