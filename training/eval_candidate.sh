#!/usr/bin/env bash
# Export a training run's current EMA weights (float16, as they would ship) and run both checks on them:
# held-out generation (oracle accuracy) and generate-then-edit. Usage: eval_candidate.sh RUN NAME [N_GEN] [N_EDIT]
# Results: RUN/eval-NAME/{generation.json,editing.json,grid.png,edits.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$1; NAME=$2; NGEN=${3:-100}; NEDIT=${4:-20}
PY=${PY:-.venv/bin/python}
OUT="$RUN/eval-$NAME"
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
$PY training/export.py --run "$RUN" --dest "$OUT/model" 2>&1 | grep -v "should be kept in float32\|Writing model shards" || true
$PY training/eval_generation.py --model "$OUT/model" --n "$NGEN" --steps 20 --threads 1 --json "$OUT/generation.json" \
    --grid "$OUT/grid.png" 2>&1 | grep -v "Loading\|should be kept"
$PY training/eval_editing.py --model "$OUT/model" --n "$NEDIT" --steps 20 --threads 1 --json "$OUT/editing.json" \
    --grid "$OUT/edits.png" 2>&1 | grep -v "Loading\|should be kept"
