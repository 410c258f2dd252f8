"""One edit request: every surface (the command line, a batch spec line, the web editor, `pipe(...)`) builds the
same `EditRequest`, resolves it once and runs it with `request.run`, so the same request gives the same pixels."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SOURCE, TARGET, random_image
from PIL import Image

from dit4edit import cli
from dit4edit.app import Editor
from dit4edit.control import AttentionControl
from dit4edit.errors import DiT4EditError
from dit4edit.model_folder import ModelDefaults
from dit4edit.request import OPTIONS, EditRequest, Settings, prepare, resolve

FAST = {"steps": 3, "inversion": "ddim"}


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=int)


@pytest.fixture
def inputs(tmp_path):
    random_image(48, 32).save(tmp_path / "in.png")
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (0, 0, 24, 32))  # the left half editable
    mask.save(tmp_path / "mask.png")
    return tmp_path


def on_every_surface(tiny_pipe, tiny_model_dir, folder, options: dict) -> dict[str, np.ndarray]:
    """The same request through the command line, a batch spec line, the web editor and the API."""
    image, flags = folder / "in.png", []
    for name, value in {**FAST, **options}.items():
        flag = f"--{name.replace('_', '-')}"
        flags += [flag] if value is True else [flag, str(value)]
    outputs = {}
    common = ["--model", str(tiny_model_dir), "--quiet"]
    assert cli.main(["edit", str(image), "-s", SOURCE, "-t", TARGET, "-o", str(folder / "cli.png"), *flags,
                     *common]) == 0
    outputs["cli"] = pixels(folder / "cli.png")

    spec = folder / "spec.jsonl"
    spec.write_text(json.dumps({"image": "in.png", "source": SOURCE, "targets": [TARGET], **FAST, **options}) + "\n")
    assert cli.main(["batch", str(spec), "-o", str(folder / "out"), *common]) == 0
    outputs["batch"] = pixels(folder / "out" / "00001-0.png")

    settings = Settings(**FAST).with_options({k: v for k, v in options.items() if k != "mask"})
    brushed = Image.open(options["mask"]).convert("L") if "mask" in options else None  # the page sends a layer
    outputs["web"] = pixels(Editor(tiny_pipe).edit(image, SOURCE, TARGET, settings, brushed).edited)

    outputs["api"] = pixels(tiny_pipe(str(image), SOURCE, TARGET, **FAST, **options).images[0])
    return outputs


def test_a_masked_edit_gives_the_same_pixels_on_every_surface_and_keeps_every_pixel_outside(
        tiny_pipe, tiny_model_dir, inputs):
    outputs = on_every_surface(tiny_pipe, tiny_model_dir, inputs, {"mask": str(inputs / "mask.png")})
    source = pixels(inputs / "in.png")
    for surface, edited in outputs.items():
        assert np.array_equal(edited[:, 24:], source[:, 24:]), surface  # outside the mask: the input, exactly
        assert np.abs(edited[:, :24] - source[:, :24]).max() > 10, surface  # inside: edited
        assert np.abs(edited - outputs["api"]).max() <= 1, surface  # one request, one result (rounding aside)


def test_a_direct_inversion_edit_gives_the_same_pixels_on_every_surface(tiny_pipe, tiny_model_dir, inputs):
    outputs = on_every_surface(tiny_pipe, tiny_model_dir, inputs, {"direct_inversion": True})
    plain = pixels(tiny_pipe(str(inputs / "in.png"), SOURCE, TARGET, **FAST).images[0])
    assert np.abs(outputs["api"] - plain).max() > 2  # the option acted
    for surface, edited in outputs.items():
        assert np.abs(edited - outputs["api"]).max() <= 1, surface


def test_settings_resolve_from_the_user_then_the_model_then_the_library():
    model = ModelDefaults(guidance_scale=2.5, num_inference_steps=12, inversion="dpm",
                          control={"self_mode_early": "p2p", "self_replace_steps": 0.9})
    resolved = resolve(Settings(steps=5).with_options({"self_replace_steps": 0.5, "merge_ratio": 0.5}), model)
    assert (resolved.steps, resolved.guidance, resolved.inversion) == (5, 2.5, "dpm")
    assert resolved.control == AttentionControl(self_mode_early="p2p", self_replace_steps=0.5)
    assert resolved.merge.ratio == 0.5 and resolved.tol == resolve(Settings()).tol
    library = resolve(Settings())
    assert library.control == AttentionControl() and library.steps == ModelDefaults().num_inference_steps
    assert resolve(Settings(control=None, merge=None)).control is None
    exact = AttentionControl(self_replace_steps=0.1)
    assert resolve(Settings(control=exact), model).control is exact  # an object is used as it is


@pytest.mark.parametrize("options, message", [
    ({"steps": 2.7}, "steps must be an integer"),
    ({"steps": True}, "steps must be an integer"),
    ({"no_merge": "no"}, "true or false"),
    ({"local_blend_changed": 1}, "true or false"),
    ({"reweight": {"blue": 1e300}}, r"reweight of 'blue' must be in \(0, 1000\]"),
    ({"self_layers": "2-4"}, "START:END"),
    ({"merge_stride": [3, 3.0]}, "ROWSxCOLS"),
    ({"max_pixels": 10**9}, "unknown option 'max_pixels'"),
    ({"mask": 7}, "mask must be an image file's path"),
    ({"colour": "red"}, "unknown option 'colour'"),
])  # fmt: skip
def test_options_by_name_are_strictly_typed(options, message):
    with pytest.raises(DiT4EditError, match=message):
        Settings().with_options(options, "option")


def test_every_option_is_a_flag_of_edit_and_a_field_the_page_or_a_spec_line_can_set():
    parser = cli.build_parser()
    edit = parser._subparsers._group_actions[0].choices["edit"]
    dests = {action.dest for action in edit._actions}
    assert set(OPTIONS) <= dests  # one name: the flag, the spec key and the page field


def test_a_request_is_checked_before_any_model_or_file_work(tmp_path):
    random_image(32, 32).save(tmp_path / "in.png")
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    request = EditRequest(targets=(TARGET,), source=SOURCE, image=str(tmp_path / "in.png"))
    for changed, message in [(dict(source="\u200b \u200d"), "source prompt is empty"),
                             (dict(targets=("",)), "target prompt is empty"),
                             (dict(image=None), "an input image or a saved inversion"),
                             (dict(settings=Settings(mask=str(tmp_path / "small.png"))), "mask is 16x16"),
                             (dict(settings=Settings().with_options({"local_blend": "square"})), "square")]:
        with pytest.raises(DiT4EditError, match=message):
            prepare(EditRequest(**{**vars(request), **changed}))


def test_a_capitalised_prompt_generates_what_its_lowercase_form_generates(tiny_model_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--steps", "3", "--width", "32", "--height", "32", "--quiet"]
    for name, prompt in (("upper.png", "A Red Circle on a White Background"),
                         ("lower.png", "a red circle on a white background")):
        assert cli.main(["generate", "-p", prompt, "-o", str(tmp_path / name), *common]) == 0
    assert np.array_equal(pixels(tmp_path / "upper.png"), pixels(tmp_path / "lower.png"))


def test_generation_equals_diffusers_pixart_pipeline_on_a_capitalised_prompt(tiny_pipe):
    from diffusers import PixArtAlphaPipeline

    reference = PixArtAlphaPipeline(**{name: getattr(tiny_pipe, name) for name in
                                       ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")})
    reference.set_progress_bar_config(disable=True)
    prompt = "A Red Circle on a White Background"
    ours, _ = tiny_pipe.generate(prompt, 64, 64, 4, 4.5, generator=torch.Generator().manual_seed(3))
    theirs = reference(prompt, height=64, width=64, num_inference_steps=4, guidance_scale=4.5,
                       generator=torch.Generator().manual_seed(3), use_resolution_binning=False,
                       clean_caption=True, max_sequence_length=tiny_pipe.max_sequence_length).images[0]
    other = tiny_pipe.generate("a red square on a white background", 64, 64, 4, 4.5,
                               generator=torch.Generator().manual_seed(3))[0]
    gap = np.abs(pixels(ours) - pixels(theirs)).max()
    assert gap <= 2 < np.abs(pixels(other) - pixels(theirs)).max()


def test_debug_shows_the_traceback_of_a_failure_inside_model_loading(tiny_model_dir, tmp_path, monkeypatch,
                                                                    capsys):
    from dit4edit.pipeline import DiT4EditPipeline

    random_image(32, 32).save(tmp_path / "in.png")

    def broken(*args, **kwargs):
        raise KeyError("a diffusers API change")

    monkeypatch.setattr("diffusers.DiffusionPipeline.from_pretrained", broken)
    argv = ["edit", str(tmp_path / "in.png"), "-s", SOURCE, "-t", TARGET, "-o", str(tmp_path / "o.png"),
            "--model", str(tiny_model_dir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load model" in err and "a diffusers API change" in err
    with pytest.raises(DiT4EditError) as raised:
        cli.main(["--debug", *argv])
    assert isinstance(raised.value.__cause__, KeyError)  # the traceback shows the cause
    assert not (tmp_path / "o.png").exists() and DiT4EditPipeline is not None


def test_debug_prints_a_traceback_in_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dit4edit", "--debug", "edit", str(tmp_path / "none.png"), "-s",
                           SOURCE, "-t", TARGET, "-o", str(tmp_path / "o.png")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "Traceback" in done.stderr and "input image not found" in done.stderr
