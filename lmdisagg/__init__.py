"""lmdisagg: disaggregated prefill/decode LLM serving on Ray with a tiered, shareable KV cache.

The offline engine::

    from lmdisagg import Engine, SamplingParams
    engine = Engine(model="smollm2-135m")
    print(engine.generate("The capital of France is", SamplingParams(max_tokens=16))[0].text)

Heavy modules (torch, Ray, transports) are imported on first use, so ``import lmdisagg`` is cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Engine": "lmdisagg.engine",
    "EngineConfig": "lmdisagg.engine",
    "SamplingParams": "lmdisagg.engine",
    "GenerationResult": "lmdisagg.engine",
    "Pipeline": "lmdisagg.pipeline",
    "Role": "lmdisagg.pipeline",
    "ClusterConfig": "lmdisagg.config",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'lmdisagg' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(mod), name)


__all__ = list(_LAZY)
