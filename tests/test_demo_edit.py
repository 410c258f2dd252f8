"""`make demo` must show a clean edit: the embedded model turns the shipped red circle blue, in place, and leaves the
background alone. The picture is read back by the synthetic world's oracle (colour, shape, position from pixels)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dit4edit import demo
from dit4edit.model_folder import EMBEDDED_MODEL

world = pytest.importorskip("dit4edit_research.synthetic")

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL / "model_index.json").is_file(), reason="no embedded model")


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    for _ in range(pixels):
        padded = np.pad(mask, 1)
        mask = mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask


def test_demo_turns_the_red_circle_blue_in_place_and_keeps_the_background(tmp_path):
    assert demo.main([str(tmp_path)]) == 0
    source = np.asarray(Image.open(demo.EXAMPLE).convert("RGB"))
    edited = np.asarray(Image.open(tmp_path / "demo-edit.png").convert("RGB"))
    assert edited.shape == source.shape

    before, after = world.oracle(source), world.oracle(edited)
    assert [(o.colour, o.shape) for o in before.objects] == [("red", "circle")]
    assert after.background == "white"
    assert [(o.colour, o.shape) for o in after.objects] == [("blue", "circle")]
    (old,), (new,) = before.objects, after.objects
    assert abs(new.cx - old.cx) <= 3 and abs(new.cy - old.cy) <= 3
    assert 0.8 <= new.area / old.area <= 1.25

    # Background: everything outside the circle (before or after, grown by 3 px) as it was.
    background = np.array(world.BACKGROUNDS["white"], dtype=np.float32)
    objects = [np.sqrt(((im.astype(np.float32) - background) ** 2).sum(-1)) > world.FOREGROUND_DISTANCE
               for im in (source, edited)]
    keep = ~_grow(objects[0] | objects[1], 3)
    mse = np.mean((source[keep].astype(np.float64) - edited[keep].astype(np.float64)) ** 2)
    assert 10 * np.log10(255.0**2 / max(mse, 1e-10)) >= 30.0
