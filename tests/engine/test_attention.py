"""Both attention backends, on one mixed step built by the real model runner, equal dense causal
attention over each sequence's context; the engine gives the same greedy tokens with either; the
model's fused Triton ops (RMSNorm, RoPE, SwiGLU) give the PyTorch ops' hidden states.

The Triton backend runs natively on CUDA and through Triton's interpreter on CPU."""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

from lmdisagg.engine import Engine, SamplingParams  # noqa: E402
from lmdisagg.engine.model import LlamaModel  # noqa: E402
from lmdisagg.engine.model_runner import ModelRunner  # noqa: E402
from lmdisagg.engine.request import Sequence  # noqa: E402
from lmdisagg.models.config import ModelConfig  # noqa: E402
from tests.engine.random_llama import write_random_llama  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T = 8
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=6,
                  num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=True)


def seq(length: int, computed: int, table: list[int]) -> Sequence:
    s = Sequence("s", list(range(1, length + 1)), SamplingParams())
    s.num_computed_tokens, s.block_table = computed, table
    return s


def mixed_step():
    """Prefill without cache, prefill after a cached prefix, and decodes of several lengths."""
    prefills = [seq(29, 0, [3, 4, 5, 14]), seq(30, 4, [0, 1, 9, 15])]  # block runs; mid-block start
    decodes = [seq(9, 8, [2, 11]), seq(1, 0, [7]), seq(30, 29, [6, 8, 10, 12])]
    return prefills, decodes


def run_backend(kind: str, dtype: torch.dtype, cache: torch.Tensor, q, k, v, layer: int = 1):
    runner = ModelRunner(LlamaModel(CFG).to(DEVICE, dtype), cache.shape[0], T, dtype, DEVICE,
                         kv_allocator=lambda *a: cache, max_model_len=64)
    runner.set_attention(kind)
    prefills, decodes = mixed_step()
    ids, pos, meta, last = runner.prepare(prefills, decodes)
    out = runner.model.attention(q, k, v, cache, layer, meta)
    return out.view(q.shape), prefills + decodes, pos


