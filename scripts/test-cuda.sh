#!/usr/bin/env bash
# Runs the worker's device tests on a GPU (cuda:0), from what scripts/build-cuda.sh put in
# target/cuda-dist/ (copied here next to this script, or named by DELTA_CUDA_DIST):
#   device  every method's training step (loss and every gradient) on cuda:0 vs the CPU,
#           and with bf16 products (--precision bf16) vs f32 on cuda:0
#   jobs    LoRA jobs trained and published through the registry's queue by a worker on
#           cuda:0; the pulled, applied model predicts what the mounted runtime predicts;
#           verification reproduces the recorded metrics; co-trained jobs equal each alone
#   staged  a staged MiniLM delta, applied vs mounted, on cuda:0 (needs MiniLM: set
#           DELTA_MINILM_DIR to a folder with it; skipped, and said so, without it)
#
# The machine needs the NVIDIA driver (its own libcuda.so.1: never the build's stub) and the
# CUDA 13 runtime libraries (cublas, curand, nvrtc, cudart): CUDA_LIBS, or found in a
# Python environment's nvidia/cu13/lib, or a system CUDA. Exit status: 0 only if every
# test binary ran and passed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dist=${DELTA_CUDA_DIST:-$here}
[ -x "$dist/delta-worker" ] || dist="$here/../target/cuda-dist"
if [ ! -x "$dist/delta-worker" ]; then
    echo "test-cuda.sh: no delta-worker built with cuda (run scripts/build-cuda.sh first)" >&2
    exit 1
fi
dist=$(cd "$dist" && pwd)

if [ -z "${CUDA_LIBS:-}" ]; then
    for py in python3 /usr/bin/python3 /opt/conda/bin/python3; do
        CUDA_LIBS=$("$py" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null) || true
        [ -n "$CUDA_LIBS" ] && [ -d "$CUDA_LIBS" ] && break
        CUDA_LIBS=
    done
fi
if [ -z "${CUDA_LIBS:-}" ]; then
    CUDA_LIBS=$(ls -d /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 2>/dev/null | head -1 || true)
fi
if [ -z "$CUDA_LIBS" ]; then
    echo "test-cuda.sh: no CUDA 13 libraries found (set CUDA_LIBS to a folder with libcublas.so.13)" >&2
    exit 1
fi
export LD_LIBRARY_PATH="$CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DELTA_TEST_DEVICE=cuda:0 DELTA_WORKER_BIN="$dist/delta-worker" RUST_BACKTRACE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "CUDA libraries: $CUDA_LIBS"

failed=0
for t in device jobs staged; do
    if [ "$t" = staged ] && [ -z "${DELTA_MINILM_DIR:-}" ]; then
        echo "== staged: SKIPPED (no DELTA_MINILM_DIR; MiniLM cannot be fetched here)"
        continue
    fi
    echo "== $t"
    start=$(date +%s)
    if "$dist/$t" --test-threads 1; then
        echo "== $t: passed in $(($(date +%s) - start)) s"
    else
        echo "== $t: FAILED"
        failed=1
    fi
done
exit $failed
