"""Synthetic Mooncake-format traces (seeded) and a runner for the real ``lmdisagg`` CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmdisagg.sim.synth import synthetic_trace, write_trace


@pytest.fixture(scope="session")
def trace_file(tmp_path_factory):
    """600 requests at 8 req/s with system prompts, multi-turn sessions and one-off prompts."""
    return write_trace(tmp_path_factory.mktemp("traces") / "synthetic.jsonl",
                       synthetic_trace(600, seed=11, rate_per_s=8.0))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmdisagg.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=timeout)


def simulate_json(*args: str) -> dict:
    out = run_cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    return json.loads(lines[0])
