#!/usr/bin/env bash
# The scale-out benchmark (tests/benches/replicas.rs): sets up what it needs (moto in the
# test virtualenv, a throwaway PostgreSQL cluster, stopped on exit), then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${DELTA_VENV:-target/pyenv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
export DELTA_TEST_PYTHON="$PWD/$venv/bin/python"
pgdir="$(mktemp -d /tmp/delta-pg.XXXXXX)" # /tmp: the postgres user must reach it
trap './scripts/postgres.sh stop "$pgdir"' EXIT
DELTA_TEST_POSTGRES="$(./scripts/postgres.sh start "$pgdir")"
export DELTA_TEST_POSTGRES
cargo bench -p delta-tests --bench replicas
