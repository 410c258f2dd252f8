"""Image input/output: every mode Pillow reads, EXIF, sizes, bad files, atomic writes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from dit4edit import images
from dit4edit.errors import DiT4EditError


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 10))
    path = tmp_path / "a.png"
    rgba.save(path)
    out = images.load_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert out.getpixel((15, 5)) == (255, 255, 255) and out.getpixel((5, 5)) == (0, 0, 255)


def test_greyscale_and_16_bit_are_scaled_to_8_bit_rgb(tmp_path):
    grey = tmp_path / "g.png"
    Image.new("L", (8, 8), 100).save(grey)
    assert images.load_image(grey).getpixel((0, 0)) == (100, 100, 100)
    sixteen = tmp_path / "s.png"
    Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)).save(sixteen)  # 16-bit 128/255
    assert Image.open(sixteen).mode.startswith("I")
    assert images.load_image(sixteen).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert images.load_image(path).size == (10, 30)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not a picture at all"), "not an image or corrupt"),
        (lambda p: p.mkdir(), "not a file"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, make, message):
    path = tmp_path / "in.png"
    make(path)
    with pytest.raises(DiT4EditError, match=message) as info:
        images.load_image(path)
    assert "\n" not in str(info.value)


def test_truncated_png_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DiT4EditError, match="corrupt"):
        images.load_image(path)


def test_pixel_limit_and_decompression_bomb(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(DiT4EditError, match="60000 pixels, over the limit of 50000"):
        images.load_image(path, max_pixels=50_000)
    assert images.load_image(path, max_pixels=60_000).size == (300, 200)
    # Pillow's own guard (MAX_IMAGE_PIXELS) must also surface as a clean error when our limit is higher.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 10_000
    try:
        with pytest.raises(DiT4EditError, match="decompression-bomb"):
            images.load_image(path, max_pixels=10**9)
    finally:
        Image.MAX_IMAGE_PIXELS = old


@pytest.mark.parametrize("size, expected", [((64, 128), (64, 128)), ((70, 50), (64, 48)), ((1, 1), (16, 16)),
                                             ((1024, 2048), (1024, 2048)), ((1000, 1000), (1008, 1008))])
def test_work_size_rounds_to_multiple_of_16(size, expected):
    assert images.work_size(size) == expected


def test_output_path_checks(tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (4, 4)).save(source)
    with pytest.raises(DiT4EditError, match="directory"):
        images.check_output_path(tmp_path, source)
    with pytest.raises(DiT4EditError, match="is the input"):
        images.check_output_path(tmp_path / "." / "in.png", source)
    with pytest.raises(DiT4EditError, match="extension"):
        images.check_output_path(tmp_path / "out.xyz", source)
    assert images.check_output_path(tmp_path / "out.png", source) == tmp_path / "out.png"


def test_save_is_atomic_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "o.png"
    images.save_image(Image.new("RGB", (4, 4), (9, 9, 9)), out)
    assert Image.open(out).getpixel((0, 0)) == (9, 9, 9)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        images.save_image(Image.new("RGB", (4, 4)), tmp_path / "sub" / "p.png")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["o.png"]


def test_tensor_round_trip_and_psnr():
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    assert np.array_equal(np.asarray(images.to_image(images.to_tensor(image)[0])), np.asarray(image))
    assert images.psnr(image, image) == float("inf")
    other = Image.fromarray(np.asarray(image) + 1)
    assert abs(images.psnr(image, other) - 10 * np.log10(255**2)) < 1e-9


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_mode_a_plain_write_would(tmp_path, umask):
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain.png"
        plain.write_bytes(b"")
        images.save_image(Image.new("RGB", (4, 4)), tmp_path / "atomic.png")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "atomic.png").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == (
        0o666 & ~umask)


def test_mask_not_found_names_the_mask(tmp_path):
    with pytest.raises(DiT4EditError, match="mask not found"):
        images.load_image(tmp_path / "nomask.png", what="mask")
