"""Shared fixtures. Everything is real: the real SmolLM2 model, real processes, loopback only."""
from __future__ import annotations

import os

import pytest

# Single-machine Ray clusters bind every process to 127.0.0.1 only with this set (see README).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU host)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir():
    from lmdisagg.models import resolve_model
    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def engine():
    """One fp32 CPU engine shared by read-only tests (each test must leave it idle)."""
    from lmdisagg.engine import Engine
    e = Engine(model="smollm2-135m", kv_cache_bytes=1 << 30)
    yield e
    assert not e.has_unfinished()


@pytest.fixture(scope="session")
def hf_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    import torch
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()
