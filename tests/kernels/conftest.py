"""Kernel tests run on CUDA when there is a GPU, else through Triton's CPU interpreter.

The interpreter is chosen here, before any kernel module is imported (Triton reads
TRITON_INTERPRET when a kernel is defined)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
