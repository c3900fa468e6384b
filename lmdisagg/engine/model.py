"""Llama-family decoder (Llama 2/3, Qwen2, SmolLM) over a paged KV cache.

Weights are HF names, fused on load: q/k/v into one ``qkv`` matrix and gate/up into one
``gate_up`` matrix (fewer, larger matmuls). The forward pass works on a flat batch of tokens
(prefill and decode sequences concatenated) and returns the hidden state of every token; the
runner picks the rows it needs logits for.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from lmdisagg.engine.attention import AttentionMetadata, TorchAttention
from lmdisagg.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":  # Llama 3.1 frequency-dependent scaling
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind == "linear":
        inv = inv / scaling["factor"]
    elif kind:
        raise ValueError(f"rope scaling {kind!r} is not supported")
    return inv.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = None  # (rms_norm, add_rms_norm) from lmdisagg.kernels.rms_norm, when fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with ``residual``: (norm(x + residual), x + residual), the new residual."""
        if self.kernels is not None:
            if residual is None:
                return self.kernels[0](x, self.weight, self.eps)
            return self.kernels[1](x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        # same op order as HF: normalize in fp32, cast back, then scale
        if x.dtype == torch.float32:  # HF's exact ops (fp32 greedy parity depends on them)
            out = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        else:
            out = self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return out if residual is None else (out, x)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, H, D]; cos/sin: [N, 1, D] (HF's rotate_half convention). HF computes
    # x * cos + cat(-x2, x1) * sin; this is the same products and sums (so the same bits in any
    # dtype) without materializing the rotated copy.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos
    out[..., :half] -= x2 * sin[..., :half]
    out[..., half:] += x1 * sin[..., half:]
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [N, 2 * I] -> silu(gate) * up: [N, I]
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.cfg = cfg
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.rope, self.act = apply_rope, silu_and_mul  # Triton kernels when fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos, sin, kv_cache: torch.Tensor,
                meta: AttentionMetadata, attention: TorchAttention):
        # x: [N, hidden], the previous sub-layer's output (layer 0: the embeddings, residual None)
        # -> (this layer's MLP output, the residual stream before it), both [N, hidden]
        cfg = self.cfg
        n, hq, hkv, d = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        qkv = self.qkv(h).view(n, hq + 2 * hkv, d)
        qk = self.rope(qkv[:, :hq + hkv], cos, sin)      # q and k heads together: [N, Hq + Hkv, D]
        q, k = qk[:, :hq], qk[:, hq:]                    # [N, Hq, D], [N, Hkv, D]
        v = qkv[:, hq + hkv:]                            # [N, Hkv, D]
        o = attention(q, k, v, kv_cache, self.layer, meta)  # [N, Hq * D]
        h, residual = self.post_attention_layernorm(self.o_proj(o), residual)
        return self.down_proj(self.act(self.gate_up(h))), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.attention = TorchAttention()  # the runner swaps in TritonAttention on CUDA
        self.head: nn.Module | None = None  # a packed lm_head (pack_linear_weights), else F.linear

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions: [N] -> cos, sin: [N, 1, D], computed in fp32 like HF
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [N] -> hidden: [N, hidden]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, kv_cache, meta, self.attention)
        return self.norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, hidden] -> [B, vocab] in fp32
        if self.head is not None:
            return self.head(hidden).float()
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    def use_triton_ops(self, on: bool = True) -> None:
        """CUDA, 16-bit dtypes: fused residual-add + RMSNorm, in-place RoPE and SwiGLU as Triton
        kernels (lmdisagg.kernels; each rounds once where PyTorch's op chain rounds per op).
        ``on=False`` restores the PyTorch ops."""
        from lmdisagg.kernels.activation import silu_and_mul as act
        from lmdisagg.kernels.rms_norm import add_rms_norm, rms_norm
        from lmdisagg.kernels.rope import rope_
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.kernels = (rms_norm, add_rms_norm) if on else None
        for layer in self.layers:
            layer.rope, layer.act = (rope_, act) if on else (apply_rope, silu_and_mul)

    def pack_linear_weights(self) -> None:
        """bf16 on CPU: every projection and the lm_head through oneDNN with packed weights
        (lmdisagg.kernels.cpu_linear; same results as F.linear). Call once, after loading."""
        from lmdisagg.kernels.cpu_linear import PackedLinear, pack_linears
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.head = PackedLinear(w)
        self.lm_head = None  # its weight now lives packed in self.head
        pack_linears(self.layers)

    # --- weights -------------------------------------------------------------------------------
    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load HF-named tensors (``model.layers.0.self_attn.q_proj.weight`` ...), fusing q/k/v
        and gate/up. Raises ValueError naming any missing tensor."""
        def take(name: str) -> torch.Tensor:
            for prefix in ("model.", ""):
                if prefix + name in tensors:
                    return tensors[prefix + name]
            raise ValueError(f"weight {name!r} is missing from the checkpoint")

        with torch.no_grad():
            self.embed_tokens.weight.copy_(take("embed_tokens.weight"))
            self.norm.weight.copy_(take("norm.weight"))
            if self.lm_head is not None:
                self.lm_head.weight.copy_(tensors.get("lm_head.weight", take("embed_tokens.weight")))
            for i, layer in enumerate(self.layers):
                p = f"layers.{i}."
                layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
                layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
                layer.qkv.weight.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
                if layer.qkv.bias is not None:
                    layer.qkv.bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                layer.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
                layer.gate_up.weight.copy_(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
                layer.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))

    def init_dummy(self, seed: int = 0) -> None:
        """Random weights of realistic scale, for benchmarks that need shape, not meaning."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(1.0)
                else:
                    std = 1.0 / math.sqrt(p.shape[-1])
                    if p.device.type == "cpu":
                        p.copy_(torch.randn(p.shape, generator=g) * std)
                    else:  # generate on device: an 8B model's weights are too big to build on the host
                        gd = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
                        p.normal_(0.0, std, generator=gd)
