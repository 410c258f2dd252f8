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
    ({"vocabulary": ["red", "\u200b"]}, "vocabulary must be a non-empty list of words"),
    ({"vocabulary": {"red": 1}}, "vocabulary must be a non-empty list of words"),
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


# --- configs are requests for memory: bounded before anything loads ---------------------------------------------------


@pytest.mark.parametrize("component, updates, message", [
    ("transformer", {"num_layers": 200_000}, "num_layers is 200000, over the limit of 96"),
    ("transformer", {"num_attention_heads": 100, "attention_head_dim": 500}, "100 x 500 = 50000 wide"),
    ("transformer", {"sample_size": 512, "num_attention_heads": 32, "attention_head_dim": 256},
     "position table is 256\\^2 positions x 8192"),
    ("vae", {"block_out_channels": [16, 32, 64, 1_000_000]}, "block_out_channels is .*over the limit of 2048"),
    ("vae", {"block_out_channels": [16] * 40}, "has 40 entries"),
    ("vae", {"layers_per_block": 5000}, "layers_per_block is 5000"),
    ("text_encoder", {"d_ff": 10**9}, "d_ff is 1000000000"),
    ("text_encoder", {"vocab_size": 2**40}, "vocab_size"),
    ("text_encoder", {"num_layers": -3}, "no valid num_layers"),
    ("scheduler", {"num_train_timesteps": 10**9}, "num_train_timesteps is 1000000000"),
])
def test_config_sizes_beyond_real_models_are_refused_before_loading(copy, monkeypatch, component, updates, message):
    file = "scheduler_config.json" if component == "scheduler" else "config.json"
    edit_json(copy / component / file, **updates)
    monkeypatch.setattr(DiT4EditPipeline.__mro__[1], "from_pretrained",
                        lambda *a, **k: pytest.fail("a weight was loaded before the config was checked"))
    with pytest.raises(DiT4EditError, match=message) as info:
        DiT4EditPipeline.from_pretrained(copy)
    assert "\n" not in str(info.value)


# The configs of the largest released checkpoints of each family (from their hub folders' config.json).
PIXART_SIGMA_2K = {"sample_size": 256, "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72,
                   "in_channels": 4, "out_channels": 8, "patch_size": 2, "caption_channels": 4096,
                   "cross_attention_dim": 1152, "num_embeds_ada_norm": 1000, "norm_num_groups": 32}
SD35_LARGE = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
              "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
              "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
              "dual_attention_layers": []}
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
SDXL_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
            "in_channels": 3, "out_channels": 3, "norm_num_groups": 32, "sample_size": 1024}
FLUX_VAE = {**SDXL_VAE, "latent_channels": 16}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "num_decoder_layers": 24,
          "vocab_size": 32128, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "max_position_embeddings": 77, "projection_dim": 1280, "vocab_size": 49408}


@pytest.mark.parametrize("component, config", [
    ("transformer", PIXART_SIGMA_2K), ("transformer", SD35_LARGE), ("transformer", FLUX_DEV),
    ("vae", SDXL_VAE), ("vae", FLUX_VAE), ("text_encoder", T5_XXL), ("text_encoder", CLIP_G),
])
def test_largest_real_checkpoints_fit_the_config_limits_with_margin(component, config):
    model_folder.check_config_limits(config, component, "real")
    for key, value in config.items():  # each size may grow (sides of the position grid enter squared: 1.5x)
        grown = 3 * value // 2 if key in ("sample_size", "pos_embed_max_size") else 2 * value if isinstance(
            value, int) else [2 * v for v in value] if isinstance(value, list) else value
        model_folder.check_config_limits({**config, key: grown}, component, f"{key} grown")


@pytest.mark.parametrize("component, entry, message", [
    ("vae", ["diffusers", "UNet2DConditionModel"], "its vae is diffusers.UNet2DConditionModel"),
    ("text_encoder", ["transformers", "T5ForConditionalGeneration"], "diffusers|transformers.T5EncoderModel"),
    ("tokenizer", ["transformers", "BertTokenizer"], "T5Tokenizer or T5TokenizerFast"),
    ("tokenizer", ["diffusers", "T5Tokenizer"], "its tokenizer is diffusers.T5Tokenizer"),
    ("scheduler", ["diffusers", "os.system"], "diffusers.a scheduler class"),
    ("scheduler", "DPMSolverMultistepScheduler", "must be \\[library, class\\]"),
])
def test_every_component_class_is_checked(copy, component, entry, message):
    index = json.loads((copy / "model_index.json").read_text())
    index[component] = entry
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiT4EditError, match=message) as info:
        check_folder(copy)
    assert "\n" not in str(info.value)


def test_component_config_of_another_class_is_refused(copy):
    edit_json(copy / "vae" / "config.json", _class_name="VQModel")
    with pytest.raises(DiT4EditError, match="vae/config.json is for a 'VQModel'"):
        check_folder(copy)
    edit_json(copy / "vae" / "config.json", _class_name="AutoencoderKL")
    edit_json(copy / "text_encoder" / "config.json", model_type="bert")
    with pytest.raises(DiT4EditError, match="text_encoder/config.json is a 'bert' model"):
        check_folder(copy)


@pytest.mark.parametrize("updates, message", [({"scaling_factor": 1e6}, "scaling_factor"),
                                              ({"scaling_factor": 0.0004}, "scaling_factor"),
                                              ({"shift_factor": -1e30}, "shift_factor")])
def test_vae_scale_beyond_real_vaes_is_refused(copy, updates, message):
    edit_json(copy / "vae" / "config.json", **updates)
    with pytest.raises(DiT4EditError, match=f"no valid {message}"):
        check_folder(copy)


# --- JSON files of a model folder -------------------------------------------------------------------------------------


def test_deeply_nested_config_is_one_line_error(copy):
    (copy / "transformer" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DiT4EditError, match="config.json is nested more than"):
        check_folder(copy)


def test_settings_file_with_byte_order_mark_is_read(copy):
    (copy / "dit4edit.json").write_bytes("\ufeff".encode() + json.dumps({"num_inference_steps": 9}).encode())
    assert check_folder(copy).defaults.num_inference_steps == 9


@pytest.mark.parametrize("make", [
    lambda path: path.mkdir(),
    lambda path: __import__("os").mkfifo(path),
    lambda path: path.symlink_to(path.parent / "settings-that-were-moved.json"),
])
def test_settings_file_that_is_not_a_regular_file_is_an_error(copy, make):
    make(copy / "dit4edit.json")
    with pytest.raises(DiT4EditError, match="dit4edit.json is (not a regular file|a broken link)"):
        check_folder(copy)


def test_unknown_word_warning_escapes_terminal_controls(caplog):
    defaults = ModelDefaults(vocabulary=["a", "circle"])
    with caplog.at_level("WARNING"):
        defaults.warn_unknown_words("a \x1b]0;owned\x07circle\u202e \x00dog", what="target prompt")
    assert "\x1b" not in caplog.text and "\x00" not in caplog.text and "\u202e" not in caplog.text
    assert "\\x1b]0;owned\\x07circle\\u202e" in caplog.text and "\\x00dog" in caplog.text
