"""Image input/output: every mode Pillow reads, EXIF, sizes, bad files, atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
    Image.new("RGB", (320, 192)).save(path)
    with pytest.raises(DiT4EditError, match="61440 pixels, over the limit of 50000"):
        images.load_image(path, max_pixels=50_000)
    assert images.load_image(path, max_pixels=61_440).size == (320, 192)
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
    with pytest.raises(DiT4EditError, match="cannot write"):
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


# --- sizes are limited as computed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(3, 40_000), (40_000, 7), (20_001, 1)])
def test_thin_image_is_limited_by_its_work_size(tmp_path, size):
    """A strip a few pixels thick is worked on at 16 px thick: the limit counts those pixels, not the file's."""
    path = tmp_path / "strip.png"
    Image.new("L", size, 255).save(path)
    original = size[0] * size[1]
    work = images.work_size(size)
    assert work[0] * work[1] > 2 * original  # the case: the work is much bigger than the file
    limit = work[0] * work[1] - 1
    assert original <= limit
    with pytest.raises(DiT4EditError, match=f"worked on at {work[0]}x{work[1]}.*over the limit of {limit}") as info:
        images.load_image(path, max_pixels=limit)
    assert "\n" not in str(info.value)
    with pytest.raises(DiT4EditError, match="over the limit"):
        images.check_size(size, limit)  # generated sizes and inversion files go through the same check
    assert images.load_image(path, max_pixels=work[0] * work[1]).size == size


def test_size_a_little_over_a_multiple_is_limited_by_the_rounded_up_size():
    size = (2056, 2040)  # 4,194,240 pixels as given, 2064x2048 = 4,227,072 as worked on
    assert size[0] * size[1] <= images.MAX_PIXELS
    with pytest.raises(DiT4EditError, match="2064x2048"):
        images.check_size(size)
    images.check_size((2048, 2048))


# --- every mode -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_pillow_mode_becomes_rgb(mode):
    image = Image.new(mode, (6, 5))
    out = images.to_rgb(image)
    assert out.mode == "RGB" and out.size == (6, 5)
    mask = images.mask_from_image(image)
    assert mask.mode == "L" and mask.size == (6, 5) and set(np.unique(np.asarray(mask))) <= {0, 255}


@pytest.mark.parametrize("mode, straight", [("La", "LA"), ("RGBa", "RGBA")])
def test_premultiplied_alpha_is_composited_like_straight_alpha(mode, straight):
    colour = (40, 200, 90) if straight == "RGBA" else (120,)
    premultiplied = Image.new(straight, (4, 4), (*colour, 255)).convert(mode)
    half = Image.new(straight, (4, 4), (*colour, 128)).convert(mode)
    assert images.to_rgb(premultiplied).getpixel((0, 0)) == images.to_rgb(Image.new(straight, (4, 4), (*colour, 255))
                                                                            ).getpixel((0, 0))
    expected = np.asarray(images.to_rgb(Image.new(straight, (4, 4), (*colour, 128))), dtype=int)
    assert np.abs(np.asarray(images.to_rgb(half), dtype=int) - expected).max() <= 2  # premultiplying rounds


# --- masks ----------------------------------------------------------------------------------------------------------


def _box_layer(mode: str, inside, outside) -> Image.Image:
    layer = Image.new(mode, (32, 16), outside)
    layer.paste(inside, (8, 4, 16, 12))
    return layer


@pytest.mark.parametrize("layer", [
    _box_layer("RGBA", (0, 0, 0, 255), (0, 0, 0, 0)),  # an opaque black box on a transparent sheet
    _box_layer("LA", (255, 255), (255, 0)),  # an opaque white box on a transparent white sheet
    _box_layer("RGBA", (10, 200, 30, 230), (255, 255, 255, 20)),  # a nearly opaque brush on a faint wash
    _box_layer("L", 255, 0),  # no alpha: white = editable
    _box_layer("RGB", (250, 250, 250), (20, 20, 20)),
])
def test_painted_or_light_region_is_the_editable_one(tmp_path, layer):
    """Opaque marks on a transparent sheet and light marks on a dark picture mean the same region, from a file and
    from an image alike."""
    expected = np.zeros((16, 32), dtype=np.uint8)
    expected[4:12, 8:16] = 255
    assert np.array_equal(np.asarray(images.mask_from_image(layer)), expected)
    path = tmp_path / "mask.png"
    layer.save(path)
    assert np.array_equal(np.asarray(images.load_mask(path)), expected)


def test_palette_transparency_and_forced_alpha_follow_the_same_rule():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))
    palette.info["transparency"] = 1  # the white half is transparent
    mask = np.asarray(images.mask_from_image(palette))
    assert (mask[:, :4] == 255).all() and (mask[:, 4:] == 0).all()
    painted_all_over = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    assert (np.asarray(images.mask_from_image(painted_all_over)) == 0).all()  # opaque: read by brightness
    assert (np.asarray(images.mask_from_image(painted_all_over, use_alpha=True)) == 255).all()


# --- replacing outputs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604])
def test_replacing_an_output_keeps_its_permissions(tmp_path, mode):
    out = tmp_path / "private.jpg"
    Image.new("RGB", (4, 4)).save(out)
    out.chmod(mode)
    images.save_image(Image.new("RGB", (4, 4), (200, 0, 0)), out)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert Image.open(out).getpixel((0, 0))[0] > 150


def test_read_only_output_is_not_replaced(tmp_path):
    out = tmp_path / "kept.webp"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(out)
    before = out.read_bytes()
    out.chmod(0o400)
    with pytest.raises(DiT4EditError, match="read-only") as info:
        with images.atomic_path(out, "summary") as tmp:
            tmp.write_text("new")
    assert "\n" not in str(info.value) and "summary" in str(info.value)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["kept.webp"]


