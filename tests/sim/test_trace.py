"""Trace loading: Mooncake format, chunk keys from hash ids, malformed lines by line number."""
from __future__ import annotations

import json

import pytest

from lmdisagg.sim.trace import TraceError, load_trace

from .conftest import run_cli


def test_keys_chain_hash_ids_and_tokens_follow_ids(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 2000, "input_length": 1500, "output_length": 5, "hash_ids": [7, 8, 9]},
        {"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8, 4]},
        {"timestamp": 3000, "input_length": 600, "output_length": 5, "hash_ids": [8, 9]},
    ]) + "\n\n")
    a, b, c = load_trace(p, speedup=2.0)
    assert [r.line for r in (a, b, c)] == [2, 1, 3] and a.arrival_s == 0.5   # sorted, sped up
    ka, kb, kc = a.chunk_keys(), b.chunk_keys(), c.chunk_keys()
    assert ka[:2] == kb[:2] and ka[2] != kb[2]           # equal id prefixes, equal keys
    assert not set(kc) & set(kb)                          # same ids, other prefix: other keys
    assert all(len(k) == 16 for k in ka)
    ta, tb = a.token_ids(512), b.token_ids(512)
    assert len(ta) == 1100 and len(tb) == 1500 and (ta[:1024] == tb[:1024]).all()
    assert len(load_trace(p, limit=2)) == 2


def test_malformed_lines_are_named_with_their_numbers(tmp_path):
    good = {"timestamp": 1, "input_length": 600, "output_length": 2, "hash_ids": [1, 2]}
    lines = [good, "{oops", {"timestamp": 1, "input_length": 5}, good,
             {**good, "output_length": "many"}, {**good, "hash_ids": [1, 2, 3]}, [1, 2], {**good, "timestamp": -5}]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(TraceError) as e:
        load_trace(p)
    assert e.value.lines == [2, 3, 5, 6, 7, 8]
    assert "line 2: not JSON" in e.value.message and "line 6: 3 hash_ids for 600 tokens" in e.value.message
    out = run_cli("--trace", str(p), "--workers", "2")
    assert out.returncode == 2 and out.stdout == ""
    assert "6 malformed line(s)" in out.stderr and "line 3: missing field(s)" in out.stderr


@pytest.mark.parametrize("content, message", [(None, "cannot read trace"), ("\n\n", "has no requests")])
def test_missing_or_empty_trace(tmp_path, content, message):
    p = tmp_path / "t.jsonl"
    if content is not None:
        p.write_text(content)
    out = run_cli("--trace", str(p))
    assert out.returncode == 2 and message in out.stderr


def test_bad_options_exit_2(trace_file):
    out = run_cli("--trace", str(trace_file), "--workers", "0")
    assert out.returncode == 2 and "--workers must be >= 1" in out.stderr
    out = run_cli("--trace", str(trace_file), "--policy", "random")
    assert out.returncode == 2 and "invalid choice" in out.stderr
