"""The synthetic world: deterministic scenes, exact palette, caption grammar, ground-truth edits and the oracle."""

import re

import numpy as np
import pytest

from dit4edit_research.synthetic import (
    BACKGROUNDS,
    COLOURS,
    ALL_EDIT_KINDS,
    EDIT_KINDS,
    PATTERNS,
    SHAPES,
    Edit,
    SceneObject,
    apply_edit,
    generate_scene,
    make_scene,
    oracle,
    possible_edits,
    random_edit,
)

OBJECT = r"a (?:(?:small|large) )?(?:red|green|blue|yellow|purple|orange) (?:(?:striped|dotted) )?(?:circle|square|triangle|star)"
CAPTION = re.compile(rf"^{OBJECT}(?: and {OBJECT})? on a (?:white|black|gray|beige) background$")


def test_scenes_are_deterministic_per_seed():
    a, b, c = generate_scene(5), generate_scene(5), generate_scene(6)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.objects == b.objects
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("width,height", [(128, 128), (256, 128), (128, 256)])
def test_canvas_sizes(width, height):
    scene = generate_scene(1, width, height, n_objects=2)
    assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
    assert scene.alphas.shape == (2, height, width)
    for obj in scene.objects:
        assert obj.radius < obj.cx < width - obj.radius and obj.radius < obj.cy < height - obj.radius


def test_flat_regions_have_exact_palette_colours():
    edges = 0
    for seed in range(20):
        scene = generate_scene(seed, pattern_probability=0.0)
        untouched = ~scene.masks.any(axis=0)
        assert (scene.image[untouched] == BACKGROUNDS[scene.background]).all()
        for obj, alpha in zip(scene.objects, scene.alphas):
            inside = scene.image[alpha >= 1.0]
            assert len(inside) > 100
            assert (inside == COLOURS[obj.colour]).all()
        edge = (scene.alphas > 0) & (scene.alphas < 1)  # anti-aliased: edges blend colour and background
        edges += bool(edge.any())
    assert edges >= 15  # a square whose sides fall on pixel boundaries has no blended edge


def test_objects_never_overlap_and_captions_follow_the_grammar():
    seen_two = 0
    for seed in range(200):
        scene = generate_scene(seed)
        assert CAPTION.match(scene.caption), scene.caption
        assert (scene.masks.sum(axis=0) <= 1).all()
        if len(scene.objects) == 2:
            seen_two += 1
            left, right = scene.objects
            assert left.cx < right.cx
            assert scene.caption.index(left.phrase(scene.mention_size)) < scene.caption.index(" and ")
    assert 20 < seen_two < 100  # a quarter of the scenes have two objects


def test_caption_wording():
    objects = [SceneObject("star", "blue", "small", None, 100, 96), SceneObject("circle", "red", "large", "striped", 40, 40)]
    scene = make_scene(objects, "gray")
    assert scene.caption == "a red striped circle and a blue star on a gray background"
    assert make_scene(objects, "gray", mention_size=True).caption == (
        "a large red striped circle and a small blue star on a gray background")


def test_overlapping_objects_are_rejected():
    objects = [SceneObject("star", "blue", "large", None, 50, 60), SceneObject("circle", "red", "large", None, 70, 60)]
    with pytest.raises(ValueError):
        make_scene(objects, "gray")


@pytest.mark.parametrize("kind", ALL_EDIT_KINDS)
@pytest.mark.parametrize("width,height", [(128, 128), (128, 256)])
def test_apply_edit_changes_only_the_edited_region(kind, width, height):
    done = 0
    for seed in range(40):
        scene = generate_scene(seed, width, height)
        try:
            edit = random_edit(scene, seed, kind)
        except ValueError:
            continue
        pair = apply_edit(scene, edit)
        src, tgt = pair.source.image, pair.target.image
        assert np.array_equal(src, scene.image)
        assert not np.array_equal(src, tgt)
        assert np.array_equal(src[~pair.region], tgt[~pair.region])
        assert pair.source_caption != pair.target_caption
        assert CAPTION.match(pair.target_caption) and CAPTION.match(pair.source_caption)
        if kind == "background":
            assert f"on a {edit.value} background" in pair.target_caption
            assert pair.target.objects == scene.objects
        else:
            # The other object (if any) is untouched, pixel for pixel, and the caption changes by one word.
            others = [o for k, o in enumerate(scene.objects) if k != edit.index]
            assert all(o in pair.target.objects for o in others)
            changed = [(a, b) for a, b in zip(pair.source_caption.split(), pair.target_caption.split()) if a != b]
            if kind != "pattern":
                assert len(pair.source_caption.split()) == len(pair.target_caption.split())
                assert len(changed) == 1 and changed[0][1] == edit.value
            else:
                assert (edit.value == "none") == (edit.value not in pair.target_caption)
        if kind == "size":
            assert "small" in pair.source_caption or "large" in pair.source_caption
        done += 1
        if done == 3:
            break
    assert done == 3


def test_possible_edits_are_all_valid():
    scene = generate_scene(3, n_objects=2)
    assert {e.kind for e in possible_edits(scene)} >= {"colour", "shape", "background"}
    edits = possible_edits(scene, ALL_EDIT_KINDS)
    assert {e.kind for e in edits} >= {"colour", "shape", "pattern", "background"}
    for edit in edits:
        apply_edit(scene, edit)
    with pytest.raises(ValueError):
        apply_edit(scene, Edit("colour", scene.objects[0].colour, 0))


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_oracle_reads_every_colour_shape_and_background(background):
    for k, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            pattern = (None,) + PATTERNS
            obj = SceneObject(shape, colour, "small" if (k + j) % 2 else "large", pattern[(k + j) % 3],
                              40 + 7 * j, 50 + 5 * k)
            scene = make_scene([obj], background)
            for masks in (None, scene.alphas):
                report = oracle(scene.image, masks)
                assert report.background == background
                assert len(report.objects) == 1
                got = report.objects[0]
                assert (got.colour, got.shape, got.pattern, got.size) == (colour, shape, obj.pattern, obj.size)


def test_oracle_on_random_two_object_scenes():
    for seed in range(30):
        scene = generate_scene(seed, 256, 128, n_objects=2)
        report = oracle(scene.pil())
        assert [(o.colour, o.shape) for o in report.objects] == [(o.colour, o.shape) for o in scene.objects]


def test_oracle_sees_a_wrong_colour():
    scene = make_scene([SceneObject("square", "red", "large", None, 64, 64)], "white")
    image = scene.image.copy()
    image[scene.alphas[0] > 0] = COLOURS["blue"]
    assert oracle(image).objects[0].colour == "blue"
