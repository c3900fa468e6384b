"""Paged decode attention on the CPU, in C++ (``cpu_attention.cpp``), built on first use.

The plain-PyTorch decode path gathers every sequence's KV blocks into a padded copy per layer,
then (bf16) converts it to fp32: on a 2-core VM, for 16 sequences of ~400 tokens, those copies
took ~60% of a bf16 decode step. The kernel reads each K and V row where it lies in the cache
and computes in fp32 registers.

The extension is compiled once per machine with torch's cpp_extension (g++ and ninja; ~1 min,
cached under ``~/.cache/torch_extensions``, shared by every process through torch's file lock).
``available()`` is False, with the reason logged once, where it cannot be built; the model runner
then keeps the PyTorch path. ``LMDISAGG_CPU_KERNELS=0`` turns it off.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def available() -> bool:
    """Build (or load) the extension once per process; True if its op is registered."""
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["why"] = _load()
            if not _state["ok"]:
                log.warning("CPU paged decode attention unavailable (%s): decode attention runs in plain "
                            "PyTorch, slower for bf16 models", _state["why"])
        return _state["ok"]


def why_not() -> str | None:
    return _state.get("why")


def _load() -> tuple[bool, str | None]:
    if os.environ.get("LMDISAGG_CPU_KERNELS", "1") == "0":
        return False, "LMDISAGG_CPU_KERNELS=0"
    try:
        import ninja  # the pip wheel's binary, wherever PATH points (Ray workers do not activate venvs)
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        return False, "needs a C++ compiler and ninja"
    from torch.utils import cpp_extension
    try:
        cpp_extension.load(name="lmdisagg_cpu_attention", sources=[str(Path(__file__).with_name("cpu_attention.cpp"))],
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:  # a failed build: say why, keep serving
        return False, f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)}"
    return True, None


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, D], attending to each row's ``ctx_lens`` tokens of the cache."""
    return torch.ops.lmdisagg_cpu.paged_decode(q, kv_cache, layer, block_tables, ctx_lens, scale)
