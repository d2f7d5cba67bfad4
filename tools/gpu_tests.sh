#!/usr/bin/env bash
# The CUDA tests (tests/gpu), in one command on the GPU machine. Without CUDA they skip themselves.
# Extra arguments go to pytest, e.g.  bash tools/gpu_tests.sh -x -k fp8
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu "$@"
