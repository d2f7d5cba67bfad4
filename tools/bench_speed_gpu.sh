#!/usr/bin/env bash
# Issue 25 on one H200 (notes/gpu/PLAN_25.md gives the device calls, their carry lists and minutes):
# each change's before/after on configs/small.yaml at D=1 and D=0, torchtitan's harness in the same
# run, the CUDA tests, the bf16-vs-fp32 optimizer-state curves.
#
#   SUITE="fa4 setup probe tests bench tt table" OUT=/tmp/out bash tools/bench_speed_gpu.sh
#
# Steps ($SUITE, in the order given; default: setup probe tests bench1 flash bench2 tt table):
#   fa4a   first of the two flash-attn-4 transfers: keep $FA4A's files on the machine ($FA4DIR)
#   fa4    second: join the runtime wheel from $FA4DIR and $FA4B, install into $FA4SITE
#          (defaults .fa4a, .fa4b, ~/fa4, ~/fa4site/site-packages and CUTLASS_DSL_VERSION=4.8.1, the runtime wheel's
#          version; a second set, e.g. with cutlass-dsl 4.7.1, goes to other folders on the same machine)
#   setup  install the carried wheels (.whl or .whl-core: dsmtp's dependencies; .whl-tt: torchtitan) into /tmp/site, /tmp/tt
#   probe  GPU, torch, flash-attn-4 importable
#   tests  tests/gpu (flash attention, training, kernels)
#   tests25 the GPU tests written after session 10's run: the bf16-moment update, flash prefill, the
#          routed experts through torch._grouped_mm and through quack ($TESTS_K: pytest -k, to pick some)
#   bench1 tools/bench_train.py --compile, one process per row (D=1 then D=0), rows appended to
#          $OUT/speed25.jsonl: main's path (SDPA, fp32 states)
#   flash  the same with flash attention
#   bench2 bf16 optimizer states with flash (their before/after: the flash step's "flash fp32" row)
#   quack  bench2's row with kernels.backends.quack_experts on (the routed experts' SwiGLU in quack's GEMM epilogues;
#          $QUACK: the --enable flags, default "--enable quack_experts"; add "--enable quack_tuned" for its autotuner)
#   notriton bench2's row without dsmtp.model.moe_triton's kernels (on by default since session 14; $NOTRITON:
#          the --disable flags, default triton_gather and triton_swiglu: the token-row gathers and the routed
#          SwiGLU's gradient by torch.compile instead)
#   bf16p  bench2's row with train.param_dtype=bf16 (bf16 parameters and gradients, fp32 master weights in the
#          optimizer: no weight casts in forward, no gradient casts in backward)
#   bf16pg the same, forward+backward replayed as one CUDA graph
#   bf16pgr bf16pg's row with model.router_dtype=autocast (the router's GEMM in bf16 instead of fp32)
#   old    bf16p's row with the code of an earlier commit ($OLD, default .old: that commit's dsmtp/, tools/ and
#          configs/, from `git archive`): the before row of a change no switch turns off ($OLD_LABEL names it)
#   noce   bench2's row without the fused cross-entropy (kernels.backends.triton_cross_entropy, on by default
#          since session 15: both heads' losses by dsmtp.model.cross_entropy_triton)
#   coordesc bench2's row with inductor's coordinate-descent tuning of its own kernels' launch parameters
#   autotune bench2's row with train.compile_mode=max-autotune-no-cudagraphs (longer compile)
#   graph  bench2's row with forward+backward replayed as one CUDA graph (train.cuda_graph)
#   best   everything that paid at once: bf16 parameters, forward+backward as one CUDA graph, inductor's
#          coordinate-descent tuning (minutes more compile)
#   ov     bf16p's row with train.overlap_update, eager (profiled)
#   optim  the optimizer update alone: fused AdamW (fp32 moments) against the Triton bf16-moment update by
#          block size and warps (tools/bench_optimizer_update.py), rows to $OUT/optimizer_update.jsonl
#   moe    the MoE kernel levers alone, per MoE layer call: tools/bench_moe_kernels.py (moe_triton's kernels;
#          quack, from flash-attn-4's wheels)
#   ceb    the fused cross-entropy alone, one head: tools/bench_cross_entropy.py, rows to $OUT/cross_entropy.jsonl
#   tt     torchtitan's harness (.tt: a copy of ../shared/anchors/torchtitan), rows to $OUT/torchtitan.json
#   curves 500 steps x 2 seeds x fp32/bf16 optimizer states ($CURVES: which) on the real corpus (data/stdlib-32k carried),
#          eager (no compile time in 500 steps); each run's metrics.jsonl to $OUT/runs/, plotted here
#          afterwards: python3 tools/fp8_vs_bf16.py RUN... --out notes/gpu/optimizer_states.png
#   table  the table of every row $OUT/speed25.jsonl holds, and torchtitan's
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
R=$OUT/speed25.jsonl
# FA4SITE's path must hold "/site-packages/": quack's kernel-cache key treats only functions from such paths
# (or dist-packages) as installed code and walks into any other, where cutlass-dsl's globals cannot be keyed
FA4A=${FA4A:-.fa4a}; FA4B=${FA4B:-.fa4b}; FA4DIR=${FA4DIR:-$HOME/fa4}; FA4SITE=${FA4SITE:-$HOME/fa4site/site-packages}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
[ -d "$FA4SITE" ] && export PYTHONPATH=$PYTHONPATH:$FA4SITE:$FA4SITE/nvidia_cutlass_dsl/dsl_packages
B="python3 tools/bench_train.py --config configs/small.yaml --compile --warmup 8 --results $R"
# before/after rows: the old path is forced by a --set, the new one by another; D=1 then D=0 in one process
SDPA="--set model.attention_backend=sdpa"; FLASH="--set model.attention_backend=flash"
FP32="--set train.optimizer_state_dtype=fp32"; BF16="--set train.optimizer_state_dtype=bf16"
QUACK=${QUACK:---enable quack_experts}
BF16P="--set train.param_dtype=bf16 --set train.precision=bf16"
NOTRITON=${NOTRITON:---disable triton_gather --disable triton_swiglu}

