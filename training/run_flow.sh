#!/usr/bin/env bash
# How the flow model (src/dit4edit/models/shapes-flow, a StableDiffusion3Pipeline folder) is trained and checked, as
# run on 2026-12-08 on the shared 2-core CPU (each process one thread). Every training line is resumable: rerun it
# after an interruption and it continues from RUN/flow.ckpt (data and noise are drawn per step from the seed, so a
# resumed run replays the batches an uninterrupted one would). Checkpoints and latent caches live in RUNS, not in git.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-/root/runs}
export PYTHONPATH=training:src:research OMP_NUM_THREADS=1
# SD3Transformer2DModel 7 joint blocks x 128 wide (4 heads x 32, RMS q/k norm), patch 2 (8x8 tokens at 128 px),
# two CLIPTextModelWithProjection 3 x 64 (pooled 2 x 64), the embedded PixArt model's VAE, T5 and T5 tokenizer;
# rectified flow, logit-normal(0, 1) timesteps, object-weighted loss (x4 near objects), 10% caption dropout, EMA 0.998.
MODEL="--scenes 8000 --width 128 --layers 7 --head-dim 32 --batch 64 --lr 5e-4 --warmup 100 --steps 12000 \
  --ckpt-every 100 --keep-every 500 --threads 1 --no-progress --fp16"

# The long run (started 01:37 UTC; the first start at 01:25 only encoded the latent cache, 8,000 scenes, 633 s, and
# was restarted from scratch with the deterministic CLIP tokenizer). Resume: rerun this line.
$PY training/train_flow.py --out "$RUNS/flow-main" $MODEL

# The pilot beside it, on the other core: the same with T5 frozen (the embedded model's T5 as it is), stopped at
# step 300 and compared with the long run at the same step (same batches and noise: losses are paired).
ln -sf "$RUNS/flow-main/latents_8000.pt" "$RUNS/flow-main/covers_8000.pt" "$RUNS/flow-frozen/" 2>/dev/null || true
$PY training/train_flow.py --out "$RUNS/flow-frozen" $MODEL --freeze-t5 --stop-at 300

# Checks: export a checkpoint's EMA weights (float16) as a StableDiffusion3Pipeline folder, then generation on held-out
# captions through StableDiffusion3Pipeline (FlowMatchEuler) read by the oracle. The settings sweep uses held-out
# captions 100-159, the reported numbers captions 0-99.
check() {  # check RUN NAME [SNAPSHOT]
  local E="$1/eval-$2"
  $PY training/train_flow.py --out "$1" --export-only "$E/model" --fp16 ${3:+--snapshot "$3"}
  $PY training/eval_flow_generation.py --model "$E/model" --n 100 --steps 20 --guidance 3 \
    --json "$E/generation.json" --grid "$E/grid.png"
}
