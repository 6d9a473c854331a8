#!/usr/bin/env bash
# One GPU leg of drafter training (docs/TRAINING.md, "The drafter on a GPU"): `xspecmesh train heads` continuing the
# shipped drafter on the shipped backbone (frozen), with --device cuda, big token batches, shapes drawn by data-loader
# processes on the host's cores, a share of micro-batches replaced by the backbone's own samples (affordable on a GPU,
# 20x a step on the CPU), ended and saved after MINUTES of training.
#
#   tools/gpu_drafter.sh [DEST]    (DEST: default runs/drafter)
#
# It writes DEST/model.safetensors (fp32 backbone + drafter, for --resume's DEST/state.safetensors), DEST/log.jsonl
# and DEST/default.safetensors (the same exported as the shipped default: fp16, provenance). Every setting below can
# be overridden from the environment; the tiny CPU check is
#   DEVICE=cpu STEPS=2 TOKEN_BUDGET=600 WORKERS=1 VAL_COUNT=2 SELF_SAMPLES=1 tools/gpu_drafter.sh /tmp/drafter
# As run (2026-11-30, one H200, docs/TRAINING.md): STEPS=800 WARMUP=30 MINUTES=6.5, then again with MINUTES=2.6,
# both before --sample-pool existed (i.e. SAMPLE_POOL=1).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-runs/drafter}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEVICE=${DEVICE:-cuda}
INIT=${INIT:-backend/xspecmesh/weights/default.safetensors}  # backbone and the drafter to continue
TAPS=${TAPS:-2,4}  # backbone layers the drafter reads (the shipped drafter's)
STEPS=${STEPS:-1000}  # the cosine schedule's length
TOKEN_BUDGET=${TOKEN_BUDGET:-32768}  # padded tokens per batch: ~150 part sequences
LR=${LR:-1e-3}
WARMUP=${WARMUP:-50}
SELF_SAMPLES=${SELF_SAMPLES:-0.15}  # share of batches that are the backbone's own samples
SAMPLE_POOL=${SAMPLE_POOL:-8}  # own-sample micro-batches decoded at once (the first leg decoded one at a time: 1)
WORKERS=${WORKERS:-14}  # shape-drawing processes (16 cores: two left for the trainer)
MINUTES=${MINUTES:-6.5}
VAL_COUNT=${VAL_COUNT:-64}
mkdir -p "$DEST"
export PYTHONPATH=backend${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -m xspecmesh train heads --device "$DEVICE" --init "$INIT" --resume --out "$DEST" \
    --num-heads 4 --head-type eagle --head-taps "$TAPS" --head-positions \
    --families hard_surface --axis-aligned --axis-turns 24 --max-faces 160 --token-budget "$TOKEN_BUDGET" \
    --lr "$LR" --warmup "$WARMUP" --steps "$STEPS" --self-samples "$SELF_SAMPLES" \
    --sample-pool "$SAMPLE_POOL" --max-minutes "$MINUTES" \
    --workers "$WORKERS" --save-every 200 --eval-every "$STEPS" --val-count "$VAL_COUNT" --gen-count 0 \
    --log-every 10
"$PYTHON" tools/export_default.py "$DEST/model.safetensors" "$DEST/default.safetensors"
echo "drafter: $DEST/default.safetensors"
