"""bf16 linear layers on CPU through oneDNN with the weight packed once.

``F.linear`` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every
call; for the small batches of decode that reorder costs as much as the product itself. A
``PackedLinear`` keeps the weight in that layout (``torch.ops.mkldnn._reorder_linear_weight``,
the packing PyTorch's own inductor uses for frozen CPU models) and calls the packed product
directly. Results equal ``F.linear`` (the reference) bit for bit: it is the same oneDNN kernel.

Used by the model runner for bf16 models on CPUs whose oneDNN has a bf16 path (AVX512-BF16 /
AMX); fp32 models keep ``F.linear`` (MKL) so their numerics match HF exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """True where packing pays and is available: bf16 weights on a CPU with oneDNN bf16."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


class PackedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` ([out, in], bf16) packed for oneDNN. x: [M, in] -> [M, out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a ``PackedLinear`` (the original weights are
    dropped). Returns how many were replaced. Call once, after the weights are loaded."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
            n += 1
        else:
            n += pack_linears(child)
    return n
