"""The engine, its kernels and the engine benchmark import neither Ray nor pydantic: the GPU
host that runs them has neither."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_path_imports_no_ray_or_pydantic():
    code = (
        "import runpy, sys\n"
        "import lmdisagg.engine, lmdisagg.engine.cuda_graphs, lmdisagg.kernels.cpu_linear\n"
        "import lmdisagg.kernels.decode_attention, lmdisagg.kernels.kv_write\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'engine_bench.py')!r}, run_name='bench')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pydantic'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
