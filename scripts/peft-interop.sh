#!/usr/bin/env bash
# Checks this project against the real Hugging Face libraries and writes the fixtures the
# test command uses in their place. Not part of the test command: it installs torch,
# transformers and peft from PyPI into a virtualenv (about 5.6 GB; PEFT_VENV, default
# target/peft-venv) and runs tests/python/peft_fixtures.py on all-MiniLM-L6-v2, writing
# tests/fixtures/peft-ia3/ and tests/fixtures/peft-seq-cls/ (commit what changed).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PEFT_VENV:-target/peft-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers peft safetensors
model="$(./scripts/fetch-minilm.sh)"
out=tests/fixtures/peft-ia3
seqcls=tests/fixtures/peft-seq-cls
rm -rf "$out" "$seqcls"
mkdir -p "$out" "$seqcls"
"$venv/bin/python" tests/python/peft_fixtures.py "$model" "$out" "$seqcls"
ls -l "$out" "$out/adapter" "$seqcls" "$seqcls/adapter"
