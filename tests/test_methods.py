"""Editing methods by name on the same model and inversion: each method's defining behaviour, and every method from
the command line, a batch line and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SOURCE, TARGET, random_image, relative_error
from PIL import Image

from dit4edit import batch, cli
from dit4edit.errors import DiT4EditError
from dit4edit.methods import EDIT_METHODS
from dit4edit.model_folder import ModelDefaults
from dit4edit.request import Settings, resolve

STEPS = 10


@pytest.fixture
def inversion(tiny_pipe):
    return tiny_pipe.invert(random_image(32, 32), SOURCE, STEPS, method="ddim")


def controller_of(tiny_pipe, inversion, method):
    control = resolve(Settings(method=method, steps=STEPS)).control
    return tiny_pipe.make_controller(control, inversion, [TARGET])


def test_p2p_leaves_self_attention_untouched_and_edits_cross_attention(tiny_pipe, inversion):
    controller = controller_of(tiny_pipe, inversion, "p2p")
    blocks = range(tiny_pipe.num_blocks)
    assert all(controller.self_edit(block, step) is None for block in blocks for step in range(STEPS))
    assert controller.cross_edit(0, "cpu") is not None
    assert controller_of(tiny_pipe, inversion, "dit4edit").self_edit(blocks[-1], 0) is not None  # the default does


def test_masactrl_reads_the_source_keys_and_values_from_step_s_in_the_deeper_blocks_only(tiny_pipe):
    steps = 50  # MasaCtrl's own schedule: mutual self-attention from step 4 of 50
    inversion = tiny_pipe.invert(random_image(32, 32), SOURCE, steps, method="ddim")
    controller = tiny_pipe.make_controller(resolve(Settings(method="masactrl")).control, inversion, [TARGET])
    deep, shallow = tiny_pipe.num_blocks - 1, 0
    assert controller.self_switch == 4
    assert [controller.self_edit(deep, step) for step in range(steps)] == [None] * 4 + ["mutual"] * (steps - 4)
    assert all(controller.self_edit(shallow, step) is None for step in range(steps))
    assert all(controller.cross_edit(step, "cpu") is None for step in range(steps))  # no cross-attention control


def test_pnp_inversion_returns_the_input_for_an_identity_edit_after_a_naive_inversion(tiny_pipe, inversion):
    source = inversion.input_latent.float()
    settings = resolve(Settings(method="pnp-inversion", steps=STEPS))
    assert settings.direct_inversion
    direct = tiny_pipe.edit(inversion, SOURCE, control=settings.control, direct_inversion=True)
    plain = tiny_pipe.edit(inversion, SOURCE, control=resolve(Settings(method="p2p")).control)
    assert relative_error(direct.latents[1], source) < 1e-4 < 1e-2 < relative_error(plain.latents[1], source)
    with pytest.raises(DiT4EditError, match="free source"):
        resolve(Settings(method="pnp-inversion", pin_source=False))


def test_sdedit_makes_no_inversion_and_keeps_more_of_the_input_at_a_lower_strength(tiny_pipe, monkeypatch):
    image = random_image(32, 32)
    inverts = []
    original = tiny_pipe.invert
    monkeypatch.setattr(tiny_pipe, "invert", lambda *a, **k: inverts.append(1) or original(*a, **k))
    weak = tiny_pipe(image, SOURCE, TARGET, steps=STEPS, method="sdedit", strength=0.2).images[0]
    strong = tiny_pipe(image, SOURCE, TARGET, steps=STEPS, method="sdedit", strength=1.0).images[0]
    assert inverts == []
    gap = [np.abs(np.asarray(x, float) - np.asarray(image, float)).mean() for x in (weak, strong)]
    assert gap[0] < gap[1]


def test_a_method_adds_to_the_models_control_and_the_users_changes_win():
    model = ModelDefaults(control={"local_blend_changed": True, "self_replace_steps": 0.9})
    control = resolve(Settings(method="masactrl").with_options({"self_replace_steps": 0.2}), model).control
    assert control.local_blend_changed and control.self_replace_steps == 0.2 and control.cross_replace_steps == 0.0
    assert resolve(Settings(method="sdedit")).control is None
    with pytest.raises(DiT4EditError, match="method must be one of"):
        Settings().with_options({"method": "instructpix2pix"})


@pytest.mark.parametrize("method", list(EDIT_METHODS))
def test_every_method_runs_from_the_command_line_a_batch_line_and_the_api(method, tiny_pipe, tiny_model_dir,
                                                                           tmp_path):
    random_image(32, 32).save(tmp_path / "in.png")
    common = ["--model", str(tiny_model_dir), "--steps", "3", "--inversion", "ddim", "--quiet"]
    assert cli.main(["edit", str(tmp_path / "in.png"), "-s", SOURCE, "-t", TARGET, "-o", str(tmp_path / "c.png"),
                     "--method", method, *common]) == 0
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"image": "in.png", "source": SOURCE, "targets": TARGET, "method": method}) + "\n")
    assert cli.main(["batch", str(spec), "-o", str(tmp_path / "out"), *common]) == 0
    api = tiny_pipe(str(tmp_path / "in.png"), SOURCE, TARGET, steps=3, inversion="ddim", method=method).images[0]
    outputs = [np.asarray(Image.open(p).convert("RGB"), int) for p in (tmp_path / "c.png", tmp_path / "out" / "00001-0.png")]
    assert all(np.abs(o - np.asarray(api, int)).max() <= 1 for o in outputs)
    assert batch.read_rows(tmp_path / "out" / "results.jsonl")[0]["status"] == "ok"
