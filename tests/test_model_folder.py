"""Model folders and their dit4edit.json, checked from their JSON before any weight loads (one-line errors)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dit4edit import model_folder
from dit4edit.errors import DiT4EditError
from dit4edit.request import resolve
from dit4edit.model_folder import ModelDefaults, check_folder, local_folder
from dit4edit.pipeline import DiT4EditPipeline


@pytest.fixture
def copy(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def edit_json(path, **updates):
    config = json.loads(path.read_text())
    config.update(updates)
    path.write_text(json.dumps(config))


def test_tiny_folder_is_accepted_with_its_shapes(tiny_model_dir):
    info = check_folder(tiny_model_dir)
    assert (info.num_blocks, info.latent_channels, info.vae_scale_factor, info.native_size) == (2, 4, 8, 64)
    assert info.defaults == ModelDefaults()


@pytest.mark.parametrize("content, message", [("null", "must hold a JSON object, got null"),
                                              ("42", "must hold a JSON object, got 42"),
                                              ("{", "is not valid JSON")])
def test_model_index_that_is_not_an_object(copy, content, message):
    (copy / "model_index.json").write_text(content)
    for load in (check_folder, DiT4EditPipeline.from_pretrained):
        with pytest.raises(DiT4EditError, match=message):
            load(copy)


def test_missing_weights_and_pickled_weights(copy):
    weights = next((copy / "vae").glob("*.safetensors"))
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(DiT4EditError, match=r"vae holds pickled weights \(diffusion_pytorch_model.bin\)"):
        DiT4EditPipeline.from_pretrained(copy)
    (copy / "vae" / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(DiT4EditError, match=r"vae has no weights \(no .safetensors file\)"):
        DiT4EditPipeline.from_pretrained(copy)


def test_non_pixart_transformer_is_refused(copy):
    index = json.loads((copy / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "DiTTransformer2DModel"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiT4EditError, match="is not a PixArt model: its transformer is 'DiTTransformer2DModel'"):
        DiT4EditPipeline.from_pretrained(copy)


@pytest.mark.parametrize("component, updates, message", [
    ("vae", {"latent_channels": 16}, "the VAE has 16 latent channels but the transformer takes 4"),
    ("text_encoder", {"d_model": 64}, "the text encoder is 64 wide but the transformer reads 32-wide captions"),
    ("transformer", {"out_channels": 5}, "the transformer outputs 5 channels for 4 in"),
    ("transformer", {"num_layers": "two"}, "no valid num_layers"),
])
def test_components_that_do_not_fit_together(copy, component, updates, message):
    edit_json(copy / component / "config.json", **updates)
    with pytest.raises(DiT4EditError, match=message):
        DiT4EditPipeline.from_pretrained(copy)


def test_path_like_names_are_missing_folders_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("models/nonexistent", "./nope", "a/b/c", "~/no-such-model-here"):
        with pytest.raises(DiT4EditError, match="model folder not found"):
            local_folder(name)
    assert local_folder("PixArt-alpha/PixArt-XL-2-512x512") is None  # a hub id
    assert local_folder("models").resolve() == (tmp_path / "models").resolve()


def test_defaults_file_is_read_and_becomes_pipe_defaults(copy):
    (copy / "dit4edit.json").write_text(json.dumps({"guidance_scale": 2.5, "num_inference_steps": 7,
                                                    "inversion": "dpm", "vocabulary": ["a", "Red", "circle"]}))
    info = check_folder(copy)
    assert info.defaults == ModelDefaults(2.5, 7, "dpm", frozenset({"a", "red", "circle"}))
    pipe = DiT4EditPipeline.from_pretrained(copy)
    assert pipe.defaults == info.defaults
    assert pipe.defaults.unknown_words("A red, dog") == ["dog"]


@pytest.mark.parametrize("content, message", [
    ({"guidance": 2}, "unknown setting(s) guidance"),
    ({"guidance_scale": "high"}, "guidance_scale must be a number"),
    ({"guidance_scale": -1}, "guidance_scale must be >= 0"),
    ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 1000"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer"),
    ({"inversion": "euler"}, "unknown inversion 'euler'"),
    ({"vocabulary": "red"}, "vocabulary must be a non-empty list of words"),
    ([1, 2], "must hold a JSON object, got list"),
])
def test_bad_defaults_file_is_one_line_error(copy, content, message):
    (copy / "dit4edit.json").write_text(json.dumps(content))
    with pytest.raises(DiT4EditError, match="dit4edit.json") as info:
        check_folder(copy)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_api_uses_the_model_defaults_when_given_none(tiny_pipe, caplog):
    from conftest import SOURCE, random_image

    pipe = DiT4EditPipeline(**{name: getattr(tiny_pipe, name) for name in
                               ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    pipe.defaults = ModelDefaults(guidance_scale=2.0, num_inference_steps=3, inversion="ddim",
                                  vocabulary=SOURCE.split())
    inversion = pipe.invert(random_image(32, 32), SOURCE)
    assert (inversion.num_inference_steps, inversion.guidance_scale, inversion.method) == (3, 2.0, "ddim")
    image, generated = pipe.generate(SOURCE, generator=torch.Generator().manual_seed(0))
    assert (generated.num_inference_steps, generated.guidance_scale) == (3, 2.0)
    assert image.size == (64, 64)  # the model's native size
    _, stats = pipe.reconstruct(random_image(32, 32), SOURCE)
    assert (stats["steps"], stats["guidance"], stats["method"]) == (3, 2.0, "ddim")
    with caplog.at_level("WARNING"):
        pipe.check_prompt("a red dog on a white background")
    assert "words this model was not trained on: dog" in caplog.text


def test_inversion_names_match_the_solvers():
    from dit4edit.checks import INVERSION_METHODS
    from dit4edit.solvers import INVERSIONS

    assert set(INVERSION_METHODS) == set(INVERSIONS)


def test_embedded_model_folder_is_valid():
    info = check_folder(model_folder.default_model())
    assert info.native_size == 128 and info.latent_channels == 4


def test_demo_runs_with_the_same_settings_as_edit(monkeypatch, tmp_path, capsys):
    """The demo passes no settings of its own: it edits with the model's defaults, as `dit4edit edit` does."""
    from dit4edit import cli, demo

    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    assert demo.main([str(tmp_path)]) == 0
    edit = calls[-1]
    assert edit[0] == "edit" and not {"--steps", "--guidance", "--inversion", "--tol"} & set(edit)
    defaults = ModelDefaults.from_folder(model_folder.EMBEDDED_MODEL)
    assert f"{defaults.num_inference_steps} steps, {defaults.inversion}" in capsys.readouterr().out


