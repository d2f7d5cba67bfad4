#!/usr/bin/env bash
# The main job: set up, prepare the default corpus (this Python's standard library), pretrain the
# default small MoE + MTP model (configs/tiny.yaml) on CPU, and say where the results are.
# About 15 minutes on 2 CPU cores. CONFIG=path/to.yaml picks another config.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/tiny.yaml}
PY=${PYTHON:-python3}
started=$(date +%s)

bash launch/setup.sh
"$PY" -m dsmtp.cli prepare --config "$CONFIG"
"$PY" -m dsmtp.cli train --config "$CONFIG"

out_dir=$("$PY" -c 'import sys; from dsmtp.config import load_config; print(load_config(sys.argv[1]).train.out_dir)' "$CONFIG")
echo
echo "main job finished in $(( $(date +%s) - started )) s"
echo "  metrics:    $out_dir/metrics.jsonl (one JSON record per log interval and eval)"
echo "  plot:       $out_dir/metrics.png"
echo "  checkpoint: $out_dir/checkpoints/$(cat "$out_dir/checkpoints/latest")"
echo "  summary:    $out_dir/summary.json"
