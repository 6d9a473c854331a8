#!/usr/bin/env bash
# One GPU leg of the hard-surface campaign (docs/TRAINING.md, "Hard-surface parts"): the same `xspecmesh train
# backbone` as the CPU legs with --device cuda, sized for one large GPU (H200 class: big token batches, shapes drawn
# by data-loader processes on the host's cores), and ended, saved, after MINUTES of training (8: within 9 minutes
# with start-up). Resumable: run it again with the same DEST to continue from DEST/state.safetensors.
#
#   tools/gpu_train.sh [DEST]    DEST: $OUT/gpu where $OUT is set (a folder that is copied back), else runs/gpu
#
# It writes DEST/model.safetensors (fp32, for eval_families.py and the later stages), DEST/state.safetensors (for
# --resume) and DEST/log.jsonl. Every setting below can be overridden from the environment; the tiny CPU check is
#   DEVICE=cpu INIT=tiny.safetensors STEPS=2 TOKEN_BUDGET=600 WORKERS=1 VAL_COUNT=2 tools/gpu_train.sh /tmp/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${OUT:+$OUT/gpu}}
DEST=${DEST:-runs/gpu}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEVICE=${DEVICE:-cuda}
INIT=${INIT:-campaign/parts_leg4.safetensors}  # the campaign's latest resume point (docs/TRAINING.md)
FAMILIES=${FAMILIES:-hard_surface}
STEPS=${STEPS:-2000}  # the cosine schedule's length (unmeasured on a GPU: see docs/TRAINING.md)
TOKEN_BUDGET=${TOKEN_BUDGET:-32768}  # padded tokens per batch: ~150 part sequences
LR=${LR:-1e-3}
WARMUP=${WARMUP:-100}
WORKERS=${WORKERS:-14}  # shape-drawing processes (16 cores: two left for the trainer)
MINUTES=${MINUTES:-8}
VAL_COUNT=${VAL_COUNT:-64}
mkdir -p "$DEST"
PYTHONPATH=backend${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -m xspecmesh train backbone --device "$DEVICE" \
    --init "$INIT" --resume --out "$DEST" --families "$FAMILIES" --axis-factors --axis-aligned --axis-turns 24 \
    --max-faces 160 --token-budget "$TOKEN_BUDGET" --lr "$LR" --warmup "$WARMUP" --steps "$STEPS" \
    --max-minutes "$MINUTES" --workers "$WORKERS" --save-every 250 --eval-every "$STEPS" --val-count "$VAL_COUNT" \
    --gen-count 0 --log-every 20
echo "checkpoint: $DEST/model.safetensors"