step() {
  case $1 in
    fa4a) mkdir -p "$FA4DIR" && cp "$FA4A"/* "$FA4DIR"/ && ls -la "$FA4DIR" ;;
    fa4) test -f "$FA4DIR"/cu13.part.aa || { echo "$FA4DIR is missing: a different machine, start again with fa4a"; exit 3; }
         cat "$FA4DIR"/cu13.part.aa "$FA4B"/cu13.part.ab \
           > "$FA4DIR"/nvidia_cutlass_dsl_libs_cu13-${CUTLASS_DSL_VERSION:-4.8.1}-cp312-cp312-manylinux_2_28_x86_64.whl
         rm "$FA4DIR"/cu13.part.aa
         python3 -m pip install -q --no-index --no-deps --no-compile --target "$FA4SITE" "$FA4DIR"/*.whl
         export PYTHONPATH=$PYTHONPATH:$FA4SITE:$FA4SITE/nvidia_cutlass_dsl/dsl_packages ;;
    setup) for d in .whl .whl-core; do [ -d $d ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $d/*.whl; done
           [ -d .whl-tt ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tt .whl-tt/*.whl ;;
    probe) nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
           python3 -c "import torch; print(torch.__version__, torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
           python3 -c "from dsmtp.model import kernels; import torch; print('flash-attn-4:', kernels.flash_unavailable(torch.device('cuda')) or 'usable')" ;;
    tests) timeout 450 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/gpu 2>&1 \
             | grep -E "^(PASSED|FAILED|ERROR|E )|[0-9]+ (passed|failed)" | head -80 ;;
    # before/after: main's path forced (SDPA, fp32 states), each change alone, both; the middle rows unprofiled
    tests25) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/gpu/test_gpu_train.py tests/gpu/test_gpu_flash.py tests/gpu/test_gpu_kernels.py \
             -k "${TESTS_K:-adamw or never_waits or prefill or grouped_swiglu}" 2>&1 | grep -E "^(PASSED|FAILED|ERROR|E )|[0-9]+ (passed|failed)" | head -40 ;;
    bench1) timeout 200 $B --label "base sdpa fp32" $SDPA $FP32 ;;
    flash) timeout 170 $B --label "flash fp32" $FLASH $FP32 --profile-steps 0 ;;
    bench2) timeout 200 $B --label "flash bf16-states" $FLASH $BF16 ;;
    quack) timeout 200 $B --label "flash bf16-states quack" $FLASH $BF16 $QUACK --profile-steps 0 ;;
    notriton) timeout 200 $B --label "flash bf16-states notriton" $FLASH $BF16 $NOTRITON ;;
    bf16p) timeout 200 $B --label "flash bf16-states bf16-params" $FLASH $BF16 $BF16P ;;
    bf16pg) timeout 200 $B --label "flash bf16-states bf16-params graph" $FLASH $BF16 $BF16P --cuda-graph ;;
    bf16pgr) timeout 200 $B --label "flash bf16-states bf16-params graph bf16-router" $FLASH $BF16 $BF16P --cuda-graph \
            --set model.router_dtype=autocast ;;
    old) (cd "${OLD:-.old}" && PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH timeout 200 $B \
            --label "${OLD_LABEL:-flash bf16-states bf16-params, earlier commit}" $FLASH $BF16 $BF16P --profile-steps 0) ;;
    noce) timeout 200 $B --label "flash bf16-states noce" $FLASH $BF16 --disable triton_cross_entropy ;;
    coordesc) TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 timeout 480 $B --label "flash bf16-states coordesc" \
                $FLASH $BF16 --profile-steps 0 ;;
    autotune) timeout 560 $B --label "flash bf16-states autotune" $FLASH $BF16 --set train.compile=true --set train.compile_mode=max-autotune-no-cudagraphs ;;
    graph) timeout 200 $B --label "flash bf16-states graph" $FLASH $BF16 --cuda-graph ;;
    best) TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 timeout 540 $B --label "flash bf16-states bf16-params graph coordesc" \
            $FLASH $BF16 $BF16P --cuda-graph --profile-steps 0 ;;
    ov) timeout 200 $B --label "flash bf16-states bf16-params overlap" $FLASH $BF16 $BF16P --set train.overlap_update=true ;;
    optim) timeout 150 python3 tools/bench_optimizer_update.py --config configs/small.yaml --results "$OUT/optimizer_update.jsonl" ;;
    moe) timeout 180 python3 tools/bench_moe_kernels.py --config configs/small.yaml --results "$OUT/moe_kernels.jsonl" ;;
    ceb) timeout 150 python3 tools/bench_cross_entropy.py --config configs/small.yaml --results "$OUT/cross_entropy.jsonl" ;;
    tt) [ -d .tt ] || { echo "tt: .tt is not on this machine: carry .tt and .whl-tt with every call that runs tt"; return; }
        [ -d /tmp/tt ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tt .whl-tt/*.whl
        (cd .tt && PYTHONPATH=/tmp/tt:$PYTHONPATH timeout 400 python3 bench_tt.py --variants compile,compile+mtp1 \
           --json-out "$OUT/torchtitan.json") ;;
    curves) mkdir -p "$OUT/runs"
            for dtype in ${CURVES:-fp32 bf16}; do for seed in 0 1; do
              timeout 170 python3 -m dsmtp.cli train --config configs/small.yaml --set train.steps=500 \
                --set train.seed=$seed --set train.optimizer_state_dtype=$dtype \
                --set train.save_interval=100000 --set train.eval_interval=250 \
                --set train.out_dir=/tmp/runs/$dtype-seed$seed 2>&1 | tail -3
              mkdir -p "$OUT/runs/$dtype-seed$seed"; cp /tmp/runs/$dtype-seed$seed/metrics.jsonl "$OUT/runs/$dtype-seed$seed/"
            done; done
            python3 tools/fp8_vs_bf16.py /tmp/runs/*-seed* ;;
    table) if [ -f "$R" ]; then python3 tools/bench_train.py --table "$R"
             if [ -f "$OUT/torchtitan.json" ]; then python3 tools/bench_train.py --table "$R" --peer "$OUT/torchtitan.json"; fi
           fi ;;
  esac
}
{
for s in ${SUITE:-setup probe tests bench1 flash bench2 tt table}; do echo "==== step $s $(date +%T)"; step "$s"; done
} 2>&1 | tee -a "$OUT/log.txt"
