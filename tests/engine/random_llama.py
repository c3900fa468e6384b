"""A Llama checkpoint in Hugging Face format with random weights and a generated word-level
tokenizer: what both our engine and ``transformers`` load, on machines that cannot fetch a real
model (the GPU host has no network). Weights are N(0, 1/fan_in) so logits have a real spread."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lmdisagg.models.config import ModelConfig


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    return shapes


def write_random_llama(path: Path, cfg: ModelConfig, seed: int = 0, byte_level: bool = False) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json.
    ``byte_level``: a byte-level BPE tokenizer without merges (each byte a token, as GPT-2's
    alphabet; BOS / EOS special tokens of their own) instead of the word-level one, so that any
    text can be written: what structured outputs need."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": "float32"}))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        if len(shape) == 1:  # norm weights near 1
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            tensors[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    save_file(tensors, str(path / "model.safetensors"))
    if byte_level:
        special = {cfg.bos_token_id, *cfg.eos_token_ids}
        free = iter(i for i in range(cfg.vocab_size) if i not in special)
        vocab = {f"w{i}": i for i in special}
        vocab.update({ch: next(free) for ch in pre_tokenizers.ByteLevel.alphabet()})
        vocab.update({f"w{i}": i for i in free})
        tok = Tokenizer(models.BPE(vocab, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([f"w{i}" for i in sorted(special)])
    else:
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "w0",
        "bos_token": f"w{cfg.bos_token_id}", "eos_token": f"w{cfg.eos_token_ids[0]}"}))
    return path
