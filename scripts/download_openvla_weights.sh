#!/usr/bin/env bash
# Download the real OpenVLA-7B checkpoint (HF openvla/openvla-7b, ~15 GB bf16) on a machine
# WITH internet access. Never called by the package at run time, the demo or the tests.
#   scripts/download_openvla_weights.sh [DEST_DIR] [REPO_ID]
# Then: export OPENVLA_WEIGHTS=DEST_DIR  (or pass --weights / weights_path:=DEST_DIR)
# Only the files the loader reads are fetched (no remote-code .py files are executed).
set -euo pipefail
DEST=${1:-$HOME/openvla-7b}
REPO=${2:-openvla/openvla-7b}
PY=${PYTHON:-python3}
"$PY" - "$REPO" "$DEST" <<'PY'
import sys
from huggingface_hub import snapshot_download  # ships with transformers
repo, dest = sys.argv[1], sys.argv[2]
path = snapshot_download(repo_id=repo, local_dir=dest, allow_patterns=[
    "*.safetensors", "model.safetensors.index.json", "config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "dataset_statistics.json"])
print(path)
PY
echo "weights in $DEST — export OPENVLA_WEIGHTS=$DEST"
