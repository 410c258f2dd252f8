"""Shared helpers for the training scripts: device choice, seeding, scene batches, checkpoints, loss logs."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from dit4edit_research.synthetic import CANVAS_SIZES, generate_scene
from dit4edit.tiny import PIXART_SCHEDULER_CONFIG

log = logging.getLogger("dit4edit.training")

#: Training scenes use seeds below this; held-out evaluation uses seeds from HELD_OUT_SEED on.
TRAIN_SEED_LIMIT = 10**6
HELD_OUT_SEED = 10**9


def setup(threads: int | None = 2) -> torch.device:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = True  # on a GPU: TF32 matmuls and convolutions
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def pool_scene(seed: int, k: int, sizes=CANVAS_SIZES, square_share: float = 0.8):
    """The k-th scene of a pool: `square_share` of them 128x128, the rest split over the other buckets."""
    bucket = 0 if (k % 10) < round(10 * square_share) else 1 + (k % 2)
    width, height = sizes[bucket]
    return generate_scene(seed, width, height)


def scene_pool(start: int, count: int, sizes=CANVAS_SIZES, square_share: float = 0.8):
    """Scenes with seeds start.. (see `pool_scene`)."""
    return [pool_scene(start + k, k, sizes, square_share) for k in range(count)]


class LossLog:
    """Append-only JSONL loss log."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row) -> None:
        row["time"] = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def save_checkpoint(path: Path, **state) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path):
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, what: str = "training") -> int:
    """Load the checkpoint at `path` (if there is one) into `model` and `opt`; returns the step to continue from."""
    state = load_checkpoint(path)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    log.info("resumed %s from step %d", what, state["step"])
    return state["step"]


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warmup then cosine decay to `floor * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(progress, 1.0))))


def alphas_cumprod() -> torch.Tensor:
    """(1000,) cumulative alpha products of PixArt's training schedule (linear betas 1e-4..0.02), as trained on."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    return DDPMScheduler(**{k: PIXART_SCHEDULER_CONFIG[k] for k in keys}).alphas_cumprod


class TimeBudget:
    """A run bounded by `args.time_budget` seconds (a run started from step 0 only): steps `start + 10` to
    `start + 40` are timed, then `args.steps` (the schedule's length, saved with the checkpoints) and the progress
    bar's total are fixed to what the budget allows. `stop_at(step, stop)` is called before every step."""

    def __init__(self, args, start: int, bar):
        self.args, self.bar = args, bar
        self.window = (start + 10, start + 40) if args.time_budget and start == 0 else None
        self.began, self.timed = time.time(), None

    def stop_at(self, step: int, stop: int) -> int:
        if self.window and step == self.window[0]:
            self.timed = time.time()
        elif self.window and step == self.window[1]:
            per_step = (time.time() - self.timed) / (self.window[1] - self.window[0])
            left = self.args.time_budget - (time.time() - self.began)
            self.args.steps = stop = max(step + 1, step + int(left / per_step))
            self.bar.total = stop
            log.info("time budget %.0fs at %.1f ms/step: --steps %d", self.args.time_budget, 1e3 * per_step, stop)
            self.window = None
        return stop


def draw_bucket(args, step: int, square, others) -> tuple[np.random.Generator, object, int]:
    """This step's random generator, canvas bucket and batch size: the step's own seed (so a resumed run replays
    the batches an uninterrupted one would), a non-square bucket at half the batch `args.nonsquare_share` of the
    time."""
    rng = np.random.default_rng([args.seed, step])
    if others and rng.random() < args.nonsquare_share:
        return rng, others[int(rng.integers(len(others)))], args.batch // 2
    return rng, square, args.batch

