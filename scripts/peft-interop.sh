#!/usr/bin/env bash
# Checks this project against the real Hugging Face libraries and writes the fixtures the
# test command uses in their place. Not part of the test command: it installs torch,
# transformers and peft from PyPI into a virtualenv (about 5.6 GB; PEFT_VENV, default
# target/peft-venv) and runs tests/python/peft_fixtures.py on all-MiniLM-L6-v2, writing
# tests/fixtures/peft-ia3/, tests/fixtures/peft-seq-cls/ and tests/fixtures/worker-seq-cls/
# (commit what changed).
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

# A classifier trained here (LoRA on query/value, Hugging Face's pooler head), exported
# with `delta export peft` and loaded by PEFT as its users would.
cargo build --quiet -p delta-worker -p delta-client --bins
worker=target/debug/delta-worker
trained=tests/fixtures/worker-seq-cls
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$trained"
mkdir -p "$trained"
"$worker" gen-data --n 320 --seed 1 >"$tmp/train.jsonl"
"$worker" gen-data --n 64 --seed 2 --split eval >"$tmp/eval.jsonl"
"$worker" train --base "$model" --train "$tmp/train.jsonl" --eval "$tmp/eval.jsonl" \
    --out "$trained/delta" --method lora --pooling cls --max-steps 20 --max-len 32 \
    --eval-every 20 --lr 0.002 >/dev/null
head -n 8 "$tmp/eval.jsonl" >"$tmp/texts.jsonl"
"$worker" predict --base "$model" "$trained/delta" --input "$tmp/texts.jsonl" >"$tmp/worker.jsonl"
target/debug/delta export peft "$trained/delta" -o "$tmp/export" --base-model "$PWD/$model"
"$venv/bin/python" tests/python/peft_fixtures.py worker-export "$model" "$tmp/export" \
    "$tmp/worker.jsonl" "$trained/expected.json"
