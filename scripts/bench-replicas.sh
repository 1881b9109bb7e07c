#!/usr/bin/env bash
# The scale-out benchmark (tests/benches/replicas.rs): sets up moto and a throwaway
# PostgreSQL cluster (scripts/services.sh, stopped on exit), then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
cargo bench -p delta-tests --bench replicas
