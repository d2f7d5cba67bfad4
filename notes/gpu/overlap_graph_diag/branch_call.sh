#!/usr/bin/env bash
# One device call (PLAN_25, session 19): branch overlap-deferred's GPU tests and its graphed overlap against
# main's graphed step and torchtitan, same machine, same call. Needs .ovd (the branch's dsmtp, tools, configs,
# tests and pyproject.toml, from git archive) and flash-attn-4's first half already on the machine (fa4a):
#   carry .fa4b .whl-core .whl-tt .tt .ovd; OUT=$OUT bash notes/gpu/overlap_graph_diag/branch_call.sh
set -uo pipefail
S=tools/bench_speed_gpu.sh
SUITE="fa4 setup" OUT=$OUT bash $S > /dev/null 2>&1
F=$HOME/fa4site/site-packages; P=/tmp/site:$F:$F/nvidia_cutlass_dsl/dsl_packages
(cd .ovd && PYTHONPATH=$P:$PWD timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rA \
   tests/gpu/test_gpu_train.py -k overlapped > "$OUT/ovd_tests.txt" 2>&1
 grep -E "^(PASSED|FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/ovd_tests.txt" | head -12)
SUITE="bf16pg tt" OUT=$OUT bash $S 2>&1 | grep -E "median|Error" | tail -6
(cd .ovd && PYTHONPATH=$P:$PWD timeout 170 python3 tools/bench_train.py --config configs/small.yaml --compile \
   --warmup 8 --results "$OUT/speed25.jsonl" --label "flash bf16-states bf16-params graph overlap" \
   --set model.attention_backend=flash --set train.optimizer_state_dtype=bf16 --set train.param_dtype=bf16 \
   --set train.precision=bf16 --cuda-graph --profile-steps 0 --set train.overlap_update=true \
   > "$OUT/ovd_bench.txt" 2>&1; tail -3 "$OUT/ovd_bench.txt")
SUITE=table OUT=$OUT bash $S 2>&1 | tail -24
