#!/usr/bin/env bash
# One device call: the steps named in $SUITE, in that order (default: all). Writes $OUT/log.txt,
# $OUT/results.jsonl (+ .prof.txt) and $OUT/fp8loss/. The baseline step needs ./baseline/dsmtp (the
# code before the speed work, e.g. `git archive 34b3d7e dsmtp | tar -x -C baseline`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=$OUT/results.jsonl
export PYTHONUNBUFFERED=1
B="python3 tools/bench_train.py --config configs/small.yaml --results $R"
step() {
  case $1 in
    probe) nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
           python3 -c "import torch; print(torch.__version__, torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" ;;
    tests) timeout 240 bash tools/gpu_tests.sh -rA 2>&1 | grep -E "PASS|FAIL|ERROR|Error|assert|passed|failed" | head -60 ;;
    base) PYTHONPATH=/tmp/site:$PWD/baseline timeout 200 $B --label baseline-main ;;
    fast) timeout 150 $B --label fast-eager ;;
    fast1) timeout 100 $B --label fast-eager --no-d0 ;;
    nogmm) timeout 120 $B --label fast-no-grouped_mm --disable grouped_mm --no-d0 ;;
    compile) timeout 300 $B --label fast-compile --compile --warmup 8 ;;
    fp8) timeout 150 $B --label fp8-eager --precision fp8 --no-d0 ;;
    fp8c) timeout 300 $B --label fp8-compile --precision fp8 --compile --warmup 8 --no-d0 ;;
    loss) timeout 300 python3 tools/fp8_vs_bf16.py --config configs/small.yaml --set train.seq_len=1024 \
            --text-dir /usr/lib/python3.12 --steps 500 --out "$OUT/fp8loss" ;;
  esac
}
{
for s in ${SUITE:-probe tests base fast nogmm compile fp8 fp8c loss}; do echo "==== step $s $(date +%T)"; step "$s"; done
echo "==== all rows"; [ -f "$R" ] && python3 tools/bench_train.py --table "$R"
} 2>&1 | tee "$OUT/log.txt"
