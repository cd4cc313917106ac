#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the lent device machine (see ../.library/device/):
# the GPU test classes (compiled Triton kernels, bf16, fp16 vs fp32), the kernel and refinement
# benchmarks and the per-stage benchmark, with logs under $OUT. The device image has torch, triton,
# onnx/onnxruntime and transformers but not diffusers or segment-anything: they travel as wheels.
#
# Once, on the development machine, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers segment-anything
# For the serving load test (step 4) also, the same way, with their dependencies (drop --no-deps):
#   fastapi uvicorn python-multipart prometheus-client httpx
# Then: device run with carry [".whl"] and command `bash benchmarks/gpu_session.sh [quick|serve]`
# (quick: the tests only; serve: the load test only; nothing: everything but the load test).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/zone-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

if [ "${1:-}" = "serve" ]; then
    # 4. The HTTP service under load, batching on vs off: SD1.5-sized random weights, fp16, 512², 20 steps.
    python3 -c "import fastapi, uvicorn, multipart, prometheus_client, httpx" || {
        echo "the serving wheels are not carried (see the header)"; exit 1; }
    python3 -m benchmarks.load_test --no-tiny --device cuda --server-arg=--random-weights=sd15 \
        --server-arg=--dtype=fp16 --size 512x512 --steps 20 --concurrency 1,2,4,8 --requests 16 \
        --duration-s 100 --out "$OUT/load" 2>&1 | tee "$OUT/load.log" | tail -20
    exit 0
fi

# 1. Correctness on the GPU: the whole suite (GPU classes included), kernels compiled (no interpreter).
python3 -m pytest -q -x tests 2>&1 | tee "$OUT/tests.log" | tail -5

[ "${1:-}" = "quick" ] && exit 0

# 2. Kernel and refinement benchmarks (do_bench medians on CUDA).
python3 -m benchmarks.bench_kernels 2>&1 | tee "$OUT/bench_kernels.log" | tail -20
python3 -m benchmarks.bench_refine --model-type vit_h --size 512 --points-per-side 32 2>&1 \
    | tee "$OUT/bench_refine.log" | tail -15

# 2b. Two weight sets per step: two calls vs vmap over stacked weights vs two streams, against one UNet call.
python3 -m benchmarks.bench_dual_unet --resolution 512 --dtype fp16 --repeats 20 2>&1 | tee "$OUT/bench_dual_unet.log"
python3 -m benchmarks.bench_dual_unet --resolution 512 --dtype fp16 --repeats 20 --batch 4 2>&1 \
    | tee -a "$OUT/bench_dual_unet.log"

# 3. Per-stage latency, baseline vs engine backends, 512², 20 steps, fp16.
python3 -m benchmarks --preset gpu-512 --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
