#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the lent device machine (see ../.library/device/): the GPU
# test classes (compiled Triton kernels, bf16, fp16 vs fp32), the kernel, refinement and per-stage
# benchmarks, the profile and more, their logs packed into $OUT/logs.tar.gz. The device image has torch,
# triton, onnx/onnxruntime and transformers but not diffusers or segment-anything: they travel as wheels.
#
# Before a lease, on the development machine, in the repo root: `bash benchmarks/gpu_session.sh fetch-wheels`
# (adds /.whl/ to .git/info/exclude and downloads diffusers and segment-anything into .whl;
# `fetch-wheels serve` also the serving load test's: the image has prometheus-client, httpx, anyio, h11, click).
# Then: device run with carry [".whl"] and command `bash benchmarks/gpu_session.sh [STAGE ...]`: stages
# kernels tests bench dual refine profile graph-memory (the default, in that order), refine-zero
# (refine keeping every mask), dual (the dual-step variants), bench-contiguous (bench with every network contiguous),
# bench-compile (the compile backend beside fused, and the variant rows on compile's denoiser),
# compile (the torch.compile test), breaks (compile's graph breaks), profile (one edit under torch.profiler: each
# stage's device-busy share and launches), graph-memory (captured steps' memory, shared pool vs one each),
# photo (a 12 MP photo's host work and blend stage), suite (the whole suite), serve (the load test).
# At most 8 files come back from $OUT: every stage's log goes into $OUT/logs.tar.gz (rewritten after each
# stage, through a temporary file, so a call cut short still returns what ran), bench and bench-compile add their
# JSON, markdown and PNG ($OUT and $OUT/compile: written there as they end, so they come back even from a call
# killed after them), bench-contiguous its markdown. Each stage's output is shown as it runs (the reply's tail then shows
# a stage cut off with its call) and kept in its log. The output ends with a summary: how each stage ended, then
# the benches' per-stage latency tables.
# A lease now has 15 minutes of device time in all, a machine's start (a minute or two) included, and a call
# runs at most 600 s, so the default list puts what the open issue waits for first: kernels (issue 6's kernel
# timings: kernel 1's row-group sweep and its read-only floor), then the GPU tests, bench (gpu-512 and the batches' throughput) and the rest,
# about 410 s on the H200 (2026-12-04). bench-compile (the compile rows, compile+sam-bf16 the fastest, 5.71x on
# 2026-12-04: 202 s there, 123 s of it compiling) is for a second call. A stage starts only while
# the call's budget (BUDGET, default 570 s from the script's start) still holds its whole limit, else it says it
# was skipped; bench's and bench-compile's limits (BENCH_LIMIT, default 240; COMPILE_LIMIT, default 330) are cut
# to the budget left (a minute at least), their --time-limit 20 s under. A stage that reaches its limit is sent SIGTERM: a bench then
# starts nothing more and writes its reports of the edits it timed. On the H200 (2026-12-04) the stages took:
# kernels 14 s, bench-compile 202, bench 109, tests 127, refine 23 (the default call's 491 s: profile,
# graph-memory and dual did not fit its budget), then dual 45, profile 47, graph-memory 46 in a second call. Run it with timeout_s 590;
# then, at once (the machine stays warm 30 s; a fresh one needs 4 minutes of the lease left), the stages it
# skipped, with BUDGET = the device seconds left - 20 and timeout_s = the seconds left, and give the machine back.
# bench-contiguous, compile, breaks, refine-zero, photo, suite and serve are for a lease with time left; a longer compile run:
# `BACKENDS=fused,compile BENCH_LIMIT=560 bash benchmarks/gpu_session.sh bench`.
# DRY_RUN=1 prints each stage's command instead of running it, with nothing installed: the suite parses
# them with their tools' own parsers (tests/test_gpu_session.py), so no lease is spent on a stale flag.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = fetch-wheels ]; then  # here, not on the device: the packages its image lacks, as wheels
    # Not importlib_metadata (diffusers' metadata asks for it, its code takes the standard library's on Python 3.8+):
    # its newest wheel needs a package the image lacks, and on PYTHONPATH it would shadow the image's own.
    wheels=(diffusers==0.42.1 segment-anything ftfy wcwidth)  # ftfy: the instruction as CLIP reads it
    [ "${DRY_RUN:-0}" = 1 ] || rm -rf .whl  # a re-fetch must not leave two versions of a package to install
    [ "${2:-}" != serve ] || wheels+=(fastapi uvicorn python-multipart starlette pydantic pydantic-core
        annotated-types typing-inspection opentelemetry-api typing_extensions)
    command=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${wheels[@]}")
    if [ "${DRY_RUN:-0}" = 1 ]; then printf 'DRY-RUN fetch-wheels:'; printf ' %q' "${command[@]}"; echo; exit 0; fi
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude  # never committed
    "${command[@]}" && ls .whl
    exit
