"""The C++ paged decode attention for CPUs equals the PyTorch reference on random paged caches,
refuses what it cannot read, and is what a bf16 engine on the CPU runs."""
from __future__ import annotations

import pytest
import torch

from lmdisagg.engine import Engine, SamplingParams
from lmdisagg.kernels import cpu_attention
from lmdisagg.kernels.decode_attention import paged_decode_attention_ref
from tests.kernels.test_decode_attention import random_case



def test_builds_here():
    # the suite's machines have g++ and ninja (.ci/run installs them): the kernel must build
    assert cpu_attention.available(), cpu_attention.why_not()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("hq,hkv,d,t", [(9, 3, 64, 16), (8, 2, 128, 32), (4, 4, 32, 64), (9, 3, 64, 256)])
def test_matches_reference(dtype, atol, hq, hkv, d, t):
    ctx = [1, 37, 300, 0, 1000]                  # 0: a padded row
    q, cache, tables, lens = random_case("cpu", dtype, hq, hkv, d, t, ctx, seed=hq * d + t)
    for layer in (0, 1):
        ref = paged_decode_attention_ref(q, cache, layer, tables, lens)
        out = cpu_attention.paged_decode(q, cache, layer, tables.long(), lens.long(), d ** -0.5)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)
        assert out[3].abs().sum() == 0


def test_refuses_what_it_cannot_read():
    q, cache, tables, lens = random_case("cpu", torch.bfloat16, 9, 3, 64, 16, [20, 5], seed=1)
    tables, lens = tables.long(), lens.long()
    op = cpu_attention.paged_decode
    with pytest.raises(RuntimeError, match="longer than its block table"):
        op(q, cache, 0, tables, torch.tensor([20, 10_000]), 0.125)
    bad = tables.clone()
    bad[0, 1] = cache.shape[0]
    with pytest.raises(RuntimeError, match="block id out of range"):
        op(q, cache, 0, bad, lens, 0.125)
    with pytest.raises(RuntimeError, match="layer out of range"):
        op(q, cache, 2, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="differ in dtype"):
        op(q.float(), cache, 0, tables, lens, 0.125)


def test_engines_use_it_for_bf16_and_keep_their_tokens():
    kw = dict(model="smollm2-135m", device="cpu", chunk_tokens=16, num_blocks=64, max_model_len=512)
    assert Engine(dtype="bfloat16", **kw).runner.model.attention.paged_decode
    exact = Engine(dtype="float32", **kw)  # fp32 keeps SDPA, HF's exact numerics
    assert not exact.runner.model.attention.paged_decode
    # the kernel inside a real engine (block tables, several sequences, every layer): in fp32 it
    # gives SDPA's tokens (in bf16 both paths round differently, and a near tie may go either way)
    fast = Engine(dtype="float32", **kw)
    fast.runner.set_attention("cpu")
    prompts = ["The capital of France is", "List three primes:", "def fib(n):"]
    for params in (SamplingParams(max_tokens=40, ignore_eos=True),
                   SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, seed=3)):
        a = [r.token_ids for r in fast.generate(prompts, params)]
        b = [r.token_ids for r in exact.generate(prompts, params)]
        assert a == b
