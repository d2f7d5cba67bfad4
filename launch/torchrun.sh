#!/usr/bin/env bash
# Train on one machine under torchrun: one process per GPU (NCCL), or N CPU processes (gloo).
#
#   launch/torchrun.sh [--nproc-per-node N] [--max-restarts R] --config configs/tiny.yaml [--set key=value ...]
#
# N defaults to the number of visible GPUs (1 on a CPU machine). The layout comes from the config
# (parallel.tp / pp / ep; DP = N / (tp * pp)). With --max-restarts R, a failed worker restarts the
# whole group up to R times and training resumes from train.out_dir's latest checkpoint.
# Everything after the torchrun options goes to `dsmtp train`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
NPROC=""
RESTARTS=0
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc-per-node) NPROC="$2"; shift 2 ;;
        --nproc-per-node=*) NPROC="${1#*=}"; shift ;;
        --max-restarts) RESTARTS="$2"; shift 2 ;;
        --max-restarts=*) RESTARTS="${1#*=}"; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
PY=${PYTHON:-python3}
if [[ -z "$NPROC" ]]; then
    NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" --max-restarts "$RESTARTS" \
    -m dsmtp.cli train "${ARGS[@]}"
