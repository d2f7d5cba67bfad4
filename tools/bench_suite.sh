#!/usr/bin/env bash
# One device call: probe, GPU tests, and the benchmark rows named in $SUITE (default: all).
# Writes $OUT/log.txt, $OUT/results.jsonl (+ .prof.txt). Baseline rows need ./baseline/dsmtp (the
# code before the speed work) next to this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=$OUT/results.jsonl
export PYTHONUNBUFFERED=1
B="python3 tools/bench_train.py --config configs/small.yaml --results $R"
has() { [[ " ${SUITE:-probe tests base fast nogmm nocudnn compile fp8 fp8c} " == *" $1 "* ]]; }
{
has probe && { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch; print(torch.__version__, torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'scaled_grouped_mm', hasattr(torch, '_scaled_grouped_mm'))"; }
has tests && timeout 300 bash tools/gpu_tests.sh -x -rA 2>&1 | tail -40
has base && PYTHONPATH=/tmp/site:$PWD/baseline timeout 200 $B --label baseline-main
has fast && timeout 150 $B --label fast-eager
has nogmm && timeout 120 $B --label fast-no-grouped_mm --disable grouped_mm --no-d0
has nocudnn && timeout 120 $B --label fast-no-cudnn --disable cudnn_attention --no-d0
has compile && timeout 300 $B --label fast-compile --compile --warmup 8
has fp8 && timeout 150 $B --label fp8-eager --precision fp8 --no-d0
has fp8c && timeout 300 $B --label fp8-compile --precision fp8 --compile --warmup 8 --no-d0
echo "==== all rows"; python3 tools/bench_train.py --table $R
} 2>&1 | tee $OUT/log.txt
