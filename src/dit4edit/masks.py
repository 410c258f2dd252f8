"""User masks: one meaning everywhere (255 = editable), at pixel and at latent resolution, and the paste that keeps
every pixel outside the mask."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageFilter

from . import images as imgs
from .errors import DiT4EditError


def load_mask(mask, size: tuple[int, int], max_pixels: int = imgs.MAX_PIXELS) -> Image.Image:
    """A user mask (a path or a PIL image) as an "L" image, 255 = editable (`images.mask_from_image`: where a mask
    has transparency its opaque, painted part is editable, otherwise its light part), checked to be `size` (the
    input's (width, height))."""
    if isinstance(mask, (str, os.PathLike)):
        mask = imgs.load_mask(mask, max_pixels)
    elif isinstance(mask, Image.Image):
        imgs.check_size(mask.size, max_pixels, "mask")
        mask = imgs.mask_from_image(mask)
    else:
        raise DiT4EditError(f"the mask must be an image or its file, got {type(mask).__name__}")
    if mask.size != tuple(size):
        raise DiT4EditError(f"mask is {mask.size[0]}x{mask.size[1]}, the image is {size[0]}x{size[1]}; they must "
                            "match")
    return mask


def pixel_mask(mask, size: tuple[int, int]) -> Image.Image:
    """A mask (an "L" image, 255 = editable, or an (h, w) latent tensor) as a 0/255 "L" image of `size`."""
    if isinstance(mask, torch.Tensor):  # (h, w) at latent resolution
        small = Image.fromarray(((mask > 0.5).cpu().numpy() * 255).astype(np.uint8), mode="L")
        return small.resize(size, Image.NEAREST)
    return mask.convert("L").point(lambda v: 255 if v > 127 else 0)


def latent_mask(mask, original_size: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """A mask (an "L" image of the input's size, or an (h, w) latent tensor) as an (h, w) 0/1 tensor at latent
    resolution: a latent position is editable where more than half its pixels are."""
    if isinstance(mask, torch.Tensor):
        if tuple(mask.shape) != tuple(latent_hw):
            raise DiT4EditError(f"mask tensor is {tuple(mask.shape)}, the latent is {tuple(latent_hw)}")
        return (mask > 0.5).float()
    if mask.size != tuple(original_size):
        raise DiT4EditError(f"mask is {mask.size[0]}x{mask.size[1]}, the image is "
                            f"{original_size[0]}x{original_size[1]}; they must match")
    small = mask.convert("L").resize((latent_hw[1], latent_hw[0]), Image.BOX)  # area average
    return (torch.from_numpy(np.asarray(small, dtype=np.float32)) / 255.0 > 0.5).float()


def paste_outside(edited: Image.Image, source: Image.Image, mask: Image.Image, radius: int = 8) -> Image.Image:
    """`edited` inside `mask` (L, 255 = editable), `source` outside it, pixel for pixel.

    The seam is feathered inside the mask only: the weight of `edited` is `mask * blur(mask)` (a Gaussian of
    `radius` px), 0 everywhere outside the mask, so outside it the result is exactly `source`."""
    hard = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0  # (H, W) in {0, 1}
    soft = np.asarray(mask.convert("L").filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
    weight = (hard * np.clip(2.0 * soft, 0.0, 1.0))[..., None]  # (H, W, 1): 1 deep inside, 0 outside
    a = np.asarray(edited.convert("RGB"), dtype=np.float32)
    b = np.asarray(source.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.rint(weight * a + (1.0 - weight) * b).astype(np.uint8))
