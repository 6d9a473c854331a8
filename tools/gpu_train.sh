#!/usr/bin/env bash
# One GPU leg (docs/TRAINING.md): the same `xspecmesh train` as the CPU legs with --device cuda, sized for one large
# GPU (H200 class: big token batches, shapes drawn by data-loader processes on the host's cores), and ended, saved,
# after MINUTES of training. Resumable: run it again with the same DEST to continue from DEST/state.safetensors.
#   STAGE=backbone (default)  a leg of the hard-surface campaign ("Hard-surface parts", "GPU recipe"), from its
#                             latest resume point
#   STAGE=heads               the shipped drafter trained on over the shipped backbone (frozen), with a share of the
#                             backbone's own samples, decoded SAMPLE_POOL micro-batches at a time ("The drafter on a
#                             GPU"); also writes DEST/default.safetensors, exported as the shipped default (fp16)
#
#   tools/gpu_train.sh [DEST]    DEST: $OUT/gpu where $OUT is set (a folder that is copied back), else runs/gpu
#
# It writes DEST/model.safetensors (fp32, for eval_families.py and the later stages), DEST/state.safetensors (for
# --resume) and DEST/log.jsonl. Every setting below can be overridden from the environment; the tiny CPU checks are
#   DEVICE=cpu INIT=tiny.safetensors STEPS=2 TOKEN_BUDGET=600 WORKERS=1 VAL_COUNT=2 tools/gpu_train.sh /tmp/gpu
#   STAGE=heads TAPS=1 SELF_SAMPLES=1 (and the same) tools/gpu_train.sh /tmp/drafter
# The drafter leg as run (2026-11-30, one H200; before --sample-pool, i.e. SAMPLE_POOL=1):
#   STAGE=heads STEPS=800 WARMUP=30 MINUTES=6.5 tools/gpu_train.sh /tmp/drafter, then again with MINUTES=2.6
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${OUT:+$OUT/gpu}}
DEST=${DEST:-runs/gpu}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
STAGE=${STAGE:-backbone}
DEVICE=${DEVICE:-cuda}
TOKEN_BUDGET=${TOKEN_BUDGET:-32768}  # padded tokens per batch: ~150 part sequences
LR=${LR:-1e-3}
WORKERS=${WORKERS:-14}  # shape-drawing processes (16 cores: two left for the trainer)
VAL_COUNT=${VAL_COUNT:-64}
case "$STAGE" in
  backbone)
    INIT=${INIT:-campaign/parts_leg4.safetensors}  # the campaign's latest resume point (docs/TRAINING.md)
    STEPS=${STEPS:-2000}  # the cosine schedule's length (unmeasured on a GPU: see docs/TRAINING.md)
    WARMUP=${WARMUP:-100}
    MINUTES=${MINUTES:-8}  # within 9 minutes with start-up
    STAGE_ARGS=(--families "${FAMILIES:-hard_surface}" --axis-factors --save-every 250 --log-every 20) ;;
  heads)
    INIT=${INIT:-backend/xspecmesh/weights/default.safetensors}  # backbone and the drafter to continue
    STEPS=${STEPS:-1000}
    WARMUP=${WARMUP:-50}
    MINUTES=${MINUTES:-6.5}
    # TAPS: the backbone layers the drafter reads (the shipped drafter's); SELF_SAMPLES: share of batches that are
    # the backbone's own samples; SAMPLE_POOL: own-sample micro-batches decoded at once; TEACHER_T, CE_WEIGHT: the
    # teacher's temperature and the cross-entropy to the truth (the shipped drafter's last CPU leg: 0.125 and 0);
    # SAMPLE_FILE: own samples decoded ahead (`xspecmesh dataset samples`) instead of decoded in training; HEADS: the
    # drafts it unrolls (six, so that D reaches 6; the shipped drafter was trained for four)
    STAGE_ARGS=(--families hard_surface --num-heads "${HEADS:-6}" --head-type eagle --head-taps "${TAPS:-2,4}" --head-positions
                --self-samples "${SELF_SAMPLES:-0.15}" --sample-pool "${SAMPLE_POOL:-8}" --save-every 200
                --teacher-temperature "${TEACHER_T:-0.125}" --ce-weight "${CE_WEIGHT:-0}" --log-every 10) ;;
  *) echo "STAGE is backbone or heads, got $STAGE" >&2; exit 2 ;;
esac
if [ "$STAGE" = heads ] && [ -n "${SAMPLE_FILE:-}" ]; then
    STAGE_ARGS+=(--sample-file "$SAMPLE_FILE")
fi
mkdir -p "$DEST"
export PYTHONPATH=backend${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -m xspecmesh train "$STAGE" --device "$DEVICE" --init "$INIT" --resume --out "$DEST" "${STAGE_ARGS[@]}" \
    --axis-aligned --axis-turns 24 --max-faces 160 --token-budget "$TOKEN_BUDGET" --lr "$LR" --warmup "$WARMUP" \
    --steps "$STEPS" --max-minutes "$MINUTES" --workers "$WORKERS" --eval-every "$STEPS" --val-count "$VAL_COUNT" \
    --gen-count 0
if [ "$STAGE" = heads ]; then
    "$PYTHON" tools/export_default.py "$DEST/model.safetensors" "$DEST/default.safetensors"
fi
echo "checkpoint: $DEST/model.safetensors"
