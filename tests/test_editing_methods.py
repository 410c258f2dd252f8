"""Each editing method shows its defining behaviour on the tiny model, and runs the same from every surface."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SOURCE, TARGET, random_image, relative_error

from dit4edit.control.controller import AttentionController
from dit4edit.editing_methods import EDIT_METHODS
from dit4edit.errors import DiT4EditError
from dit4edit.request import EditRequest, Settings, resolve, run


def _edit(pipe, image, target, **options):
    settings = Settings().with_options({"no_merge": True, **options})
    return run(pipe, EditRequest(targets=(target,), source=SOURCE, image=image, settings=settings),
               disable_progress=True)


def _spy_self_edits(monkeypatch) -> list[tuple[int, int, str | None]]:
    """(block, step, edit) of every self-attention layer call under control."""
    seen = []
    original = AttentionController.self_edit

    def self_edit(controller, block, step_index):
        edit = original(controller, block, step_index)
        seen.append((block, step_index, edit))
        return edit

    monkeypatch.setattr(AttentionController, "self_edit", self_edit)
    return seen


def test_infedit_makes_no_inversion_calls_and_an_identity_edit_is_the_vae_round_trip(tiny_pipe, monkeypatch):
    from dit4edit import solvers

    def refuse(*args, **kwargs):
        raise AssertionError("infedit inverted")

    monkeypatch.setattr(tiny_pipe, "invert", refuse)
    for name in list(solvers.INVERSIONS):
        monkeypatch.setitem(solvers.INVERSIONS, name, refuse)
    image = random_image(32, 32)
    result, virtual = _edit(tiny_pipe, image, SOURCE, method="infedit", steps=4)
    work, _ = tiny_pipe.prepare_image(image)
    x0 = tiny_pipe.encode_image(work).double()[0]
    assert virtual.nfe == 0
    assert relative_error(result.latents[1], x0) < 1e-5  # the target of an identity edit ends at x0 itself
    round_trip = np.asarray(tiny_pipe.decode_latents(x0[None])[0], dtype=float)
    assert np.abs(np.asarray(result.images[0], dtype=float) - round_trip).max() <= 1
    edited, _ = _edit(tiny_pipe, image, TARGET, method="infedit", steps=4)
    assert relative_error(edited.latents[1], x0) > 1e-3  # a real edit does move away from it


def test_masactrl_target_reads_the_source_keys_and_values_from_step_s_in_the_deeper_blocks_only(tiny_pipe,
                                                                                                 monkeypatch):
    seen = _spy_self_edits(monkeypatch)
    steps = 13  # MasaCtrl's S = 0.08 of the schedule: step 1 of 13
    _edit(tiny_pipe, random_image(32, 32), TARGET, method="masactrl", steps=steps, inversion="ddim")
    num_blocks = tiny_pipe.num_blocks
    deeper = range(num_blocks // 2, num_blocks)
    edits = {(block, step): edit for block, step, edit in seen if step is not None}
    assert {key for key, edit in edits.items() if edit is not None} == {(b, i) for b in deeper
                                                                        for i in range(1, steps)}
    assert set(edits.values()) == {None, "mutual"}
    resolved = resolve(Settings(method="masactrl"), tiny_pipe.defaults)
    assert resolved.control.cross_replace_steps == 0.0  # mutual self-attention only: no cross-attention edit


def test_p2p_leaves_self_attention_untouched_and_edits_cross_attention(tiny_pipe, monkeypatch):
    seen = _spy_self_edits(monkeypatch)
    cross = []
    original = AttentionController.cross_edit
    monkeypatch.setattr(AttentionController, "cross_edit",
                        lambda c, step, device: cross.append(original(c, step, device)) or cross[-1])
    _edit(tiny_pipe, random_image(32, 32), TARGET, method="p2p", steps=3, inversion="ddim")
    assert seen and all(edit is None for _, _, edit in seen)
    assert any(edit is not None for edit in cross)


def test_pnp_inversion_identity_edit_returns_the_input_after_a_naive_inversion(tiny_pipe):
    image = random_image(32, 32, seed=3)
    result, inversion = _edit(tiny_pipe, image, SOURCE, method="pnp-inversion", steps=4, inversion="dpm")
    assert relative_error(result.latents[1], inversion.input_latent) < 1e-6
    plain, _ = _edit(tiny_pipe, image, SOURCE, method="p2p", steps=4, inversion="dpm")
    assert relative_error(plain.latents[1], inversion.input_latent) > 1e-4  # the naive inversion's drift


def test_sdedit_strength_sets_how_far_the_input_is_noised(tiny_pipe):
    image = random_image(32, 32, seed=5)
    work, _ = tiny_pipe.prepare_image(image)
    x0 = tiny_pipe.encode_image(work).double()
    near, _ = _edit(tiny_pipe, image, TARGET, method="sdedit", steps=10, strength=0.2)
    far, _ = _edit(tiny_pipe, image, TARGET, method="sdedit", steps=10, strength=1.0)
    assert relative_error(near.latents, x0) < relative_error(far.latents, x0)
    with pytest.raises(DiT4EditError, match="strength is an option of the sdedit method"):
        resolve(Settings(method="p2p", strength=0.5))
    with pytest.raises(DiT4EditError, match="does not invert"):
        resolve(Settings(method="infedit", direct_inversion=True))
    with pytest.raises(DiT4EditError, match="takes no mask"):
        resolve(Settings(method="sdedit", mask="m.png"))
    with pytest.raises(DiT4EditError, match="method must be one of"):
        Settings().with_options({"method": "instructpix2pix"})


@pytest.mark.parametrize("method", list(EDIT_METHODS))
def test_every_method_gives_the_same_pixels_from_the_cli_a_batch_line_and_the_api(method, tiny_pipe, tiny_model_dir,
                                                                                   tmp_path):
    from dit4edit import batch
    from dit4edit.cli import main

    random_image(32, 32, seed=7).save(tmp_path / "in.png")
    flags = ["--steps", "2", "--inversion", "ddim", "--no-merge", "--quiet"]
    assert main(["edit", str(tmp_path / "in.png"), "-s", SOURCE, "-t", TARGET, "-o", str(tmp_path / "cli.png"),
                 "--model", str(tiny_model_dir), "--method", method, *flags]) == 0
    (tmp_path / "spec.jsonl").write_text(json.dumps({"id": "x", "image": "in.png", "source": SOURCE,
                                                     "targets": [TARGET], "method": method}) + "\n")
    assert main(["batch", str(tmp_path / "spec.jsonl"), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                 *flags]) == 0
    from PIL import Image

    api = tiny_pipe(Image.open(tmp_path / "in.png"), SOURCE, TARGET, steps=2, inversion_method="ddim", no_merge=True,
                    method=method).images[0]
    rows = batch.read_rows(tmp_path / "out" / "results.jsonl")
    assert [row["status"] for row in rows] == ["ok"]
    paths = (tmp_path / "cli.png", tmp_path / "out" / rows[0]["output"])
    pixels = [np.asarray(Image.open(path), dtype=float) for path in paths]
    for other in (*pixels[1:], np.asarray(api, dtype=float)):
        assert np.abs(other - pixels[0]).max() <= 1


def test_methods_that_do_not_invert_refuse_a_saved_inversion(tiny_pipe):
    image = random_image(32, 32)
    inversion = tiny_pipe.invert(image, SOURCE, 2, method="ddim")
    for method in ("infedit", "sdedit"):
        with pytest.raises(DiT4EditError, match="does not invert"):
            run(tiny_pipe, EditRequest(targets=(TARGET,), inversion=inversion,
                                       settings=Settings(method=method)))
    assert torch.isfinite(inversion.trajectory).all()


def test_pix2pix_zero_guidance_lowers_the_cross_attention_map_difference_it_targets(tiny_pipe):
    from dit4edit.editing_methods import CrossAttentionGuidance

    inversion = tiny_pipe.invert(random_image(32, 32, seed=2), SOURCE, 4, method="ddim")
    schedule = tiny_pipe._schedule(4, (4, 4))  # a 32 px image: 4x4 latents
    guide = CrossAttentionGuidance(tiny_pipe, [SOURCE, TARGET], schedule, (32, 32), weight=1.0)
    x = inversion.trajectory[1:2].double().expand(2, -1, -1, -1).clone()  # source and target at point 1
    before, grad = guide.loss(x, 1)
    assert before > 0 and grad[0].abs().max() == 0 and grad[1].abs().max() > 0
    step = 1e-2 * before / float(grad.norm() ** 2)  # a small step along the gradient
    after, _ = guide.loss(x - step * grad, 1)
    assert after < before
    assert (guide.loss(x, 1)[0] == before)  # the processors came back: the same pass gives the same loss
    assert all(type(p).__name__ != "_CrossMaps" for p in tiny_pipe.transformer.attn_processors.values())


def test_the_page_runs_a_method_that_does_not_invert_without_inverting_or_keeping_an_inversion(tiny_pipe,
                                                                                                monkeypatch):
    from dit4edit.app import Editor, page_options, page_values

    editor = Editor(tiny_pipe, settings=Settings(steps=2, merge=None))
    assert page_values(editor.resolved())["method"] == "dit4edit"
    monkeypatch.setattr(tiny_pipe, "invert", lambda *a, **k: (_ for _ in ()).throw(AssertionError("inverted")))
    for method in ("infedit", "sdedit"):
        settings = editor.settings.with_options(page_options({"method": method}))
        outcome = editor.edit(random_image(32, 32), SOURCE, TARGET, settings)
        assert outcome.nfe == 0 and not outcome.reused and outcome.edited.size == (32, 32)
    assert not editor._cache
