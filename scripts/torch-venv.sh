#!/usr/bin/env bash
# Makes (or reuses) the virtualenv with torch, transformers and peft from PyPI (about
# 5.6 GB) that scripts/peft-interop.sh and scripts/bench-torch.sh use, and prints its
# absolute path. PEFT_VENV chooses it (default target/peft-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PEFT_VENV:-target/peft-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers peft safetensors >&2
cd "$venv" && pwd
