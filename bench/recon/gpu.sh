#!/usr/bin/env bash
# Issue 19's experiments in one GPU call: UniAD variants on synth/exp100 (quick preset plus one change each),
# per-class 1-NN on the same tokens, and probes of the trained models (bench/recon/README.md has the results).
#   bash bench/recon/gpu.sh [WORK_DIR]
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-recon-work}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$WORK"
"$PYTHON" -c "import os; from ltbench.datasets import synth; synth.is_generated() or \
  synth.generate(synth.default_home() / 'synth', workers=os.cpu_count())" || exit 1
"$PYTHON" bench/recon/feats.py exp100 "$WORK/feats.pt" > "$WORK/feats.txt" 2>&1 &
SPLITS=synth/exp100 JOBS=${JOBS:-8} RUN_LIMIT=${RUN_LIMIT:-300} MODELS="uniad uniad@epochs=40 uniad@grid=28 \
uniad@antialias=true uniad@feature_strides=[8,16] uniad@neighbor_size=0 uniad@jitter_scale=0 uniad@neighbor_size=3 \
uniad@epochs=40+antialias=true uniad@epochs=40+feature_strides=[8,16] uniad@grid=28+antialias=true \
uniad@epochs=40+hidden=256+heads=8+encoder_layers=4+decoder_layers=4+feedforward=1024" \
  bash bench/synth_matrix.sh "$WORK/m" > "$WORK/matrix.txt" 2>&1
wait
cat "$WORK/feats.txt"
"$PYTHON" bench/recon/knn.py "$WORK/feats.pt" > "$WORK/knn.txt" 2>&1; cat "$WORK/knn.txt"
"$PYTHON" bench/recon/probe.py "$WORK/feats.pt" $(dirname $(ls -d "$WORK"/m/runs/uniad/*/*/model "$WORK"/m/variants/*/uniad/*/*/model)) \
  > "$WORK/probe.txt" 2>&1
grep -E "rc=" "$WORK/matrix.txt"
