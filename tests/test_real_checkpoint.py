"""Real PixArt-alpha checkpoints go through exactly the code the tiny models test. Skipped unless a folder or hub
id is given: DIT4EDIT_PIXART_512=/path/to/PixArt-XL-2-512x512, DIT4EDIT_PIXART_1024=/path/to/PixArt-XL-2-1024-MS."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import random_image

from dit4edit.pipeline import DiT4EditPipeline

pytestmark = pytest.mark.real_checkpoint

CHECKPOINTS = {"512": os.environ.get("DIT4EDIT_PIXART_512"), "1024": os.environ.get("DIT4EDIT_PIXART_1024")}


@pytest.fixture(params=sorted(CHECKPOINTS), scope="module")
def real_pipe(request):
    model = CHECKPOINTS[request.param]
    if not model:
        pytest.skip(f"set DIT4EDIT_PIXART_{request.param} to a PixArt-alpha folder or hub id")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = DiT4EditPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_real_checkpoint_reconstructs_close_to_the_vae(real_pipe):
    side = real_pipe.default_size()
    _, stats = real_pipe.reconstruct(random_image(side, side), "a colourful abstract painting",
                                     num_inference_steps=20, method="dpm-exact", tol=1e-4)
    assert stats["psnr"] > stats["vae_psnr"] - 2.0, stats


def test_real_checkpoint_edits_non_square_natively(real_pipe):
    side = real_pipe.default_size()
    result = real_pipe(random_image(side, side // 2), "a colourful abstract painting", "a grey abstract painting",
                       num_inference_steps=10, inversion_method="ddim")
    assert result.images[0].size == (side, side // 2)
