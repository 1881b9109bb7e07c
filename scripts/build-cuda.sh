#!/usr/bin/env bash
# Builds the worker with `--features cuda` on a machine without a GPU (the toolkit comes
# from PyPI wheels: scripts/cuda-env.sh), and the worker's device tests, stripped, into
# target/cuda-dist/ (and target/cuda-dist.tar.xz, ~37 MB) for scripts/test-cuda.sh to run
# on a GPU machine. Not part of the test
# command: about 15 minutes cold on 2 cores (candle's kernels are most of it).
#
# It ends by starting the built binary here against the stub driver library: without a
# GPU, `--device cuda:0` must fail with one line naming the problem.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./scripts/cuda-env.sh)"
export CARGO_TARGET_DIR=target/cuda-target
tests=(device jobs staged)

cargo build --release --locked -p delta-worker --features cuda
test_args=()
for t in "${tests[@]}"; do test_args+=(--test "$t"); done
cargo test --release --locked -p delta-worker --features cuda --no-run "${test_args[@]}" \
    --message-format=json >"$CARGO_TARGET_DIR/cuda-tests.json"

dist=target/cuda-dist
rm -rf "$dist"
mkdir -p "$dist"
strip -o "$dist/delta-worker" "$CARGO_TARGET_DIR/release/delta-worker"
python3 - "$CARGO_TARGET_DIR/cuda-tests.json" "$dist" "${tests[@]}" <<'PY'
import json, subprocess, sys
log, dist, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3:])
for line in open(log):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in wanted:
        subprocess.run(["strip", "-o", f"{dist}/{m['target']['name']}", m["executable"]], check=True)
        wanted.discard(m["target"]["name"])
if wanted:
    sys.exit(f"build-cuda.sh: no test binary for {sorted(wanted)}")
PY
cp scripts/test-cuda.sh "$dist/"
du -sh "$dist"/* >&2

# No GPU here: the stub driver library answers CUDA_ERROR_STUB_LIBRARY to every call.
msg=$(LD_LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/lib/stubs" "$dist/delta-worker" predict \
    --device cuda:0 --base models/none --input none.jsonl 2>&1 >/dev/null) && status=0 || status=$?
echo "without a GPU: exit $status: $msg" >&2
if [ "$status" = 0 ] || [ "$(printf '%s\n' "$msg" | wc -l)" != 1 ] || [[ $msg != *"no CUDA device"* ]]; then
    echo "build-cuda.sh: expected one line 'no CUDA device: …' and a failure" >&2
    exit 1
fi
# One compressed file to carry to the GPU machine (the kernels' PTX compresses ~7×):
#   tar -xJf cuda-dist.tar.xz -C DIR && DIR/test-cuda.sh
tar -C "$dist" -cf - . | xz -T0 -6 >target/cuda-dist.tar.xz
du -sh target/cuda-dist.tar.xz >&2
echo "$dist"
