#!/usr/bin/env bash
# Installs dsmtp and its dependencies into the current Python. Keeps an installed torch (a
# cluster's CUDA build); where there is none, installs torch 2.13.0 (the CPU build on our machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
