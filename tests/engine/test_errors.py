"""Bad input gives typed errors with clear messages; aborts free every block."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from lmdisagg.engine import Engine, SamplingParams
from lmdisagg.errors import (ContextLengthError, InvalidRequestError, ModelCacheCorruptError,
                             ModelNotFoundError)


def test_empty_prompt(engine):
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.generate("", SamplingParams())


def test_prompt_over_context(engine):
    n = engine.max_model_len
    with pytest.raises(ContextLengthError, match=f"context is {n}"):
        engine.add_request("long", [1] * n, SamplingParams())
    with pytest.raises(ContextLengthError, match="max_tokens"):
        engine.add_request("long2", [1] * (n - 10), SamplingParams(max_tokens=20))


@pytest.mark.parametrize("bad", [0, -3])
def test_max_tokens_not_positive(engine, bad):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("m", [1, 2, 3], SamplingParams(max_tokens=bad))


def test_bad_token_ids_and_sampling(engine):
    vocab = engine.model_config.vocab_size
    for i, bad in enumerate(([1, 10**9], [1, vocab], [-1, 2], [1, True], [1, 2.0], [1, "3"], [None])):
        with pytest.raises(InvalidRequestError, match="token ids"):
            engine.add_request(f"v{i}", bad, SamplingParams())
    engine.validate([0, vocab - 1], SamplingParams())  # both ends of the vocabulary are fine
    with pytest.raises(InvalidRequestError, match="top_p"):
        engine.add_request("p", [1, 2], SamplingParams(top_p=0.0, temperature=1.0))
    assert not engine.has_unfinished()


def test_unknown_model():
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        Engine(model="no-such-model")
    out = subprocess.run([sys.executable, "-m", "lmdisagg.cli", "generate", "--model", "no-such-model",
                          "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown model 'no-such-model'" in out.stderr


def test_corrupted_model_cache(tmp_path, monkeypatch, model_dir):
    home = tmp_path / "home"
    copy = home / "models" / "smollm2-135m"
    shutil.copytree(model_dir, copy)
    with open(copy / "model.safetensors", "r+b") as f:  # flip bytes in the middle of the weights
        f.seek(50_000_000)
        f.write(b"\xff" * 64)
    monkeypatch.setenv("LMDISAGG_HOME", str(home))
    with pytest.raises(ModelCacheCorruptError, match="model.safetensors is corrupted"):
        Engine(model="smollm2-135m")
    shutil.copy(model_dir / "model.safetensors", copy / "model.safetensors")
    (copy / "tokenizer.json").unlink()
    out = subprocess.run([sys.executable, "-m", "lmdisagg.cli", "generate", "--prompt", "hi"],
                         capture_output=True, text=True, timeout=120, env={**__import__("os").environ})
    assert out.returncode == 2 and "tokenizer.json is missing" in out.stderr


def test_abort_frees_all_blocks(engine):
    from tests.engine.test_prefix_cache import long_prompt
    total = engine.blocks.num_blocks
    assert engine.blocks.num_free == total
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    engine.add_request("r1", long_prompt(engine, 700, seed=5), params)
    engine.add_request("r2", long_prompt(engine, 300, seed=6), params)
    engine.add_request("r3", long_prompt(engine, 100, seed=7), params)  # may still be waiting
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < total
    assert engine.abort("r1") and engine.abort("r2") and engine.abort("r3")
    assert not engine.abort("r1")
    assert not engine.has_unfinished()
    assert engine.blocks.num_free == total
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
