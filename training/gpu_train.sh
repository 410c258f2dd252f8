#!/usr/bin/env bash
# Train the embedded model on a lent GPU in one device call, then check it there; everything it makes lands in $OUT
# (the device tool brings that folder back). The device has torch, transformers and accelerate but no diffusers
# and no network, so the wheels come along. Here, once:
#
#   pip download diffusers==0.42.1 importlib_metadata --no-deps -d wheels/   # pure-Python wheels; the rest is there
#   mkdir -p runs/init && cp -r src/dit4edit/models/shapes/. runs/init/   # or a CPU run's exported model to go on from
#
# Then one device command, carrying wheels and runs/init (both ignored by git):
#
#   BUDGET=420 training/gpu_train.sh --width 160 --layers 6 --batch 256 --lr 1e-3
#
# Extra arguments go to train_dit.py (they override the defaults below). The data is rendered on the machine
# (--workers), not carried. BUDGET is the seconds of training steps (default 420, leaving ~3 minutes of a 10-minute
# call for start-up, rendering, export and the checks). Two files come back (the device returns at most 8, of at most
# 16 MiB each): $OUT/model.tgz, the exported float16 EMA weights as a pipeline folder (go on training on a CPU from
# it with `train_dit.py --init-from`; the optimizer state stays behind, too big to return), and $OUT/report.tgz, the
# training log, the card's name and the checks (held-out generation, 48-pair editing benchmark at the model's settings).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
INIT=${INIT:-runs/init}
BUDGET=${BUDGET:-420}
CHECK_N=${CHECK_N:-200}  # held-out captions of the generation check
PAIRS=${PAIRS:-48}       # pairs of the editing check
SITE=${SITE:-/tmp/site}
if ! python -c "import diffusers" 2>/dev/null; then
    pip install -q --no-index --no-deps --target "$SITE" wheels/*.whl
fi
export PYTHONPATH="$SITE:src:research:training${PYTHONPATH:+:$PYTHONPATH}"
WORK=${WORK:-/tmp/gpu-train}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$WORK/card.txt" 2>/dev/null || echo "no GPU" > "$WORK/card.txt"
RUN="$WORK/run"
python training/train_dit.py --out "$RUN" --init-from "$INIT" --scenes 40000 --workers "$(nproc)" \
    --width 160 --layers 6 --batch 256 --lr 1e-3 --warmup 200 --object-weight 3 --high-noise-share 0.5 \
    --nonsquare-share 0.2 --min-snr 5 --ckpt-every 500 --no-progress --time-budget "$BUDGET" "$@" \
    2>&1 | tee "$WORK/train.log"
python training/export.py --run "$RUN" --dest "$WORK/model" 2>&1 | tee -a "$WORK/train.log"
cp src/dit4edit/models/shapes/dit4edit.json "$WORK/model/"
tar czf "$OUT/model.tgz" -C "$WORK" model
# The checks the weights are chosen by: held-out generation, and editing at the model's settings (its dit4edit.json,
# copied above: guidance and attention control; naive 2M inversion, as it ships).
python training/eval_generation.py --model "$WORK/model" --n "$CHECK_N" --steps 20 --json "$WORK/generation.json" \
    --grid "$WORK/grid.png" 2>&1 | tail -20 | tee "$WORK/checks.log"
python -m dit4edit_research.bench_synthetic --model "$WORK/model" -o "$WORK/bench48" --pairs "$PAIRS" \
    --inversion dpm --methods dit4edit,no-control,sdedit-0.6 --quiet 2>&1 | tee -a "$WORK/checks.log"
tar czf "$OUT/report.tgz" -C "$WORK" card.txt train.log checks.log generation.json grid.png bench48/summary.md \
    bench48/results.jsonl bench48/grid.png