def test_output_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DiT4EditError, match="not a regular file"):
        images.save_image(Image.new("RGB", (4, 4)), fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_longest_valid_name_can_be_an_output(tmp_path):
    name = "b" * 251 + ".bmp"  # 255 characters, the longest name most file systems take
    images.save_image(Image.new("RGB", (4, 4), (7, 7, 7)), tmp_path / name)
    assert Image.open(tmp_path / name).getpixel((0, 0)) == (7, 7, 7)
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("errno_, text", [(28, "No space left on device"), (122, "Disk quota exceeded")])
def test_write_error_is_one_line_and_leaves_no_folder_or_file(tmp_path, errno_, text):
    out = tmp_path / "new" / "deeper" / "x.tif"

    def write_fails(path):
        path.write_bytes(b"partial")
        raise OSError(errno_, text)

    with pytest.raises(DiT4EditError, match=f"cannot write the output {out}: .*{text}") as info:
        with images.atomic_path(out) as tmp:
            write_fails(tmp)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the file nor the folders made for it


def test_temporary_files_are_recognisable(tmp_path):
    seen = []
    with images.atomic_path(tmp_path / "r.jsonl") as tmp:
        seen.append(tmp)
        tmp.write_text("{}")
    assert images.is_temp_file(seen[0]) and not seen[0].exists()
    assert not images.is_temp_file(tmp_path / ".draft.tmp") and not images.is_temp_file(tmp_path / "r.jsonl")


# --- outputs that are inputs ----------------------------------------------------------------------------------------


def test_output_that_is_an_input_under_another_name_is_refused(tmp_path):
    mask = tmp_path / "mask.png"
    Image.new("L", (4, 4)).save(mask)
    linked = tmp_path / "other-name.png"
    os.link(mask, linked)  # a hard link: another name, the same file
    spec = tmp_path / "spec.jsonl"
    spec.write_text("{}\n")
    for output in (linked, tmp_path / "sub" / ".." / "mask.png"):
        with pytest.raises(DiT4EditError, match="is the mask"):
            images.check_not_input(output, tmp_path / "in.png", None, mask, what="edited image", input_what="mask")
    with pytest.raises(DiT4EditError, match="results.* is the input"):
        images.check_not_input(spec, mask, spec, what="results")
    os.symlink(tmp_path, tmp_path / "alias")
    with pytest.raises(DiT4EditError, match="is the input"):
        images.check_not_input(tmp_path / "alias", tmp_path)  # an output folder that is the data folder
    assert images.check_not_input(tmp_path / "out.png", mask, spec) == tmp_path / "out.png"


def test_unsupported_output_extension_is_a_one_line_error(tmp_path):
    with pytest.raises(DiT4EditError, match="no supported image extension"):
        images.save_image(Image.new("RGB", (4, 4)), tmp_path / "anim.gif")
    assert list(tmp_path.iterdir()) == []


def test_file_size_cap_while_saving_an_image_is_one_line_and_leaves_nothing(tmp_path):
    """A real failing write (EFBIG under a file-size cap, as a full disk gives ENOSPC), in a child process."""
    import subprocess
    import sys

    script = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
import numpy as np
from PIL import Image
from dit4edit import images
from dit4edit.errors import DiT4EditError
noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
try:
    images.save_image(noise, sys.argv[1])
except DiT4EditError as error:
    print("ERROR", error)
"""
    out = tmp_path / "a" / "b" / "noise.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env,
                            timeout=120)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"ERROR cannot write the output image {out}: ")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def as_another_user():
    """Run a block as user `nobody` (real and effective ids, so `os.access` and the kernel agree), in a folder
    anyone may write in; the ids are restored after it. Needs root, which can switch back."""
    import contextlib
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    folder = Path(tempfile.mkdtemp(prefix="dit4edit-user-"))
    folder.chmod(0o777)

    @contextlib.contextmanager
    def nobody():
        os.setresgid(65534, 65534, 0)
        os.setresuid(65534, 65534, 0)
        try:
            yield
        finally:
            os.setresuid(0, 0, 0)
            os.setresgid(0, 0, 0)

    yield folder, nobody
    shutil.rmtree(folder)


def test_output_a_plain_write_could_not_change_is_refused_for_a_user(as_another_user):
    folder, nobody = as_another_user
    theirs = folder / "someone-elses.png"
    Image.new("RGB", (4, 4), (1, 1, 1)).save(theirs)
    theirs.chmod(0o644)  # root's, readable by all, writable by root only
    locked = folder / "locked"
    locked.mkdir(mode=0o555)
    mine = folder / "mine.png"
    Image.new("RGB", (4, 4)).save(mine)
    os.chown(mine, 65534, 65534)
    mine.chmod(0o600)
    before = theirs.read_bytes()
    with nobody():
        with pytest.raises(DiT4EditError, match="read-only"):
            images.save_image(Image.new("RGB", (4, 4), (200, 0, 0)), theirs)
        with pytest.raises(DiT4EditError, match="locked.*not writable"):
            images.save_image(Image.new("RGB", (4, 4)), locked / "new.png")
        images.save_image(Image.new("RGB", (4, 4), (0, 200, 0)), mine)
    assert theirs.read_bytes() == before and list(locked.iterdir()) == []
    status = mine.stat()
    assert (stat.S_IMODE(status.st_mode), status.st_uid) == (0o600, 65534)
    assert Image.open(mine).getpixel((0, 0))[1] > 150
    assert sorted(p.name for p in folder.iterdir()) == ["locked", "mine.png", "someone-elses.png"]
