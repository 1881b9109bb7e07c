# Sourced by scripts/test.sh and scripts/bench-replicas.sh: what the tests and benchmarks
# talk to besides the registry itself. A Python virtualenv with grpcio (the
# cross-language client test) and moto (S3 on loopback), and a throwaway PostgreSQL
# cluster on loopback (scripts/postgres.sh), stopped and removed when the caller exits.

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
