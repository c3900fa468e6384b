"""Fixtures for the KV store: a real redis-server on 127.0.0.1 (a free port), tier factories."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process bound to 127.0.0.1, no persistence; start/stop at will."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.dir = tmp_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not answer PING in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def num_clients(self) -> int:
        """Connected clients other than the one asking."""
        with self.client() as c:
            return len(c.client_list()) - 1


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A session-wide server; tests keep apart by namespace."""
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A server this test may stop and restart."""
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def eng():
    """9 chunks of 16 tokens hold exactly one 130-token request: the next prompt evicts it."""
    from lmdisagg.engine import Engine
    return Engine(model="smollm2-135m", chunk_tokens=16, num_blocks=9, max_model_len=9 * 16)


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def no_thread_leak():
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.05)
    raise AssertionError(f"threads leaked: {extra}")


def make_prompt(engine, n_tokens: int, seed: int) -> list[int]:
    """Deterministic English-ish text of exactly ``n_tokens`` tokens."""
    import random
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box jam near "
             "old river banks under grey autumn skies").split()
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += engine.encode(" ".join(rng.choice(words) for _ in range(64)) + ".")
    return ids[:n_tokens]
