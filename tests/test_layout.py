"""The batch layout: which row holds which branch, building the batch and combining guidance, and every public entry
point at guidance 1 (no unconditional rows), with attention control still at work."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import SOURCE, TARGET, random_image, relative_error

from dit4edit.control import AttentionControl
from dit4edit.errors import DiT4EditError
from dit4edit.layout import BatchLayout

STEPS = 4


@pytest.mark.parametrize(
    "layout, slots",
    [
        (BatchLayout(1), [(0, False), (1, False), (0, True), (1, True)]),
        (BatchLayout(1, uncond_source=False), [(1, False), (0, True), (1, True)]),
        (BatchLayout(2, guidance=False), [(0, True), (1, True), (2, True)]),
        (BatchLayout(0), [(0, False), (0, True)]),
    ],
)
def test_rows_of_each_layout(layout, slots):
    assert list(layout.slots) == slots and layout.rows == len(slots)
    for r, (branch, cond) in enumerate(slots):
        assert layout.row(branch, cond) == r
        assert layout.branch_of()[r] == branch and bool(layout.is_target()[r]) == (branch != 0)
        source = layout.source_of()[r]
        # the source row of the same half, or the row itself where that half has no source row
        assert slots[source] == (0, cond) or (source == r and (0, cond) not in slots)
    assert [slots[r] for r in layout.cond_rows] == [(b, True) for b in range(layout.branches)]


@pytest.mark.parametrize("layout", [BatchLayout(2), BatchLayout(2, uncond_source=False), BatchLayout(2, False)])
def test_join_then_guide_is_classifier_free_guidance(layout):
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(layout.branches, 3, generator=g), torch.randn(layout.branches, 3, generator=g)
    batch = layout.join_guidance(uncond, cond)
    assert batch.shape == (layout.rows, 3)
    guided = layout.guide(batch, 3.0)
    for b in range(layout.branches):
        has_uncond = layout.row(b, cond=False) is not None
        expected = uncond[b] + 3.0 * (cond[b] - uncond[b]) if has_uncond else cond[b]
        assert relative_error(guided[b], expected) < 1e-6


def test_guidance_scale_decides_unconditional_rows():
    assert BatchLayout.for_scale(1, 4.5).rows == 4
    assert BatchLayout.for_scale(1, 4.5, rows=3).rows == 3
    assert BatchLayout.for_scale(1, 1.0).rows == 2 and BatchLayout.for_scale(1, 0.5, rows=3).rows == 2
    with pytest.raises(ValueError, match="rows"):
        BatchLayout.for_scale(1, 4.5, rows=5)


@contextlib.contextmanager
def batch_sizes(pipe):
    """The batch size of every transformer call while in the block."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True,
    )
    try:
        yield seen
    finally:
        handle.remove()


def test_every_entry_point_at_guidance_1_runs_conditional_rows_only(tiny_pipe):
    image = random_image(64, 64)
    with batch_sizes(tiny_pipe) as seen:
        inversion = tiny_pipe.invert(image, SOURCE, STEPS, guidance_scale=1.0, method="ddim")
        generated, trajectory = tiny_pipe.generate(SOURCE, 64, 64, STEPS, guidance_scale=1.0,
                                                   generator=torch.Generator().manual_seed(0))
        rebuilt, stats = tiny_pipe.reconstruct(image, SOURCE, STEPS, guidance_scale=1.0, method="ddim-exact")
        sdedited = tiny_pipe.sdedit(image, TARGET, 0.5, STEPS, guidance_scale=1.0,
                                    generator=torch.Generator().manual_seed(0))
    assert set(seen) == {1}  # one prompt, no unconditional row
    assert generated.size == rebuilt.size == sdedited.size == (64, 64) and trajectory.guidance_scale == 1.0
    assert stats["latent_nmse"] < 1e-6  # exact inversion at guidance 1 regenerates the input
    with batch_sizes(tiny_pipe) as seen:
        result = tiny_pipe.edit(inversion, [TARGET, "a red square on a white background"], record_words=True)
    assert set(seen) == {3} and len(result.images) == 2  # source + two targets, conditional rows only
    assert relative_error(result.latents[0], inversion.input_latent) < 1e-6  # the pinned source


def test_edit_at_guidance_1_with_default_control(tiny_pipe):
    inversion = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, guidance_scale=1.0, method="ddim")
    controlled = tiny_pipe.edit(inversion, TARGET, record_words=True)  # the default control, at the saved guidance 1
    plain = tiny_pipe.edit(inversion, TARGET, control=None)
    assert controlled.controller.layout.rows == 2
    assert controlled.controller.recorded_steps(1) == list(range(STEPS))  # maps recorded on the conditional rows
    assert set(controlled.controller.word_maps(1)) >= {"blue", "circle"}
    assert relative_error(controlled.latents[1], plain.latents[1]) > 1e-3  # the control changed the target
    same = tiny_pipe.edit(inversion, SOURCE, pin_source=False)  # identical prompts: every edit is the identity
    assert relative_error(same.latents[1], same.latents[0]) < 1e-5


def test_edit_at_guidance_1_from_the_cli(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    from dit4edit.cli import main

    source, output = tmp_path / "in.png", tmp_path / "out.png"
    random_image(64, 64).save(source)
    code = main(["edit", str(source), "-s", SOURCE, "-t", TARGET, "-o", str(output), "--model", str(tiny_model_dir),
                 "--steps", str(STEPS), "--guidance", "1", "--inversion", "ddim", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(output).size == (64, 64)


def test_three_row_layout(tiny_pipe):
    inversion = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, guidance_scale=4.5, method="ddim")
    with batch_sizes(tiny_pipe) as seen:
        three = tiny_pipe.edit(inversion, TARGET, control=None, rows=3)
    four = tiny_pipe.edit(inversion, TARGET, control=None)
    assert set(seen) == {3}
    # without control the target's guided prediction is the same: only the source's unused row is gone
    assert relative_error(three.latents, four.latents) < 1e-5
    controlled = tiny_pipe.edit(inversion, TARGET, rows=3, record_words=True)
    assert controlled.controller.layout.rows == 3 and controlled.controller.recorded_steps(1) == list(range(STEPS))
    assert relative_error(controlled.latents[1], three.latents[1]) > 1e-3  # control still edits the target
    with pytest.raises(DiT4EditError, match="pin"):
        tiny_pipe.edit(inversion, TARGET, rows=3, pin_source=False)
    with pytest.raises(DiT4EditError, match="rows"):
        tiny_pipe.edit(inversion, TARGET, rows=2)
