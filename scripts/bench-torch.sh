#!/usr/bin/env bash
# The worker's training benchmark next to PyTorch + PEFT in the same run: makes (or
# reuses) a virtualenv with torch, transformers and peft (PyPI, about 5.6 GB; PEFT_VENV,
# default target/peft-venv, shared with scripts/peft-interop.sh), then runs
# `cargo bench -p delta-worker --bench methods` with DELTA_BENCH_PYTHON pointing at it.
# Not part of the test command.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(./scripts/torch-venv.sh)"
./scripts/fetch-minilm.sh >/dev/null
DELTA_BENCH_PYTHON="$venv/bin/python" cargo bench -p delta-worker --bench methods
