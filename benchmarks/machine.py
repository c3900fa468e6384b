"""What every benchmark's JSON says about the machine its numbers come from (imported by the
scripts beside it: ``python benchmarks/<name>.py`` puts this folder on ``sys.path``)."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def describe(device: str = "cpu") -> str:
    """``"<cpu>, N cores, M GiB, <k>x <gpu> | no GPU, Python v[, torch v]"``; GPUs named only for
    CUDA runs."""
    gpus, torch_v = "no GPU", ""
    try:
        import torch
        torch_v = f", torch {torch.__version__}"
        if device.startswith("cuda") and torch.cuda.is_available():
            gpus = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return (f"{cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB, {gpus}, "
            f"Python {platform.python_version()}{torch_v}")
