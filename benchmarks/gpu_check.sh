#!/usr/bin/env bash
# One command for a CUDA machine: the GPU-marked kernel tests, then the kernel benchmark.
#
#   bash benchmarks/gpu_check.sh            # full benchmark
#   bash benchmarks/gpu_check.sh --quick    # fewer repeats (arguments go to benchmarks/kernels.py)
#
# Writes gpu_tests.log and kernels_benchmark.md into $OUT (default: ./gpu_check_out) and exits
# non-zero if a test fails (the benchmark still runs, so its table is kept either way).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi unavailable"; } | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 2

"$PY" -m pytest -q -m gpu tests/kernels -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

"$PY" benchmarks/kernels.py "$@" 2>&1 | tee "$OUT/kernels_benchmark.md"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests exit ${tests_rc}, benchmark exit ${bench_rc}; results in ${OUT}/"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
