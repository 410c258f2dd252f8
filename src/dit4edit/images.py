"""Reading, sizing and writing images.

Size policy: an image is edited at its own size rounded to the nearest multiple of 16 px (VAE factor 8 x patch 2;
at least 16 px a side), with no resolution binning, so 512x512, 1024x1024 and 1024x2048 run natively. When the
size is already a multiple of 16 nothing is resampled; otherwise the image is resized (Lanczos) to the working
size and the result is resized back, so outputs always have the input's original size.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DiT4EditError

if TYPE_CHECKING:
    import torch

#: Multiple of the working size: VAE downsampling (8) x transformer patch (2).
SIZE_MULTIPLE = 16
#: Default cap on the pixels of an input image (2048 x 2048); `max_pixels` arguments override it.
MAX_PIXELS = 2048 * 2048
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                  ".tiff": "TIFF"}


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, what: str = "input image") -> Image.Image:
    """Open any image Pillow reads as RGB, EXIF orientation applied; one-line `DiT4EditError` on any problem.
    `what` names the file in messages ("mask not found: ...")."""
    path = Path(path)
    if not path.exists():
        raise DiT4EditError(f"{what} not found: {path}")
    if not path.is_file():
        raise DiT4EditError(f"{what} is not a file: {path}")
    if path.stat().st_size == 0:
        raise DiT4EditError(f"{what} is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_size(image.size, max_pixels, what=f"{what} {path}")
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DiT4EditError(f"{what} {path} is too large (Pillow's decompression-bomb guard)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DiT4EditError(f"cannot read image {path}: not an image or corrupt ({_first_line(error)})") from None


def check_size(size: tuple[int, int], max_pixels: int = MAX_PIXELS, what: str = "image") -> None:
    width, height = size
    if width < 1 or height < 1:
        raise DiT4EditError(f"{what} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise DiT4EditError(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (raise it with --max-pixels)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied: alpha composited on white, 16-bit and float greys scaled to 8 bits."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def work_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) rounded to the nearest multiple of 16 px (halves up), at least 16."""
    return tuple(max(SIZE_MULTIPLE, int(side / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE) for side in size)  # ties up


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == tuple(size) else image.resize(size, Image.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)  # (H, W, 3) -> (1, 3, H, W)


def to_image(tensor: torch.Tensor) -> Image.Image:
    """One (3, H, W) tensor in [-1, 1] to an RGB image."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())  # (3, H, W) -> (H, W, 3)


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB between two same-size RGB images (8-bit peak)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Validate an output image path before any work is done: a supported extension, not a directory,
    not one of the inputs."""
    output = Path(output)
    if output.is_dir():
        raise DiT4EditError(f"output path is a directory: {output}")
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise DiT4EditError(
            f"output {output} has no supported image extension (use one of {', '.join(sorted(OUTPUT_FORMATS))})"
        )
    for source in inputs:
        if source is not None and _same_file(output, Path(source)):
            raise DiT4EditError(f"output path {output} is the input image; choose another name")
    return output


def save_image(image: Image.Image, output: str | os.PathLike) -> Path:
    """Write atomically (see `atomic_path`), in the format the extension names."""
    output = Path(output)
    fmt = OUTPUT_FORMATS[output.suffix.lower()]
    with atomic_path(output) as tmp:
        image.save(tmp, format=fmt)
    return output


@contextlib.contextmanager
def atomic_path(output: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `output`'s folder to write to; on success it replaces `output` (with the mode a
    plain `open(output, "w")` would give under the current umask), on any failure or interrupt it is removed, so
    `output` is either the old file or the complete new one."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def temporary_of(name: str) -> str | None:
    """The output name whose temporary file (as `atomic_path` names it) `name` is, else None."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    stem, dot, _random = name[1:-4].rpartition(".")
    return stem if dot and stem else None
