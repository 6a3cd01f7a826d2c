#!/usr/bin/env bash
# One command on one GPU (an H100, under 8 minutes): MEMoE at the shapes users edit, beside FT-M and UltraEdit.
#   bash benchmarks/gpu/run.sh [OUT_DIR]
#   SHAPE=tiny bash benchmarks/gpu/run.sh runs/gpu-smoke      # the same script on a CPU, in a minute: a smoke test
# 1. Llama-3-8B shape (random weights, SmolLM2's tokenizer; benchmarks/perf/model_shape.py): one call of 30 and of
#    1,000 synthetic edits, with FT-M on the same edits when EasyEdit is importable;
# 2. 1,000 synthetic edits in calls of 10, no rollback (the sequential settings), with FT-M and UltraEdit beside it.
# Each line printed is JSON: time, peak GPU memory above the model, bytes kept, inference overhead. The baselines
# need EASYEDIT_PATH (an EasyEdit checkout whose requirements are installed); without it they are left out.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-runs/gpu}}
mkdir -p "$OUT"
PY=${PYTHON:-python}
SHAPE=${SHAPE:-llama3-8b}
DTYPE=${DTYPE:-bfloat16}
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
else
  echo "no nvidia-smi: running on the CPU" | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
BASE=""
if [ -n "${EASYEDIT_PATH:-}" ] && [ -d "$EASYEDIT_PATH/easyeditor" ]; then BASE="--baseline FT-M"; fi
timeout 240 $PY benchmarks/perf/model_shape.py --shape $SHAPE --dtype $DTYPE --batches 30,1000 $BASE \
  | tee "$OUT/shape.jsonl"
SEQ=""
if [ -n "$BASE" ]; then SEQ="--baseline FT-M,UltraEdit"; fi
timeout 220 $PY benchmarks/perf/model_shape.py --shape $SHAPE --dtype $DTYPE --sequential 1000 --chunk 10 $SEQ \
  | tee "$OUT/sequential.jsonl"
