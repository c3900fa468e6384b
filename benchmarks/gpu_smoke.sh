#!/usr/bin/env bash
# The engine's GPU check in one device call (well under 8 minutes on an H100/H200):
# kernel tests + CUDA engine tests, then the engine benchmark against HF transformers.
#
#   bash benchmarks/gpu_smoke.sh OUT_DIR      # logs, gpu.txt and engine_<gpu>.json land in OUT_DIR
#
# Needs torch (CUDA), triton, transformers, numpy, safetensors, tokenizers, xxhash, msgpack,
# pytest: all in the device image. Ray and pydantic are not needed (and not there).
set -uo pipefail
out=$(realpath -m "${1:-benchmarks/results}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
# kernels/ imports as lmdisagg.kernels only once the package is installed (pyproject maps it)
$py -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$out/gpu.txt"
# (test_cpu_linear is about the CPU path: not run here)
timeout 300 $py -m pytest -q -ra -p no:cacheprovider -k "not cpu_linear" tests/kernels \
    tests/engine/test_attention.py tests/engine/test_cuda.py tests/engine/test_imports.py 2>&1 | tee "$out/pytest.log"
tests=$?
timeout 360 $py benchmarks/engine_bench.py --device cuda --model llama-3-8b-dummy --rounds 3 --out "$out" \
    2>&1 | tee "$out/bench.log"
bench=$?
echo "pytest exit $tests, bench exit $bench"
exit $((tests || bench))
