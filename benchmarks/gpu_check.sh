#!/usr/bin/env bash
# One command for a CUDA machine: every GPU check of the engine, each kept when another fails.
#
#   bash benchmarks/gpu_check.sh            # full run (a few minutes on an H100/H200)
#   bash benchmarks/gpu_check.sh --quick    # fewer repeats in the kernel benchmark
#
# 1. the GPU-marked tests: Triton kernels forward+backward in fp16/bf16 over SD shapes, torch.compile
#    over a UNet block using the custom ops, FSDP save/resume, CUDA generators, the SD trainable
#    through the Fabric loop;
# 2. benchmarks/kernel_ops.py in float16 (512 and 1024 px) and bfloat16 (512 px), and
#    benchmarks/kernel_overhead.py (host time per kernel call);
# 3. the train task end to end on the GPU (`t2i-engine run examples/sd-train.toml`, bf16-mixed);
# 4. benchmarks/sd_gpu.py: SD-1.5 generation (fp16, 512 px, 50 steps), the engine plain, with its
#    Triton kernels and with [task] compile, against diffusers and diffusers + torch.compile, and
#    a training step at batch 8 in bf16.
#
# Writes one log per part into $OUT (default: ./gpu_check_out) and exits non-zero if a part fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || command -v "$PY" >/dev/null || PY=python3
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

part() {  # part NAME LIMIT_S COMMAND...: run, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name($rc)")
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi unavailable"; } | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt" || exit 2

part gpu_tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/training/test_fsdp_and_cuda.py
part kernels_fp16 90 "$PY" benchmarks/kernel_ops.py "$@"
part kernels_bf16 60 "$PY" benchmarks/kernel_ops.py --dtype bfloat16 --resolutions 512 "$@"
part kernel_overhead 60 "$PY" benchmarks/kernel_overhead.py
part train_task 90 "$PY" -c "import sys; from t2i_engine.cli import main; sys.exit(main())" \
    run examples/sd-train.toml --set train.precision='"bf16-mixed"' --set engine.output_dir='"/tmp/gpu-check-sd-train"'
part sd_gpu 420 "$PY" benchmarks/sd_gpu.py

echo "failed parts: ${failed[*]:-none}; logs in ${OUT}/"
[ "${#failed[@]}" -eq 0 ]
