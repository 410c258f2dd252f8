"""Reading, sizing and writing images.

Size policy: an image is edited at its own size rounded to the nearest multiple of 16 px (VAE factor 8 x patch 2;
at least 16 px a side), with no resolution binning, so 512x512, 1024x1024 and 1024x2048 run natively. When the
size is already a multiple of 16 nothing is resampled; otherwise the image is resized (Lanczos) to the working
size and the result is resized back, so outputs always have the input's original size.
"""

from __future__ import annotations

import contextlib
import os
import stat
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
    `what` names the file in messages ("mask not found: ..."). The size is checked by `check_size` before the
    pixels are decoded."""
    return to_rgb(_open(path, max_pixels, what))


def load_mask(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, what: str = "mask") -> Image.Image:
    """A mask file as `mask_from_image` reads it (L, 255 = editable), with `load_image`'s checks and messages."""
    return mask_from_image(_open(path, max_pixels, what))


def _open(path: str | os.PathLike, max_pixels: int, what: str) -> Image.Image:
    """The decoded image in its own mode, EXIF orientation applied, size checked before decoding."""
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
                return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DiT4EditError(f"{what} {path} is too large (Pillow's decompression-bomb guard)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DiT4EditError(f"cannot read {what} {path}: not an image or corrupt ({_first_line(error)})") from None


def check_size(size: tuple[int, int], max_pixels: int = MAX_PIXELS, what: str = "image") -> None:
    """One-line error unless an image of `size` (width, height) fits `max_pixels` as it will be computed: at its
    work size (`work_size`: each side rounded to a multiple of 16, at least 16), and as decoded. A 4096x1 strip
    counts as 4096x16 = 65536 pixels, since that is what the model runs on. Every size limit (input images, masks,
    inversion files, generated sizes) goes through here."""
    width, height = size
    if width < 1 or height < 1:
        raise DiT4EditError(f"{what} has no pixels ({width}x{height})")
    work = work_size((width, height))
    pixels = max(width * height, work[0] * work[1])
    if pixels > max_pixels:
        at = "" if work == (width, height) else f", worked on at {work[0]}x{work[1]}"
        raise DiT4EditError(f"{what} is {width}x{height}{at}: {pixels} pixels, over the limit of {max_pixels}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied, from any mode Pillow makes: alpha composited on white (premultiplied `La`
    and `RGBa` un-premultiplied first), 16-bit, 32-bit and float greys scaled to 8 bits."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if image.mode == "F" and array.max(initial=0) <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode in _PREMULTIPLIED:
        image = image.convert(_PREMULTIPLIED[image.mode])
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


#: Pillow's premultiplied-alpha modes and the straight-alpha modes they convert to.
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}
#: The alpha band of each mode that has one.
_ALPHA_BANDS = {"RGBA": "A", "LA": "A", "PA": "A", "La": "a", "RGBa": "a"}


def mask_from_image(image: Image.Image, use_alpha: bool | None = None) -> Image.Image:
    """An edit mask from an image: mode L, 255 where the edit may change the picture, 0 where it keeps it.

    The rule, the same for mask files and the web page's brush:
      - an image with transparency (an alpha channel, or a palette transparency, with at least one pixel not fully
        opaque) is read by its alpha: opaque (painted) = editable, transparent = keep, the cut at alpha > 127;
      - any other image is read by its brightness: light = editable, dark = keep, the cut at luminance > 127
        (white = edit, black = keep).
    `use_alpha=True` reads the alpha even when every pixel is opaque (a brush layer painted all over: all
    editable; an image without alpha then counts as painted everywhere); `False` always reads the brightness.
    EXIF orientation is applied first, as for the image itself."""
    image = ImageOps.exif_transpose(image)
    alpha = _alpha(image)
    if use_alpha is None:
        use_alpha = alpha is not None and int(np.asarray(alpha).min(initial=255)) < 255
    if use_alpha:
        editable = np.asarray(alpha) > 127 if alpha is not None else np.ones(image.size[::-1], dtype=bool)
    else:
        editable = np.asarray(to_rgb(image).convert("L")) > 127  # (H, W)
    return Image.fromarray(np.where(editable, 255, 0).astype(np.uint8), mode="L")


def _alpha(image: Image.Image) -> Image.Image | None:
    """The alpha channel (mode L) of an image that has one, else None."""
    if image.mode in _ALPHA_BANDS:
        return image.getchannel(_ALPHA_BANDS[image.mode])
    if image.mode in ("P", "L", "RGB", "1") and "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


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
    not one of the inputs (`check_not_input`)."""
    output = Path(output)
    if output.is_dir():
        raise DiT4EditError(f"output path is a directory: {output}")
    check_output_format(output)
    check_not_input(output, *inputs, what="output path", input_what="input image")
    return output


def check_output_format(output: str | os.PathLike) -> str:
    """The Pillow format of an output path's extension, or a one-line error listing the supported ones."""
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise DiT4EditError(
            f"output {output} has no supported image extension (use one of {', '.join(sorted(OUTPUT_FORMATS))})"
        )
    return OUTPUT_FORMATS[output.suffix.lower()]


