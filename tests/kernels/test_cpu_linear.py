"""The oneDNN-packed bf16 linear equals F.linear (its reference) on random inputs; a bf16 model
runner on CPU packs its linears where this CPU's oneDNN has a bf16 path, and only there.

Packing needs oneDNN's bf16 path (AVX512-BF16 / AMX, or AVX512BW+VL+DQ): on a CPU without it
(an AVX2-only EPYC, say) the kernel itself cannot run, as a GPU test cannot without a GPU, and
the runner keeps ``nn.Linear``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmdisagg.engine.model import LlamaModel
from lmdisagg.engine.model_runner import ModelRunner
from lmdisagg.kernels.cpu_linear import PackedLinear, can_pack, linear_ref, pack_linears
from lmdisagg.models.config import ModelConfig

BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_bf16 = pytest.mark.skipif(not BF16, reason=f"this CPU's oneDNN has no bf16 path (best ISA: "
                                f"{torch.backends.cpu.get_cpu_capability()}); nothing is packed here")


@needs_bf16
@pytest.mark.parametrize("m", [1, 3, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_reference(m, bias):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(200, 96, generator=g).bfloat16()
    b = torch.randn(200, generator=g).bfloat16() if bias else None
    x = torch.randn(m, 96, generator=g).bfloat16()
    y = PackedLinear(w, b)(x)
    assert y.shape == (m, 200) and y.dtype == torch.bfloat16
    assert torch.equal(y, linear_ref(x, w, b))


@needs_bf16
def test_pack_linears_replaces_every_linear():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64, bias=False), nn.ReLU(), nn.Sequential(nn.Linear(64, 8))).bfloat16()
    x = torch.randn(5, 32).bfloat16()
    with torch.inference_mode():
        ref = net(x)
        assert pack_linears(net) == 2
        assert not any(isinstance(m, nn.Linear) for m in net.modules())
        assert torch.equal(net(x), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_runner_packs_bf16_linears_only_where_the_cpu_can(dtype):
    """Runs on every CPU: a bf16 runner packs every projection and the head where oneDNN has
    bf16 (the kernel tests above show it equals F.linear), keeps nn.Linear where it has not; an
    fp32 runner never packs."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaModel(cfg).to(torch.device("cpu"), dtype)
    ref = LlamaModel(cfg)  # unpacked, to count its linears
    ModelRunner(model, 8, 8, dtype, torch.device("cpu"), max_model_len=64)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert can_pack(dtype, torch.device("cpu")) == (BF16 and dtype == torch.bfloat16)
    linears = sum(isinstance(m, nn.Linear) for m in ref.layers.modules())
    assert linears > 0
    if can_pack(dtype, torch.device("cpu")):  # every projection, and the head
        assert len(packed) == linears + 1 and not any(isinstance(m, nn.Linear) for m in model.layers.modules())
    else:
        assert not packed and sum(isinstance(m, nn.Linear) for m in model.layers.modules()) == linears