def test_models_own_attention_control_is_what_an_edit_uses_unless_told(copy, tiny_pipe):
    from types import SimpleNamespace

    from conftest import SOURCE, TARGET, random_image
    from dit4edit import cli
    from dit4edit.control import AttentionControl

    (copy / "dit4edit.json").write_text(json.dumps({"control": {"self_mode_early": "p2p", "self_replace_steps": 1.0,
                                                                "self_layers": [0, 1]}}))
    defaults = check_folder(copy).defaults
    own = AttentionControl(self_mode_early="p2p", self_replace_steps=1.0, self_layers=(0, 1))
    assert defaults.attention_control() == own
    assert ModelDefaults().attention_control() == AttentionControl()  # no file: the library's (the paper's)

    # The API: an edit that names no control runs the model's; AttentionControl() asks for the library's.
    pipe = DiT4EditPipeline(**{name: getattr(tiny_pipe, name) for name in
                               ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    pipe.defaults = defaults
    inversion = pipe.invert(random_image(32, 32), SOURCE, num_inference_steps=2, method="ddim")
    assert pipe.edit(inversion, TARGET).controller.config == own
    assert pipe.edit(inversion, TARGET, control=AttentionControl()).controller.config == AttentionControl()

    # The command line: its flags change the model's control field by field.
    edit = ["edit", "in.png", "-s", SOURCE, "-t", TARGET, "-o", "out.png", "--self-replace-steps", "0.5"]
    flags = cli.settings_from_args(cli.build_parser().parse_args(edit))
    assert resolve(flags, defaults).control == AttentionControl(self_mode_early="p2p", self_replace_steps=0.5,
                                                                self_layers=(0, 1))
    off = cli.settings_from_args(cli.build_parser().parse_args([*edit, "--no-attention-control"]))
    assert resolve(off, defaults).control is None


@pytest.mark.parametrize("control, message", [
    ({"self_mode": "p2p"}, "unknown attention-control setting(s) self_mode"),
    ({"self_mode_early": "both"}, "self_mode_early must be one of"),
    ({"self_replace_steps": 2}, "self_replace_steps"),
    ({"local_blend_changed": "yes"}, "local_blend_changed must be true or false"),
    ({"mutual": "off"}, "mutual must be one of source, union, none"),
])
def test_bad_model_control_is_one_line_error(control, message):
    with pytest.raises(DiT4EditError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        ModelDefaults(control=control).attention_control()
    assert "\n" not in str(info.value)
    with pytest.raises(DiT4EditError, match="control must be an object"):
        ModelDefaults(control=["p2p"])