fi
OUT="${OUT:-/tmp/zone-out}"
LOGS="${LOGS:-/tmp/zone-logs}"  # the stages' logs, packed into $OUT/logs.tar.gz after each stage
BUDGET="${BUDGET:-570}"  # seconds this call may spend on its stages (the device runs a command 600 s at most)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DRY_RUN="${DRY_RUN:-0}"
# The checkout runs uninstalled: zone_engine from its root, and the folders that install under other names
# (pyproject.toml's package-dir: kernels/ as zone_kernels, ...) through links of those names.
SRC="${SRC:-/tmp/zone-src}"
mkdir -p "$SRC"
for folder in kernels export benchmarks; do ln -sfn "$PWD/$folder" "$SRC/zone_$folder"; done
PYTHONPATH="$SRC:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY_RUN" != 1 ] && [ -d .whl ]; then  # a failure costs the stages that import diffusers or segment-anything
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        || echo "installing the carried wheels failed: stages that need diffusers or segment-anything will fail"
    PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONPATH
pack_logs() {  # through a temporary file: a call killed while packing keeps the last whole archive
    tar czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . && mv -f "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}
fit() {  # fit SECONDS: a bench stage's limit, cut to the call's budget left (less 5 s for its log); under a
    # minute left, as asked, so that the stage is skipped
    local left=$((BUDGET - SECONDS - 5))
    echo $(( $1 < left || left < 60 ? $1 : left ))
}
if [ "$DRY_RUN" != 1 ]; then
    export TRITON_INTERPRET=0  # compiled kernels: a CUDA machine never interprets (bench_kernels refuses it)
    mkdir -p "$LOGS"
fi
MACHINE_SAID=0
machine_once() {  # before this call's first stage that runs (none: nothing to say of the machine): gpu.txt
    [ "$MACHINE_SAID" = 1 ] && return 0
    MACHINE_SAID=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee -a "$LOGS/gpu.txt"
    # Said at once, not by every stage failing after its start-up: only `kernels` runs without them.
    python3 -c "import diffusers, segment_anything" 2>&1 | tee -a "$LOGS/gpu.txt" \
        || echo "!! diffusers or segment-anything cannot be imported (were the wheels carried: carry [\".whl\"]?):" \
            "only the kernels stage can run" | tee -a "$LOGS/gpu.txt"
    pack_logs
}

# Each stage is bounded (the device allows 10 minutes a command): a stage that runs over is cut off,
# its log kept, and the next one runs; one whose limit the call's budget no longer holds does not start.
stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, its output in $LOGS/NAME.log
    local name=$1 limit=$2; shift 2
    if [ "$DRY_RUN" = 1 ]; then printf 'DRY-RUN %s:' "$name"; printf ' %q' "$@"; echo; return 0; fi
    skipped_for_budget "$name" "$limit" && return 0
    machine_once
    skipped_for_budget "$name" "$limit" && return 0  # the machine's check took its seconds too
    echo "== $name (limit ${limit}s)"
    local started=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    echo "== $name: rc $rc after $((SECONDS - started))s"
    SUMMARY+=("$name: rc $rc after $((SECONDS - started))s$(case $rc in 124|137) echo ' (cut off at its limit)';; esac)")
    pack_logs
}
skipped_for_budget() {  # skipped_for_budget NAME SECONDS: said and summed up when the budget left is short of it
    local left=$((BUDGET - SECONDS))
    [ "$left" -lt "$2" ] || return 1
    echo "== $1: skipped, ${left}s of the call's budget of ${BUDGET}s left and its limit is ${2}s"
    SUMMARY+=("$1: skipped (${left}s left, limit ${2}s)")
}
SUMMARY=()
run_stage() {
    case $1 in
    tests)  # Correctness on the GPU: the GPU test classes (compiled Triton, bf16, fp16 vs fp32, CUDA graphs),
        # in this process (TRITON_INTERPRET=0: no interpreted copy that reruns itself compiled).
        # 150 s until kernel 3's GPU class (about 30 more compilations) joined them, 180 s until its fused and
        # one-channel/one-group cases (about 16 more). -v: a run cut off at its limit still names what passed.
        TRITON_INTERPRET=0 stage gpu_tests 200 python3 -m pytest -v -m gpu -rs --durations=8 -k "not compiled_step" \
            tests ;;
    compile)  # The torch.compile test alone, with dynamo's graph breaks and recompilations logged.
        TRITON_INTERPRET=0 TORCH_LOGS=graph_breaks,recompiles stage compile_test 150 python3 -m pytest -q -m gpu \
            -k compiled_step tests/test_dual_step.py ;;
    kernels)  # Kernel benchmarks: do_bench medians against the reference-style store and the torch references,
        # and kernel 3 (GroupNorm) against PyTorch's norm on the same NHWC activation and on its NCHW copy, and
        # fused (a ResNet block's second norm) against PyTorch's sum, norm and SiLU.
        stage bench_kernels 60 python3 -m zone_benchmarks.bench_kernels ;;
    refine)  # PyTorch SAM vit_h refinement at ZONE's settings (1,024 prompts, SAM's thresholds): fp32 vs the image
        # encoder in bf16 (no ONNX: no CUDA provider there), the engine's search for M_b's segment vs the
        # generator's list, the search in its CUDA runs (prompts_per_run) vs runs of 64, and SAM's decoder
        # transformer vs the factored one (sam_decoder.py).
        stage bench_refine 60 python3 -m zone_benchmarks.bench_refine --model-type vit_h --size 512 --no-onnx \
            --sam-precision bf16 --thresholds sam ;;
    refine-zero)  # The same with every mask kept (thresholds 0): post-processing exercised as real weights would.
        stage bench_refine_zero 150 python3 -m zone_benchmarks.bench_refine --model-type vit_h --size 512 \
            --no-onnx --sam-precision bf16 ;;
    dual)  # Two weight sets per step: one UNet call at batch 6 vs the dual-step variants, eager and graphed,
        # and on channels-last copies of the UNets, with PyTorch's GroupNorm (step-cl) and kernel 3's (step-cl-gn).
        stage bench_dual_unet 100 python3 -m zone_benchmarks.bench_dual_unet --resolution 512 --dtype fp16 --repeats 20 \
            --channels-last ;;
    breaks)  # torch.compile's graph breaks in the dual step, SD1.5 size, fp16 (none is the goal).
        stage graph_breaks 90 python3 -m zone_benchmarks.graph_breaks --device cuda --dtype fp16 ;;
    bench)  # Per-stage latency, baseline vs engine backends, 512², 20 steps, fp16 (gpu-512 adds engine:fused+gn-torch,
        # the fused row with PyTorch's GroupNorm: kernel 3's gain in the same run). BACKENDS: the engine rows
        # (default fused; eager,fused took 111 s in all on the H100; compile's warm-up took 149 s there when it compiled
        # once per warm-up step and capture, 4 times a shape: once since 3173f92, and again for the batch of 4).
        limit=$(fit "${BENCH_LIMIT:-240}")
        stage bench "$limit" python3 -m zone_benchmarks --preset gpu-512 --backends "${BACKENDS:-fused}" \
            --time-limit $((limit - 20)) --out "$OUT" ;;
    photo)  # A 12 MP photo's work at its own size with the pipeline on the GPU (its blend stage enlarges there).
        stage bench_photo 90 python3 -m zone_benchmarks.bench_photo --device cuda ;;
    graph-memory)  # Device memory of the captured dual steps of a server's shapes (4 sizes x batches 1, 2, 4):
        # one shared pool (the engine's) against a pool per graph; and that both give the same latents.
        stage graph_memory 90 python3 -m zone_benchmarks.graph_memory ;;
    profile)  # Why each stage of a gpu-512 edit takes its time: device-busy share, launches, longest kernels
        # (torch.profiler over one fused edit after a warm-up; a host-bound stage has a small busy share).
        stage profile 90 python3 -m zone_benchmarks.profile_edit --rows 30 ;;
    bench-contiguous)  # The same with every network contiguous (fused rows only, no batches): against bench's rows
        # (the UNets channels-last, the default since 2026-11-30), the whole edit's gain from that default, which is
        # unmeasured. Its markdown alone comes back (8 files at most return from $OUT).
        stage bench_contiguous 200 python3 -m zone_benchmarks --preset gpu-512 --backends fused --batch 1 \
            --no-channels-last --time-limit 180 --out /tmp/zone-bench-contiguous
        [ ! -f /tmp/zone-bench-contiguous/bench-gpu-512.md ] \
            || cp /tmp/zone-bench-contiguous/bench-gpu-512.md "$OUT/bench_contiguous.md" ;;
    bench-compile)  # The compile backend beside fused (the variant rows, sam-bf16 among them, then on compile's
        # denoiser: the fastest combination); 3 timed edits, no batches (a batch is a second compilation). Cut
        # short, it still reports what it timed, in $OUT/compile. Not the PyTorch-norm and ONNX rows: bench has the
        # one, and the image has no CUDA provider for the other.
        limit=$(fit "${COMPILE_LIMIT:-330}")
        stage bench_compile "$limit" python3 -m zone_benchmarks --preset gpu-512 --backends fused,compile --batch 1 \
            --repeats 3 --no-compare-group-norm --no-sam-onnx --time-limit $((limit - 20)) --out "$OUT/compile" ;;
    suite)  # The whole suite on the GPU machine, in parallel processes.
        stage tests 400 python3 -m pytest -q -n 8 -rf tests ;;
    serve)  # The HTTP service under load, batching on vs off: SD1.5-sized random weights, fp16, 512², 20 steps
        # (its load.json and load.png go into the logs archive).
        python3 -c "import fastapi, uvicorn, multipart, prometheus_client, httpx" || {
            echo "the serving wheels are not carried (see the header)"; SUMMARY+=("load: not run (no serving wheels)")
            return 1; }
        stage load 420 python3 -m zone_benchmarks.load_test --no-tiny --device cuda \
            --server-arg=--random-weights=sd15 --server-arg=--dtype=fp16 --size 512x512 --steps 20 \
            --concurrency 1,2,4,8 --requests 16 --duration-s 100 --out "$LOGS/load" ;;
    *) echo "unknown stage $1: tests, compile, kernels, refine, refine-zero, dual, breaks, profile, graph-memory," \
            "bench, bench-contiguous, bench-compile, photo, suite, serve"
        SUMMARY+=("$1: unknown stage")
        return 1 ;;
    esac
}
[ $# -gt 0 ] || set -- kernels tests bench dual refine profile graph-memory
for name in "$@"; do run_stage "$name"; done
# Last, as the reply carries the end of the output: how each stage ended, and the per-stage latency table.
if [ "$DRY_RUN" != 1 ]; then
    {  # kept in the logs too: a call killed now still returns the archive packed below
        echo "== summary (${SECONDS}s of the budget of ${BUDGET}s; every log in logs.tar.gz)"
        printf '%s\n' "${SUMMARY[@]}"
        for table in "$OUT"/bench-*.md "$OUT"/compile/bench-*.md "$OUT"/bench_*.md; do
            if [ -f "$table" ]; then sed -n '/^## Per-stage latency/,/^Speed-up/p' "$table"; fi
        done
    } | tee "$LOGS/summary.txt"
    pack_logs
fi
