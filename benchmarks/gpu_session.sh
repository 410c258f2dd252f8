#!/usr/bin/env bash
# One GPU session in one command (the device machine gives ~10 minutes per call): the full-size merging and
# whole-edit benchmarks, then a bigger transformer for the embedded model trained on the GPU under a time budget,
# exported and evaluated. Everything it reports lands in $OUT (at most 8 files).
#
# Needs: the diffusers and importlib_metadata wheels in .whl/, and training/runs/gpu/{vae,tokenizer} (the shipped
# model's frozen VAE encoder with its phase-2 decoder, and its tokenizer, so the new transformer fits the same
# latent space and vocabulary). SMOKE=1 runs every stage tiny on the CPU to check the script before a GPU call.
set -u
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if [ -d .whl ] && ! $PY -c "import diffusers" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
LIMIT=${LIMIT:-570}  # seconds this script may take in all

if [ "${SMOKE:-0}" = 1 ]; then
    BENCH="--device cpu --blocks 1" MERGE="--sizes 512 --repeats-small 1" EDIT="--size 256 --steps 2 --rounds 1"
    TRAIN="--scenes 300 --workers 2 --batch 8" EVAL="--n 8 --batch 4" RESERVE=60
else
    BENCH="--device cuda --dtype bfloat16 --blocks 28"
    MERGE="--repeats 10 --repeats-small 10 --repeats-large 10"
    EDIT="--steps 30 --rounds 2 --t5-layers 2"
    TRAIN="--scenes 40000 --workers 14 --batch 256" EVAL="--n 200 --batch 100" RESERVE=110
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
timeout 80 $PY benchmarks/bench_merging.py $BENCH $MERGE > "$OUT/merging.md" 2>&1
echo "merging benchmark: exit $? at ${SECONDS}s"
timeout 60 $PY benchmarks/bench_edit.py $BENCH $EDIT > "$OUT/edit.md" 2>&1
echo "edit benchmark 1024: exit $? at ${SECONDS}s"
timeout 45 $PY benchmarks/bench_edit.py $BENCH $EDIT --size 2048x1024 --rounds 1 >> "$OUT/edit.md" 2>&1
echo "edit benchmark 2048x1024: exit $? at ${SECONDS}s"
fi

# Training steps get what is left after rendering/encoding (~40 s), export and evaluation ($RESERVE s).
cd training
RUN=${RUN:-runs/gpu}
BUDGET=$(( LIMIT - SECONDS - RESERVE - 40 ))
echo "training budget ${BUDGET}s"
timeout $(( BUDGET + 60 )) $PY train_dit.py --out $RUN $TRAIN --time-budget $BUDGET --width 224 --layers 8 \
    --lr 1e-3 --warmup 200 --object-weight 3 --high-noise-share 0.4 --ckpt-every 500 --no-progress \
    > "$OUT/train.log" 2>&1
echo "training: exit $? at ${SECONDS}s"
cp $RUN/dit_loss.jsonl "$OUT/"
$PY export.py --run $RUN --dest $RUN/model >> "$OUT/train.log" 2>&1 && tar -C $RUN -cf "$OUT/model.tar" model
echo "export: exit $? at ${SECONDS}s"
timeout $(( LIMIT - SECONDS )) $PY eval_generation.py --model $RUN/model $EVAL --json "$OUT/eval.json" \
    --grid "$OUT/grid.png" > "$OUT/eval.txt" 2>&1
echo "evaluation: exit $? at ${SECONDS}s"
tail -25 "$OUT/eval.txt"
