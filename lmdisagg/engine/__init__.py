"""The built-in engine (see base.py for the interface and llm_engine.py for the step loop)."""
from lmdisagg.engine.base import EngineBase
from lmdisagg.engine.config import EngineConfig
from lmdisagg.engine.llm_engine import ChunkNotFoundError, Engine, GenerationResult
from lmdisagg.engine.request import RequestOutput, SamplingParams

__all__ = ["EngineBase", "EngineConfig", "Engine", "GenerationResult", "ChunkNotFoundError",
           "RequestOutput", "SamplingParams"]
