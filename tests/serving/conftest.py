"""`lmdisagg serve` started the way a user starts it, and helpers to talk to it."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Served:
    url: str                     # http://127.0.0.1:PORT/v1
    proc: subprocess.Popen
    log: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.url[: -len("/v1")]

    def client(self, **kw):
        from openai import OpenAI
        return OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=kw.pop("timeout", 300), **kw)

    def stats(self) -> dict:
        import httpx
        return httpx.get(self.base + "/stats", timeout=30).json()


def start_serve(config: str, extra: list[str] = (), timeout: float = 240) -> Served:
    cmd = [sys.executable, "-m", "lmdisagg.cli", "serve", "--config", str(ROOT / config), "--port", "0", *extra]
    # the environment of a user's shell: `lmdisagg serve` itself must keep Ray on 127.0.0.1
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True, env={**env, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving .* at (http://\S+/v1)", line)
            if m:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not found:
        leftover = ""
        try:
            stop_serve(Served("", proc, lines))
        except AssertionError as e:  # keep the log: it says why it did not come up
            leftover = f"\n{e}"
        raise RuntimeError("lmdisagg serve did not come up:\n" + "".join(lines[-60:]) + leftover)
    return Served(found[0], proc, lines)


def stop_serve(s: Served, timeout: float = 90) -> int:
    """Ctrl-C, as a user stops it; returns its exit code. Raises if a process it started (Ray's
    GCS, raylet, agents, workers) is still running 30 s after it exited."""
    import psutil
    try:
        started = psutil.Process(s.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    if s.proc.poll() is None:
        s.proc.send_signal(signal.SIGINT)
        try:
            s.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait(10)
    _, alive = psutil.wait_procs(started, timeout=30)
    left = []
    for p in alive:
        try:
            left.append(f"{p.pid} {p.name()}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if left:
        raise AssertionError(f"lmdisagg serve stopped but left processes running: {left}")
    return s.proc.returncode


@pytest.fixture(scope="module")
def local_ray():
    """Ray in this process, every process of it on 127.0.0.1 (for Pipeline tests)."""
    import ray
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", namespace="lmdisagg")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def served():
    s = start_serve(os.environ.get("LMDISAGG_TEST_CONFIG", "cluster_configs/local-cpu.yaml"))
    yield s
    rc = stop_serve(s)
    assert rc == 0, "".join(s.log[-40:])
    assert any("stopped" in line for line in s.log)


def wait_until(pred, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last: {last!r})")
