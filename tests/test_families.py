"""SD3 and FLUX.1 through dit4edit's own pipeline and surfaces, on tiny random models written by
`dit4edit make-tiny-model --family`: folders load and check, exact inversion regenerates its input, an identity edit
is the reconstruction, control off is plain generation, merging at ratio 0 changes nothing, a mask keeps every pixel
outside it, and the command line, a batch and the web editor run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SOURCE, TARGET, random_image, relative_error
from PIL import Image

from dit4edit.cli import main
from dit4edit.errors import DiT4EditError
from dit4edit.merging import MergeConfig
from dit4edit.model_folder import check_folder
from dit4edit.pipeline import DiT4EditPipeline
from dit4edit.request import Settings

FAMILIES = ("sd3", "flux")
FAST = dict(steps=3, guidance=2.0)
FLOAT_TOL = 1e-5  # float32 round-off between batch rows of the same arithmetic


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        assert main(["make-tiny-model", str(root / family), "--family", family]) == 0
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="module")
def pipes(folders):
    loaded = {}
    for family, folder in folders.items():
        pipe = DiT4EditPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        loaded[family] = pipe
    return loaded


def test_folders_check_and_load_as_their_family(folders, pipes):
    blocks = {"sd3": 4, "flux": 2}  # SD3: 4 joint blocks; FLUX: 1 double-stream + 1 single-stream
    for family, folder in folders.items():
        info = check_folder(folder)
        assert info.num_blocks == blocks[family] and info.max_sequence_length == {"sd3": 256, "flux": 512}[family]
        pipe = pipes[family]
        assert pipe.backbone.family == family and pipe.num_blocks == blocks[family] and pipe.joint
    index = json.loads((folders["sd3"] / "model_index.json").read_text())
    del index["text_encoder_3"]
    broken = folders["sd3"].parent / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiT4EditError, match="no text_encoder_3"):
        check_folder(broken)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_inversion_regenerates_its_input(pipes, family):
    pipe = pipes[family]
    image = random_image(32, 32)
    _, naive = pipe.reconstruct(image, SOURCE, 6, 2.0, method="dpm")
    _, exact = pipe.reconstruct(image, SOURCE, 6, 2.0, method="dpm-exact")
    _, euler = pipe.reconstruct(image, SOURCE, 6, 2.0, method="ddim-exact")
    assert naive["latent_nmse"] > 1e-3  # the naive inversion drifts
    for stats in (exact, euler):
        assert stats["latent_nmse"] < 1e-6
        assert abs(stats["psnr"] - stats["vae_psnr"]) < 0.05  # as good as the VAE round trip


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_edit_is_the_reconstruction(pipes, family):
    result = pipes[family](random_image(32, 32), SOURCE, SOURCE, no_merge=True, inversion="dpm-exact", tol=1e-8,
                           **FAST)  # merging approximates; an exact inversion lets the free target regenerate it
    assert relative_error(result.latents[1], result.latents[0]) < FLOAT_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_control_off_is_plain_generation(pipes, family):
    pipe = pipes[family]
    _, generated = pipe.generate(SOURCE, 32, 32, 3, 2.0, generator=torch.Generator().manual_seed(4))
    result = pipe.edit(generated, [SOURCE, TARGET], control=None, merge=None)
    assert relative_error(result.latents[1], generated.trajectory[-1].float()) < FLOAT_TOL
    controlled = pipe.edit(generated, TARGET)
    assert relative_error(controlled.latents[1], result.latents[2]) > 10 * FLOAT_TOL  # control acts on the target


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_at_ratio_zero_is_bit_identical(pipes, family):
    pipe = pipes[family]
    _, generated = pipe.generate(SOURCE, 32, 32, 3, 2.0, generator=torch.Generator().manual_seed(5))
    off = pipe.edit(generated, TARGET, merge=None)
    zero = pipe.edit(generated, TARGET, merge=MergeConfig(ratio=0.0))
    assert torch.equal(off.latents, zero.latents)
    merged = pipe.edit(generated, TARGET, merge=MergeConfig(ratio=0.5, min_tokens=1))
    assert torch.isfinite(merged.latents).all() and not torch.equal(off.latents, merged.latents)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mask_keeps_every_pixel_outside_it(pipes, family, tmp_path):
    image = random_image(32, 32)
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = pipes[family](image, SOURCE, TARGET, mask=str(tmp_path / "mask.png"), **FAST)
    edited, kept = np.asarray(result.images[0], int), np.asarray(image, int)
    assert (edited[20:] == kept[20:]).all()  # below the mask, beyond its feathered edge
    assert (edited[:12] != kept[:12]).any()


def test_what_joint_control_does_not_do_is_one_line(pipes):
    with pytest.raises(DiT4EditError, match="reweighting"):
        pipes["sd3"](random_image(32, 32), SOURCE, TARGET, reweight="blue=2", **FAST)


def test_command_line_batch_and_web_editor_run_on_sd3(folders, pipes, tmp_path):
    random_image(32, 32).save(tmp_path / "in.png")
    for family, folder in folders.items():
        out = tmp_path / f"{family}.png"
        assert main(["edit", str(tmp_path / "in.png"), "-s", SOURCE, "-t", TARGET, "-o", str(out), "--model",
                     str(folder), "--steps", "3", "--quiet"]) == 0
        assert Image.open(out).size == (32, 32)
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"image": "in.png", "source": SOURCE, "targets": [TARGET]}) + "\n")
    assert main(["batch", str(spec), "-o", str(tmp_path / "batch"), "--model", str(folders["sd3"]), "--steps", "3",
                 "--quiet"]) == 0
    assert (tmp_path / "batch" / "00001-0.png").is_file()
    pytest.importorskip("gradio")
    from dit4edit.app import Editor

    outcome = Editor(pipes["sd3"]).edit(tmp_path / "in.png", SOURCE, TARGET, Settings(steps=3))
    assert outcome.edited.size == (32, 32) and outcome.word_maps == []


@pytest.mark.parametrize("family", FAMILIES)
def test_flowedit_with_the_source_as_target_returns_the_input(pipes, family):
    """FlowEdit's edited latent moves by the target velocity minus the source's: with the same prompt and
    guidance both are one prediction, so the output is the VAE round trip of the input; another prompt moves it."""
    pipe = pipes[family]
    image = random_image(32, 32)
    same = pipe.flowedit(image, SOURCE, SOURCE, 6, 4, 2.0, 2.0, generator=torch.Generator().manual_seed(0))
    round_trip = pipe.decode_latents(pipe.encode_image(image))[0]
    assert np.array_equal(np.asarray(same), np.asarray(round_trip))
    other = pipe.flowedit(image, SOURCE, TARGET, 6, 4, 2.0, 5.0, generator=torch.Generator().manual_seed(0))
    assert not np.array_equal(np.asarray(other), np.asarray(round_trip))
    with pytest.raises(DiT4EditError, match="n_max"):
        pipe.flowedit(image, SOURCE, TARGET, 6, 7)


def test_a_saved_inversion_records_its_family(pipes):
    _, inversion = pipes["flux"].generate(SOURCE, 32, 32, 2, 2.0, generator=torch.Generator().manual_seed(0))
    assert inversion.model["family"] == "flux"
    with pytest.raises(DiT4EditError, match="made by a flux model; this is a sd3 model"):
        pipes["sd3"].check_inversion(inversion)


@pytest.mark.parametrize("method", ["p2p", "masactrl", "pnp-inversion", "pix2pix-zero"])
def test_methods_that_need_cross_attention_are_refused_on_joint_attention_in_one_line(pipes, method, monkeypatch):
    pipe = pipes["sd3"]
    monkeypatch.setattr(pipe, "invert", lambda *a, **k: pytest.fail("inverted before refusing"))
    with pytest.raises(DiT4EditError, match=f"{method} needs self- and cross-attention layers"):
        pipe(random_image(32, 32), SOURCE, TARGET, method=method, **FAST)
