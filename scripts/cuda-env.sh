#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit from PyPI wheels, so that `cargo build --features cuda` of
# the worker compiles on a machine with no GPU and no system CUDA (../shared/CUDA-NOTES.md
# has the facts behind each step). Prints the environment to build with, one `export` per
# line:   eval "$(./scripts/cuda-env.sh)"
#
# target/cuda-venv   the wheels (nvcc, headers, cudart, cublas, curand, nvrtc; ~650 MiB)
# target/cuda        CUDA_HOME: bin/ include/ nvvm/ lib/ with unversioned .so links, and
#                    lib/stubs/libcuda.so, a link-time stand-in for the driver's library
#                    (every cu* entry point returns CUDA_ERROR_STUB_LIBRARY). It is for
#                    linking only: on a GPU machine the driver's libcuda.so.1 is used.
#
# CUDA_COMPUTE_CAP (default 90: H100/H200) is needed because there is no GPU to ask.
# Stay at 13.0: the H200s this project is lent run driver 580 (CUDA 13.0), and PTX from a
# newer nvcc may not load there.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv="$root/target/cuda-venv"
cuda="$root/target/cuda"
cap="${CUDA_COMPUTE_CAP:-90}"

if [ ! -x "$cuda/bin/nvcc" ]; then
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,crt,cccl]==13.0.2" "nvidia-nvvm==13.0.88" >&2
    tree=$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
    rm -rf "$cuda"
    mkdir -p "$cuda/lib/stubs"
    for d in bin include nvvm; do ln -s "$tree/$d" "$cuda/$d"; done
    ln -s lib "$cuda/lib64"
    for f in "$tree"/lib/*.so.*; do
        b=$(basename "$f")
        ln -s "$f" "$cuda/lib/$b"
        case $b in
            *builtins* | *.alt.*) ;;
            *) ln -sf "$f" "$cuda/lib/${b%%.so.*}.so" ;;
        esac
    done
fi

if [ ! -e "$cuda/lib/stubs/libcuda.so" ]; then
    # The stub defines every driver function cudarc declares; its source must be present.
    cargo fetch --quiet >&2
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | sort -V | tail -1)
    if [ -z "$sys" ]; then
        echo "cuda-env.sh: cudarc 0.19's source is not in the cargo registry (cargo fetch failed?)" >&2
        exit 1
    fi
    grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | awk '{print $4}' | sort -u |
        awk '{print "int " $1 "(void) { return 34; }"}' >"$cuda/lib/stubs/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/libcuda_stub.c"
    ln -sf libcuda.so "$cuda/lib/stubs/libcuda.so.1"
fi

"$cuda/bin/nvcc" --version | tail -1 >&2
echo "export CUDA_HOME=$cuda"
echo "export CUDA_COMPUTE_CAP=$cap"
echo "export PATH=$cuda/bin:\$PATH"
echo "export LIBRARY_PATH=$cuda/lib:$cuda/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
