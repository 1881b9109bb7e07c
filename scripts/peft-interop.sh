#!/usr/bin/env bash
# Checks this project against the real Hugging Face libraries, prints the results as a
# table, and writes the fixtures the test command uses in their place. Not part of the
# test command: it installs torch, transformers and peft from PyPI into a virtualenv
# (about 5.6 GB; PEFT_VENV, default target/peft-venv), runs tests/python/peft_fixtures.py
# on all-MiniLM-L6-v2 and rewrites tests/fixtures/{peft-ia3,peft-lora,peft-seq-cls,
# worker-seq-cls}/ (commit what changed). About a minute once the virtualenv exists.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(./scripts/torch-venv.sh)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Library chatter (load reports, deprecation warnings) goes to a log, shown on failure.
py() {
    if ! "$venv/bin/python" tests/python/peft_fixtures.py "$@" >>"$tmp/python.log" 2>&1; then
        cat "$tmp/python.log" >&2
        return 1
    fi
}
model="$(./scripts/fetch-minilm.sh)"
fx=tests/fixtures
results="$tmp/results.jsonl"

# Adapters PEFT makes, and what PEFT computes from them.
rm -rf "$fx/peft-ia3" "$fx/peft-seq-cls" "$fx/peft-lora"
mkdir -p "$fx/peft-ia3" "$fx/peft-seq-cls" "$fx/peft-lora"
py "$model" "$fx/peft-ia3" "$fx/peft-seq-cls"
py lora-merge "$model" "$fx/peft-lora"

# A classifier trained here (LoRA on query/value, Hugging Face's pooler head), exported
# with `delta export peft` and loaded by PEFT as its users would.
cargo build --quiet -p delta-worker -p delta-client --bins
worker=target/debug/delta-worker
delta=target/debug/delta
trained="$fx/worker-seq-cls"
rm -rf "$trained"
mkdir -p "$trained"
"$worker" gen-data --n 320 --seed 1 >"$tmp/train.jsonl"
"$worker" gen-data --n 64 --seed 2 --split eval >"$tmp/eval.jsonl"
head -n 8 "$tmp/eval.jsonl" >"$tmp/texts.jsonl"
train() { "$worker" train --base "$model" --train "$tmp/train.jsonl" --max-len 32 --lr 0.002 "$@" >/dev/null 2>&1; }
train --out "$trained/delta" --method lora --pooling cls --max-steps 20
"$worker" predict --base "$model" "$trained/delta" --input "$tmp/texts.jsonl" >"$tmp/worker.jsonl"
"$delta" export peft "$trained/delta" -o "$tmp/export" --base-model "$PWD/$model" >/dev/null
py worker-export "$model" "$tmp/export" "$tmp/worker.jsonl" "$trained/expected.json" "$results"

# A classifier trained in two stages, merged by `delta apply`, loaded by transformers.
train --out "$tmp/parent" --method lora --max-steps 10
train --out "$tmp/child" --method bitfit --parent "$tmp/parent" --max-steps 10
"$worker" predict --base "$model" "$tmp/parent" "$tmp/child" --input "$tmp/texts.jsonl" >"$tmp/staged.jsonl"
mkdir -p "$tmp/merged"
cp "$model/config.json" "$model/tokenizer.json" "$tmp/merged/"
"$delta" apply --base "$model/model.safetensors" "$tmp/parent" "$tmp/child" -o "$tmp/merged/model.safetensors" >/dev/null
py merged-classifier "$tmp/merged" "$tmp/staged.jsonl" "$results"

# The checks the test suite makes against these fixtures, run here on the fresh ones.
cargo test --quiet -p delta-tests --lib e2e::peft >/dev/null 2>&1
cargo test --quiet -p delta-worker --test peft >/dev/null 2>&1
{
    echo '{"check": "PEFT IA3 (key/value outputs, both output.dense inputs) → push → `delta apply` vs `merge_and_unload`", "figure": "bit for bit (0 values differ)"}'
    echo '{"check": "PEFT rsLoRA with rank and alpha patterns → push → `delta apply` vs `merge_and_unload`", "figure": "≤ 1e-5 relative per tensor"}'
    echo '{"check": "PEFT SEQ_CLS LoRA (pooler + classifier) → `delta-worker predict` vs PEFT", "figure": "logits and probabilities within 1e-4"}'
    echo '{"check": "worker-trained classifier (fixture) → `delta export peft` → same keys; `delta-worker predict` vs PEFT", "figure": "keys equal; within 1e-4"}'
} >>"$results"
versions="$("$venv/bin/python" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
echo "Against $versions on all-MiniLM-L6-v2:"
echo
"$venv/bin/python" tests/python/peft_fixtures.py table "$results"