def check_not_input(output: str | os.PathLike, *inputs: str | os.PathLike | None, what: str = "output",
                    input_what: str = "input") -> Path:
    """One-line error when writing `output` would overwrite one of a command's `inputs` (files or folders; None
    skipped): the same file under another spelling, through a symbolic link or a hard link, or the same path.
    Call it for every file a command writes (images, masks, inversion files, results, summaries) with every file
    and folder it reads, before any work is done."""
    output = Path(output)
    for source in inputs:
        if source is None:
            continue
        source = Path(source)
        if _same_file(output, source) or _resolved(output) == _resolved(source):
            raise DiT4EditError(f"{what} {output} is the {input_what} {source}; choose another name")
    return output


def save_image(image: Image.Image, output: str | os.PathLike, what: str = "output image") -> Path:
    """Write atomically (see `atomic_path`), in the format the extension names."""
    output = Path(output)
    fmt = check_output_format(output)
    with atomic_path(output, what) as tmp:
        image.save(tmp, format=fmt)
    return output


#: Temporary files `atomic_path` writes are named `TEMP_PREFIX` + 8 random characters + `TEMP_SUFFIX`, whatever
#: the output's name, so any name a file system accepts can be an output.
TEMP_PREFIX = ".dit4edit-"
TEMP_SUFFIX = ".tmp"


def is_temp_file(path: str | os.PathLike) -> bool:
    """Whether `path` is named like a temporary file of `atomic_path` (left behind only by a killed process)."""
    name = Path(path).name
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX) and len(name) == len(TEMP_PREFIX) + 8 + len(
        TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_path(output: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path in `output`'s folder to write to; on success it replaces `output`, so `output` is
    either the old file or the complete new one.

    Replacing keeps what a plain write keeps: the new file gets the old one's permission bits (a private 0600 file
    stays private) and, where allowed, its owner; a new file gets the mode `open(output, "w")` would give under the
    current umask. It refuses, before anything is written, where a plain write would be refused: an existing output
    that is not a regular file, that this user may not write, or that nobody may write (no write bit: refused even
    for root), and a folder this user cannot write in. Any `OSError` (a full disk, a quota, an I/O error) becomes a
    one-line `DiT4EditError` naming `what` and the file; on any failure or interrupt the temporary file and the
    folders this call created are removed."""
    output = Path(output)
    old = _replaceable(output, what)
    created = _make_folders(output.parent, what)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=output.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, stat.S_IMODE(old.st_mode) & 0o777 if old is not None else 0o666 & ~_umask())
        if old is not None and (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
            with contextlib.suppress(OSError):  # only root may give a file away; others keep theirs
                os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, output)
    except BaseException as error:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(error, OSError):
            raise DiT4EditError(f"cannot write the {what} {output}: {_first_line(error)}") from None
        raise


def _replaceable(output: Path, what: str) -> os.stat_result | None:
    """The status of the file `output` would replace (None when there is none), or a one-line error where a plain
    write would be refused."""
    try:
        old = output.stat()  # through a symbolic link: the file a plain write would change
    except FileNotFoundError:
        if output.is_symlink():
            raise DiT4EditError(f"the {what} {output} is a broken symbolic link") from None
        return None
    except OSError as error:
        raise DiT4EditError(f"cannot write the {what} {output}: {_first_line(error)}") from None
    if not stat.S_ISREG(old.st_mode):
        raise DiT4EditError(f"the {what} {output} exists and is not a regular file")
    if not os.access(output, os.W_OK) or not old.st_mode & 0o222:
        raise DiT4EditError(f"the {what} {output} is read-only; it is not replaced")
    folder = output.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DiT4EditError(f"cannot write the {what} {output}: its folder is not writable")
    return old


def _make_folders(folder: Path, what: str) -> list[Path]:
    """Create `folder` and its missing parents; return those created, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    created = []
    try:
        for path in missing:
            path.mkdir()
            created.append(path)
    except OSError as error:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise DiT4EditError(f"cannot create the folder of the {what} {path}: {_first_line(error)}") from None
    if not os.access(folder if not created else created[-1], os.W_OK | os.X_OK):
        raise DiT4EditError(f"cannot write the {what} in {created[-1] if created else folder}: not writable")
    return created


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

