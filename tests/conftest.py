"""Shared fixtures: tiny random-weight PixArt pipelines built from configs (no hub, CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

SOURCE = "a red circle on a white background"
TARGET = "a blue circle on a white background"


def fresh_pipe(**components):
    """A new tiny random-weight pipeline (seed 0), progress bars off; `components` replace the tiny ones."""
    from dit4edit.pipeline import DiT4EditPipeline
    from dit4edit.tiny import tiny_components

    pipe = DiT4EditPipeline(**{**tiny_components(seed=0), **components})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return fresh_pipe()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pipe, tmp_path_factory):
    """The tiny pipeline saved in diffusers layout, as a user's model folder would be."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_pipe.save_pretrained(folder)
    return folder


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: float32 results differ across CPUs, thread counts and batch sizes by ~1e-7 of the norm,
    a real bug by far more, so tests compare with this instead of exact or absolute equality."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random colours (a random VAE keeps low frequencies best)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(max(1, height // 16), max(1, width // 16), 3)).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "input.png"
    random_image(64, 64).save(path)
    return path


def kill_9_after_first_record(command: list[str], shard) -> None:
    """Run a batch-like command in its own process group and `kill -9` the whole group as soon as its results
    shard holds one row (or when it ends or two minutes pass)."""
    import os
    import signal
    import subprocess
    import time

    from dit4edit.batch import read_rows

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (shard.exists() and read_rows(shard)) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
