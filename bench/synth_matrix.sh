#!/usr/bin/env bash
# Every registered model that runs offline, quick preset, seed 0, on synth/exp100 and synth/step100
# (PatchCore with both bank modes), a few runs at a time, then the leaderboard and per-class tables.
# The figures the baselines issues ask for, in one command (on a GPU it fits one 10-minute device call).
#
#   bash bench/synth_matrix.sh [WORK_DIR]           # WORK_DIR default: ./synth-matrix
#   JOBS=2 DEVICE=cpu MODELS="patchcore" bash bench/synth_matrix.sh /tmp/m   # a subset on a CPU
#
# Each run's log is WORK_DIR/logs/<model>[-<variant>]-<split>.log; the runs are under WORK_DIR/runs, and those
# with settings (MODEL@KEY=VALUE[+KEY=VALUE...]) under WORK_DIR/variants/<settings>, so that each leaderboard has
# one run per model.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-synth-matrix}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-$( "$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" )}
JOBS=${JOBS:-4}
RUN_LIMIT=${RUN_LIMIT:-420}          # seconds per run before it is stopped (and reported as unfinished)
MODELS=${MODELS:-"ltad ltad_wo_sad uniad patchcore patchcore@bank=shared mkd draem cutpaste regad"}
SPLITS=${SPLITS:-"synth/exp100 synth/step100"}
mkdir -p "$WORK/logs" "$WORK/runs" "$WORK/variants"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ltbench() { "$PYTHON" -c "from ltbench.cli import main; main()" "$@"; }
export -f ltbench; export PYTHON WORK DEVICE RUN_LIMIT

echo "device: $DEVICE, $JOBS runs at a time, $RUN_LIMIT s per run at most"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# generate the synthetic dataset once, before the runs race for it
"$PYTHON" -c "import os; from ltbench.datasets import synth; synth.is_generated() or \
  synth.generate(synth.default_home() / 'synth', workers=os.cpu_count())" || exit 1

jobs_list() {
  for split in $SPLITS; do
    for entry in $MODELS; do
      model=${entry%%@*}; sets=""; tag=$model
      if [ "$entry" != "$model" ]; then   # MODEL@KEY=VALUE[+KEY=VALUE...]
        sets=$(tr '+' '\n' <<<"${entry#*@}" | sed 's/^/--set /' | tr '\n' ' ')
        tag="$model-${entry#*@}"; tag=${tag//=/_}; tag=${tag//[\[\],]/}
      fi
      out=runs; [ -n "$sets" ] && out="variants/${entry#*@}"
      echo "$model|$split|$sets|$tag-${split#*/}|$out"
    done
  done
}
one_run() {
  IFS='|' read -r model split sets tag out <<<"$1"
  start=$(date +%s)
  timeout "$RUN_LIMIT" bash -c 'ltbench "$@"' _ run --model "$model" --split "$split" \
    --device "$DEVICE" --out "$WORK/$out" --overlays 0 --no-report $sets >"$WORK/logs/$tag.log" 2>&1
  rc=$?
  printf '%-32s rc=%-3s %5d s\n' "$tag" "$rc" "$(( $(date +%s) - start ))"
}
export -f one_run
jobs_list | xargs -P "$JOBS" -I{} bash -c 'one_run "$@"' _ {}

echo; ltbench leaderboard "$WORK/runs" --dataset synth
echo; ltbench leaderboard "$WORK/runs" --dataset synth --per-class
for variant in "$WORK"/variants/*/; do
  [ -d "$variant" ] || continue
  echo; echo "## variant $(basename "$variant")"; ltbench leaderboard "$variant" --dataset synth --per-class
done