def dense_reference(cache, seqs, pos, q, layer):
    """Each new token attends to keys 0..its position of its sequence, read from the cache."""
    g = CFG.num_heads // CFG.num_kv_heads
    out, row = torch.empty_like(q, dtype=torch.float32), 0
    for s in seqs:
        n_new = len(s) - s.num_computed_tokens
        blocks = torch.tensor(s.block_table, device=cache.device)
        k = cache[blocks, layer, 0].reshape(-1, CFG.num_kv_heads, CFG.head_dim)[:len(s)].float()
        v = cache[blocks, layer, 1].reshape(-1, CFG.num_kv_heads, CFG.head_dim)[:len(s)].float()
        for i in range(row, row + n_new):
            p = int(pos[i]) + 1
            for h in range(CFG.num_heads):
                w = torch.softmax(k[:p, h // g] @ q[i, h].float() / math.sqrt(CFG.head_dim), 0)
                out[i, h] = w @ v[:p, h // g]
        row += n_new
    return out


@pytest.mark.parametrize("kind", ["torch", "triton"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_backend_matches_dense_attention(kind, dtype, atol):
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(16, CFG.num_layers, 2, T, CFG.num_kv_heads, CFG.head_dim, generator=g).to(dtype).to(DEVICE)
    n = 29 + 26 + 3
    q = torch.randn(n, CFG.num_heads, CFG.head_dim, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(n, CFG.num_kv_heads, CFG.head_dim, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(n, CFG.num_kv_heads, CFG.head_dim, generator=g).to(dtype).to(DEVICE)
    expected = cache.clone()
    out, seqs, pos = run_backend(kind, dtype, cache, q, k, v)
    # the cache changed exactly at the new tokens' slots (token p: block_table[p // T], row p % T)
    row = 0
    for s in seqs:
        for p in range(s.num_computed_tokens, len(s)):
            expected[s.block_table[p // T], 1, :, p % T] = torch.stack([k[row], v[row]])
            row += 1
    assert torch.equal(cache, expected)
    torch.testing.assert_close(out.float(), dense_reference(cache, seqs, pos, q, 1), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama with random weights: small enough for Triton's interpreter to run whole
    engine steps in seconds."""
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_ids=(2,))
    return write_random_llama(tmp_path_factory.mktemp("tiny-llama"), cfg)


def test_engine_greedy_tokens_equal_with_either_backend(tiny_model_dir):
    prompts = [[(7 * i + 3) % 400 + 5 for i in range(n)] for n in (37, 5, 50)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    tokens = {}
    for kind in ("torch", "triton"):
        e = Engine(model=str(tiny_model_dir), device=DEVICE.type, dtype="float32", chunk_tokens=16,
                   num_blocks=24, max_model_len=256, cuda_graphs=False)
        e.runner.set_attention(kind)
        e.generate(prompts[0][:20], SamplingParams(max_tokens=2))  # leaves a cached chunk: a prefix hit below
        results = e.generate(prompts, params)
        assert results[0].cached_tokens == 16
        tokens[kind] = [r.token_ids for r in results]
        assert e.blocks.num_free == e.blocks.num_blocks
    assert len(set(map(tuple, tokens["torch"]))) == 3  # the model is not degenerate
    assert tokens["torch"] == tokens["triton"]


def eager_triton_engine(model_dir, num_blocks: int, max_model_len: int) -> Engine:
    """fp32, Triton attention, no graph capture: the static-buffer paths run eagerly on CPU too."""
    e = Engine(model=str(model_dir), device=DEVICE.type, dtype="float32", chunk_tokens=16,
               num_blocks=num_blocks, max_model_len=max_model_len, max_num_seqs=4, cuda_graphs=False)
    e.runner.set_attention("triton")
    return e


def test_static_decode_buffers_equal_plain_decode(tiny_model_dir):
    """The CUDA-graph decode path (static buffers, a batch padded to its bucket: slot -1 and
    context 0 on padded rows), run eagerly here, gives the plain path's tokens."""
    from lmdisagg.engine.cuda_graphs import DecodeGraphs
    prompts = [[(11 * i + 5) % 500 + 3 for i in range(n)] for n in (3, 30, 45)]  # 3 rows in bucket 4
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    tokens = []
    for static in (False, True):
        e = eager_triton_engine(tiny_model_dir, num_blocks=24, max_model_len=128)
        if static:
            e.runner.graphs = DecodeGraphs(e.model, e.runner.kv, 4, 128, 16, capture=False)
        tokens.append([r.token_ids for r in e.generate(prompts, params)])
    assert tokens[0] == tokens[1]


def test_static_prefill_buffers_equal_plain_prefill(tiny_model_dir):
    """The CUDA-graph prefill path (static buffers, tokens padded to their bucket, padding tiles,
    the Triton paged prefill kernel reading every context from the cache), run eagerly here,
    gives the plain path's tokens: prompts from scratch, several in one step, and suffixes after
    a cached prefix. Prompts longer than the largest bucket take the plain path."""
    from lmdisagg.engine.cuda_graphs import PrefillGraphs
    prompts = [[(13 * i + 7) % 450 + 3 for i in range(n)] for n in (3, 20, 30)]
    prefix = [(5 * i + 1) % 400 + 9 for i in range(40)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    tokens = []
    for static in (False, True):
        e = eager_triton_engine(tiny_model_dir, num_blocks=40, max_model_len=256)
        if static:
            e.runner.prefill_graphs = PrefillGraphs(e.model, e.runner.kv, 3, 256, 16, max_tokens=64, capture=False)
        out = [r.token_ids for r in e.generate(prompts, params)]              # 3 prompts in one step
        out.append(e.generate(prefix + [3, 4], params)[0].token_ids)          # 42 new tokens
        hit = e.generate(prefix + [5, 6, 7], params)[0]                       # 32 cached + 11 new
        assert hit.cached_tokens == 32
        out.append(hit.token_ids)
        out.append(e.generate([(3 * i + 2) % 300 + 40 for i in range(90)], params)[0].token_ids)  # 90 new: eager
        tokens.append(out)
        if static:  # every prefill step but the long one took the graph path
            assert e.runner.prefill_graphs.steps == 3
        assert e.blocks.num_free == e.blocks.num_blocks
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_fused_model_ops_match_torch_ops(tiny_model_dir, dtype, tol):
    from lmdisagg.engine.loader import load_model
    from lmdisagg.models import resolve_model
    src = resolve_model(str(tiny_model_dir))
    hidden = []
    for fused in (False, True):
        model = load_model(src, DEVICE, dtype)
        runner = ModelRunner(model, 24, T, dtype, DEVICE, max_model_len=128)
        runner.set_attention("triton")
        model.use_triton_ops(fused)  # (on CUDA the runner turned them on for 16-bit dtypes)
        prefills = [seq(13, 0, [3, 7]), seq(21, 16, [5, 1, 9])]
        with torch.inference_mode():
            ids, pos, meta, _ = runner.prepare(prefills, [])
            runner.model(ids, pos, runner.kv, meta)  # fills the cache the step below reads back
            ids, pos, meta, _ = runner.prepare(prefills, [seq(9, 8, [2, 11])])
            hidden.append(runner.model(ids, pos, runner.kv, meta).float())
    scale = hidden[0].abs().max()
    torch.testing.assert_close(hidden[1] / scale, hidden[0] / scale, atol=tol, rtol=0)
