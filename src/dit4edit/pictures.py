"""Pictures of attention: per-word heat maps over the image, masks, and labelled grids."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import images as imgs
from .errors import DiT4EditError

# A perceptually ordered dark-blue -> red -> yellow ramp (anchor colours, linearly interpolated).
_RAMP = np.array([[0, 0, 80], [40, 0, 160], [170, 0, 140], [240, 60, 40], [255, 200, 0], [255, 255, 200]], float)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 on the heat ramp."""
    position = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return ((1 - frac) * _RAMP[low] + frac * _RAMP[low + 1]).round().astype(np.uint8)


def heatmap(attention: torch.Tensor, image: Image.Image, alpha: float = 0.6) -> Image.Image:
    """Overlay an (h, w) attention map, max-normalised and upsampled to the image, on the image."""
    values = attention.detach().float().cpu()
    values = (values / values.max().clamp_min(1e-12)).numpy()
    up = Image.fromarray((values * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    colours = colorize(np.asarray(up, dtype=np.float64) / 255.0)
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray((alpha * colours + (1 - alpha) * base).round().astype(np.uint8))


def word_pictures(controller, branch: int, image: Image.Image, steps=None) -> list[tuple[str, Image.Image]]:
    """`(word, heat map over image)` for each word an `AttentionController` recorded in a branch (0 = source,
    k = target k), the maps averaged over `steps` (default: all)."""
    return [(word, heatmap(attention, image)) for word, attention in controller.word_maps(branch, steps).items()]


def mask_picture(mask: torch.Tensor, image: Image.Image) -> Image.Image:
    """The editable region (1) shown bright over a darkened image."""
    up = Image.fromarray((mask.float().cpu().numpy() * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    keep = np.asarray(up, dtype=np.float64)[..., None] / 255.0
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray((base * (0.25 + 0.75 * keep)).round().astype(np.uint8))


def grid(tiles: list[tuple[str, Image.Image]], columns: int = 6, label_height: int = 14) -> Image.Image:
    """Tiles side by side, each with its label above."""
    width, height = tiles[0][1].size
    if width < 128:  # small images: enlarge the tiles so labels fit
        width, height = 128, round(height * 128 / width)
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (min(columns, len(tiles)) * width, rows * (height + label_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (label, tile) in enumerate(tiles):
        x, y = (k % columns) * width, (k // columns) * (height + label_height)
        draw.text((x + 2, y + 1), label[: max(4, width // 6)], fill=(0, 0, 0))
        sheet.paste(tile.resize((width, height)), (x, y + label_height))
    return sheet


def slug(word: str) -> str:
    """A file-name-safe form of a word."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", word).strip("_") or "word"


#: Names of the files `write_attention` writes (and replaces on a rerun into the same folder).
_ATTENTION_FILE = re.compile(r"\A(?:(?:source|target)-\d{2}-[A-Za-z0-9_-]+|mask|edited|overview)\.png\Z")


def write_attention(out, result, base: Image.Image, with_target: bool, steps=None, num_steps: int = 1,
                    protect=()) -> int:
    """Write an edit's attention pictures into the folder `out`: each word's map (`source-NN-WORD.png`, and
    `target-NN-WORD.png` `with_target`), the local-blend `mask.png`, the `edited.png` image and an `overview.png`
    of them all; maps averaged over `steps` (default all). Pictures an earlier run left there under these names
    are removed first, so the folder shows this run only; a name that is one of the files in `protect` (the
    command's inputs) is refused before anything is written. Returns how many files were written."""
    out = Path(out)
    pictures: list[tuple[str, Image.Image, str]] = []  # (file name, picture, overview label)
    branches = [("source", 0)] + ([("target", 1)] if with_target else [])
    for name, branch in branches:
        under = base if branch == 0 else result.images[0]
        for k, (word, picture) in enumerate(word_pictures(result.controller, branch, under, steps)):
            pictures.append((f"{name}-{k:02d}-{slug(word)}.png", picture, f"{name[0]}:{word}"))
    mask = result.controller.blend_mask(num_steps - 1)
    if mask is not None:
        pictures.append(("mask.png", mask_picture(mask, base), "mask"))
    if with_target:
        pictures.append(("edited.png", result.images[0], "edited"))
    overview = grid([("input", base), *[(label, picture) for _, picture, label in pictures]])
    pictures.append(("overview.png", overview, ""))
    guarded = [Path(p).resolve() for p in protect if p is not None and Path(p).exists()]
    for name, _, _ in pictures:
        if (out / name).resolve() in guarded:
            raise DiT4EditError(f"{out / name} is one of this command's inputs: choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if _ATTENTION_FILE.match(stale.name) and stale.is_file() and stale.resolve() not in guarded:
            stale.unlink()
    for name, picture, _ in pictures:
        imgs.save_image(picture, out / name)
    return len(pictures)
