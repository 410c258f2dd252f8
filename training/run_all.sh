#!/usr/bin/env bash
# How the shipped weights in src/dit4edit/models/shapes were made, step for step (2-core CPU shared with other
# jobs; every process uses 1 thread, which was 2-4x faster than 2 threads on the oversubscribed CPU).
# Every stage is resumable: rerun the same line after an interruption. Data and noise are drawn per step from
# the seed, so a resumed run replays exactly the batches an uninterrupted one would.
#
# The stages were re-planned mid-run (`--stop-at`, then a resume with other flags); the lines below replay exactly
# that: the decoder schedule was cut from 3000 to 1500 steps at step 1300 when the shared CPU slowed down; the
# transformer schedule from 4000 to 2000 steps at step 500 for the same reason, and at step 1300 (samples were
# still scattered fragments) it was resumed to 2800 steps with the object-weighted loss and half of the
# timesteps drawn from the noisier half of the schedule; at step 1700, as the CPU had freed up, the schedule was
# stretched to 3400 steps, and after it finished to 4800 (resumed from the step-3400 checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-training/runs/shapes}
# 1. VAE, encoder and decoder together (object-centred 64x64 crops, then the last 20% on whole 128x128 images).
$PY training/train_vae.py --out "$RUN" --steps 1600 --threads 1
# 2. In parallel: the decoder alone on whole images of all canvas sizes (encoder frozen, so the latent space is
#    fixed) and the tokenizer + T5 + PixArt transformer on latents of that frozen encoder.
( $PY training/train_vae.py --out "$RUN" --decoder-only --steps 3000 --stop-at 1300 --batch 32 --lr 1e-3 --warmup 50 --threads 1
  $PY training/train_vae.py --out "$RUN" --decoder-only --steps 1500 --batch 32 --lr 1e-3 --warmup 50 --threads 1
) > "$RUN/decoder.log" 2>&1 &
$PY training/train_dit.py --out "$RUN" --steps 4000 --stop-at 500 --width 160 --layers 6 --lr 8e-4 --threads 1
$PY training/train_dit.py --out "$RUN" --steps 2000 --stop-at 1300 --width 160 --layers 6 --lr 8e-4 --threads 1
$PY training/train_dit.py --out "$RUN" --steps 2800 --stop-at 1700 --width 160 --layers 6 --lr 8e-4 --threads 1 \
    --object-weight 3 --high-noise-share 0.5
$PY training/train_dit.py --out "$RUN" --steps 3400 --width 160 --layers 6 --lr 8e-4 --threads 1 \
    --object-weight 3 --high-noise-share 0.5
$PY training/train_dit.py --out "$RUN" --steps 4800 --width 160 --layers 6 --lr 8e-4 --threads 1 \
    --object-weight 3 --high-noise-share 0.5
wait
# 3. Assemble the pipeline (EMA weights, float16, phase-2 decoder) and benchmark it.
$PY training/export.py --run "$RUN" --dest src/dit4edit/models/shapes
$PY training/eval_generation.py --model src/dit4edit/models/shapes --json "$RUN/eval.json" --grid "$RUN/grid.png"
