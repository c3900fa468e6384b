"""The oneDNN-packed bf16 linear equals F.linear (its reference) on random inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmdisagg.kernels.cpu_linear import PackedLinear, linear_ref, pack_linears


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


def test_pack_linears_replaces_every_linear():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64, bias=False), nn.ReLU(), nn.Sequential(nn.Linear(64, 8))).bfloat16()
    x = torch.randn(5, 32).bfloat16()
    with torch.inference_mode():
        ref = net(x)
        assert pack_linears(net) == 2
        assert not any(isinstance(m, nn.Linear) for m in net.modules())
        assert torch.equal(net(x), ref)
