"""Every flag and file checked before heavy work: one line on stderr, exit 2, nothing written, nothing inverted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import SOURCE, TARGET, random_image
from PIL import Image

from dit4edit import __version__
from dit4edit.cli import build_parser, main, settings_from_args
from dit4edit.request import resolve
from dit4edit.control import AttentionControl
from dit4edit.merging import MergeConfig
from dit4edit.pipeline import DiT4EditPipeline


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.png"
    random_image(32, 32).save(good)
    return dict(good=good, dir=tmp_path, out=tmp_path / "out.png", inv=tmp_path / "inv.safetensors")


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Loading the model, inverting or editing fails the test: every check must come before them."""
    def refuse(*args, **kwargs):
        pytest.fail("heavy work started before the input was checked")

    for name in ("from_pretrained", "invert", "edit", "generate", "reconstruct"):
        monkeypatch.setattr(DiT4EditPipeline, name, refuse)


def run_main(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


EDIT = ["edit", "{good}", "-s", SOURCE, "-t", TARGET, "-o", "{out}", "--quiet"]

EARLY = [
    (["--steps", "0"], "--steps must be between 1 and 1000, got 0"),
    (["--steps", "-5"], "--steps must be between 1 and 1000, got -5"),
    (["--steps", "100000"], "--steps must be between 1 and 1000, got 100000"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--guidance", "-1"], "--guidance must be >= 0"),
    (["--tol", "0"], "--tol must be > 0 and <= 1"),
    (["--tol", "-1"], "--tol must be > 0 and <= 1"),
    (["--tol", "nan"], "--tol must be a finite number"),
    (["--tol", "inf"], "--tol must be a finite number"),
    (["--seed", str(2**70)], "--seed must be between 0 and"),
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--max-pixels", "0"], "--max-pixels must be >= 1"),
    (["--local-blend", ",,,"], "--local-blend names no words"),
    (["--local-blend", "triangle"], "local-blend word(s) triangle not in the prompt"),
    (["--reweight", "zebra=2"], "reweighted word(s) zebra not in the prompt"),
    (["--reweight", "blue=nan"], "--reweight of 'blue' must be a finite number"),
    (["--self-layers", "3:99"], "self_layers 3:99 is outside the model, which has 2 transformer blocks"),
    (["--self-replace-steps", "nan"], "--self-replace-steps must be a finite number"),
    (["--merge-ratio", "nan"], "--merge-ratio must be a finite number"),
    (["--merge-min-tokens", "-5"], "--merge-min-tokens must be >= 0"),
    (["--merge-blocks", "0:99"], "outside the model's 2 blocks"),
    (["--merge-plan-every", "0"], "--merge-plan-every must be >= 1"),
    (["--mask", "{dir}/nomask.png"], "mask not found"),
    (["--mask", "{small}"], "mask is 16x16, the image is 32x32"),
    (["--save-inversion", "{good}/x.safetensors"], "is a file, not a folder"),
    (["-o", "{good}/x.png"], "is a file, not a folder"),
    (["--model", "{dir}/models/nonexistent"], "model folder not found"),
    (["--direct-inversion", "--free-source"], "direct inversion corrects the targets by the pinned source's error"),
]


@pytest.mark.parametrize("flags, message", EARLY)
def test_edit_flags_checked_before_loading_anything(flags, message, files, tiny_model_dir, no_heavy_work, capsys):
    small = files["dir"] / "small.png"
    Image.new("L", (16, 16), 255).save(small)
    fill = dict(files, small=small)
    argv = [a.format(**fill) for a in EDIT + flags]
    if "--model" not in flags:
        argv += ["--model", str(tiny_model_dir)]
    if "-o" in flags:  # the later -o wins
        pass
    code, err = run_main(argv, capsys)
    assert code == 2 and message in err and err.startswith("dit4edit: error:") and err.count("\n") == 1, err
    assert not files["out"].exists() and not files["inv"].exists()


def test_generate_flags_checked_before_loading(files, tiny_model_dir, no_heavy_work, capsys):
    base = ["generate", "-p", SOURCE, "-o", files["out"], "--model", tiny_model_dir, "--quiet"]
    for flags, message in ((["--width", "0"], "--width must be >= 1"), (["--height", "-3"], "--height must be >= 1"),
                           (["--width", "100000"], "over the limit"), (["--guidance", "nan"], "finite")):
        code, err = run_main(base + flags, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_reconstruct_and_attention_check_before_loading(files, tiny_model_dir, no_heavy_work, capsys):
    code, err = run_main(["reconstruct", files["good"], "-s", SOURCE, "-o", files["out"], "--guidance", "inf",
                          "--model", tiny_model_dir], capsys)
    assert code == 2 and "--guidance must be a finite number" in err
    att = ["attention", files["good"], "-s", SOURCE, "-o", files["dir"] / "maps", "--model", tiny_model_dir]
    for flags, message in ((["--steps-window", "0:99", "--steps", "4"], "--steps-window 0:99 is outside 0:4"),
                           (["--max-pixels", "100"], "over the limit of 100"),
                           (["--mask", files["dir"] / "none.png"], "mask not found"),
                           (["--self-layers", "0:9"], "outside the model")):
        code, err = run_main(att + flags, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (files["dir"] / "maps").exists()


def test_missing_input_is_reported_before_torch_is_imported(tmp_path):
    """The check that makes a missing file take well under a second: torch and diffusers are never imported."""
    code = ("import sys; from dit4edit.cli import main; "
            "code = main(['edit', 'missing.png', '-s', 'a', '-t', 'b', '-o', 'out.png']); "
            "print(code, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert done.stderr == "dit4edit: error: input image not found: missing.png\n"


def test_odd_file_names_stay_on_one_line(files, capsys):
    code, err = run_main(["edit", files["dir"] / "new\nline.png", "-s", SOURCE, "-t", TARGET, "-o", files["out"]],
                         capsys)
    assert code == 2 and err.count("\n") == 1 and "new\\x0aline.png" in err  # the newline shown escaped


def test_make_tiny_model_on_a_file_and_bad_seed(files, capsys):
    code, err = run_main(["make-tiny-model", files["good"]], capsys)
    assert code == 2 and "is a file" in err
    code, err = run_main(["make-tiny-model", files["dir"] / "m", "--seed", str(2**70)], capsys)
    assert code == 2 and "--seed must be between" in err and not (files["dir"] / "m").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(files, tiny_model_dir, no_heavy_work, capsys):
    folder = files["dir"] / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, err = run_main(["edit", files["good"], "-s", SOURCE, "-t", TARGET, "-o", folder / "a.png",
                              "--model", tiny_model_dir], capsys)
    finally:
        folder.chmod(0o700)
    assert code == 2 and "is not writable" in err


def test_version_and_help_for_every_argument():
    done = subprocess.run([sys.executable, "-m", "dit4edit", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"dit4edit {__version__}"
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {action.dest}" for name, sub in commands.choices.items() for action in sub._actions
               if action.dest != "help" and not action.help]
    assert missing == []
    assert "default: the embedded model" in commands.choices["edit"].format_help()


def test_each_merge_and_control_flag_sets_its_field_and_an_absent_flag_keeps_the_default():
    edit = ["edit", "in.png", "-s", SOURCE, "-t", TARGET, "-o", "out.png"]
    def resolved(*flags):
        return resolve(settings_from_args(build_parser().parse_args([*edit, *flags])))

    merge = resolved("--merge-plan-every", "4", "--merge-ratio", "0.3", "--merge-skip-steps", "2").merge
    assert (merge.plan_every, merge.ratio, merge.skip_steps) == (4, 0.3, 2)
    assert resolved().merge == MergeConfig()
    flags = {"--self-replace-steps": ("self_replace_steps", 0.25),
             "--cross-replace-steps": ("cross_replace_steps", 0.35),
             "--cross-replace-changed": ("cross_replace_changed", 0.45), "--edit-mode": ("edit_mode", "refine")}
    given = [part for flag, (_, value) in flags.items() for part in (flag, str(value))]
    control = resolved(*given, "--local-blend-changed").control
    assert {name: getattr(control, name) for name, _ in flags.values()} == dict(flags.values())
    assert control.local_blend_changed is True
    assert resolved().control == AttentionControl()


def test_saved_inversion_settings_are_used_and_said(files, tiny_model_dir, tmp_path, capsys, monkeypatch):
    inversion = files["inv"]
    code, err = run_main(["edit", files["good"], "-s", SOURCE, "-t", TARGET, "-o", files["out"], "--model",
                          tiny_model_dir, "--steps", "3", "--guidance", "2", "--inversion", "ddim",
                          "--save-inversion", inversion, "--quiet"], capsys)
    assert code == 0 and inversion.is_file(), err
    base = ["edit", inversion, "-t", TARGET, "-o", tmp_path / "again.png", "--model", tiny_model_dir]
    for flags, message in ((["--steps", "5"], "--steps 5 conflicts with the saved inversion, made with 3 steps"),
                           (["--inversion", "dpm"], "--inversion dpm conflicts with the saved inversion")):
        code, err = run_main(base + flags, capsys)
        assert code == 2 and message in err and err.count("\n") == 1
    guidances = []
    edit = DiT4EditPipeline.edit
    monkeypatch.setattr(DiT4EditPipeline, "edit",
                        lambda self, inv, target, guidance_scale=None, **kw: guidances.append(guidance_scale)
                        or edit(self, inv, target, guidance_scale, **kw))
    code, err = run_main(base + ["--steps", "3"], capsys)
    assert code == 0 and "using the saved inversion's settings: 3 steps, ddim, guidance 2" in err
    code, err = run_main(base + ["--guidance", "3"], capsys)
    assert code == 0 and "at guidance 3 (it was made at 2)" in err
    assert guidances == [2.0, 3.0]


def test_save_inversion_only_when_the_edit_succeeds(files, tiny_model_dir, capsys, monkeypatch):
    from dit4edit.errors import DiT4EditError

    def failing_edit(self, *args, **kwargs):
        raise DiT4EditError("the edit failed")

    monkeypatch.setattr(DiT4EditPipeline, "edit", failing_edit)
    code, err = run_main(["edit", files["good"], "-s", SOURCE, "-t", TARGET, "-o", files["out"], "--model",
                          tiny_model_dir, "--steps", "2", "--inversion", "ddim", "--save-inversion", files["inv"],
                          "--quiet"], capsys)
    assert code == 2 and "the edit failed" in err
    assert not files["inv"].exists() and not files["out"].exists()


def test_sigterm_while_saving_leaves_the_old_output_and_no_temporary_file(files, tiny_model_dir, capsys,
                                                                          monkeypatch):
    files["out"].write_bytes(b"old")
    save = Image.Image.save

    def terminated_mid_write(self, fp, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the temporary file is being written
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", terminated_mid_write)
    code, err = run_main(["generate", "-p", SOURCE, "-o", files["out"], "--model", tiny_model_dir, "--steps", "2",
                          "--quiet"], capsys)
    assert code == 143 and err == "dit4edit: terminated\n"
    assert files["out"].read_bytes() == b"old"
    assert sorted(p.name for p in files["dir"].iterdir()) == ["good.png", "out.png"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_long_prompt_is_one_line(files, tiny_model_dir, capsys):
    code, err = run_main(["edit", files["good"], "-s", " ".join(["circle"] * 200), "-t", TARGET, "-o",
                          files["out"], "--model", tiny_model_dir, "--quiet"], capsys)
    assert code == 2 and "T5 tokens long" in err and err.count("\n") == 1, err


def test_mask_keeps_every_pixel_outside_it(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "in.png"
    picture = Image.new("RGB", (64, 64), (20, 20, 20))
    picture.paste((200, 30, 30), (16, 16, 48, 48))
    picture.save(source)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    output = tmp_path / "out.png"
    code, err = run_main(["edit", source, "-s", SOURCE, "-t", TARGET, "-o", output, "--model", tiny_model_dir,
                          "--steps", "3", "--inversion", "ddim", "--mask", tmp_path / "mask.png", "--quiet"], capsys)
    assert code == 0, err
    import numpy as np

    out, original = np.asarray(Image.open(output), dtype=int), np.asarray(picture, dtype=int)
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], original[outside])  # the black background, pixel for pixel
    assert np.abs(out[~outside] - original[~outside]).max() > 10  # and the inside was edited


def test_defaults_file_sets_the_cli_settings(tiny_model_dir, tmp_path, files, capsys, monkeypatch):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "dit4edit.json").write_text(json.dumps({"guidance_scale": 2.5, "num_inference_steps": 3,
                                                     "inversion": "ddim"}))
    seen = []
    invert = DiT4EditPipeline.invert
    monkeypatch.setattr(DiT4EditPipeline, "invert", lambda self, image, prompt, *args, **kw: seen.append(args[:3])
                        or invert(self, image, prompt, *args, **kw))
    code, err = run_main(["edit", files["good"], "-s", SOURCE, "-t", TARGET, "-o", files["out"], "--model", model,
                          "--quiet"], capsys)
    assert code == 0, err
    assert seen == [(3, 2.5, "ddim")]
    (model / "dit4edit.json").write_text(json.dumps({"steps": 3}))
    code, err = run_main(["edit", files["good"], "-s", SOURCE, "-t", TARGET, "-o", files["out"], "--model", model],
                         capsys)
    assert code == 2 and "unknown setting(s) steps" in err and err.count("\n") == 1


def test_folders_where_files_belong(files, tiny_model_dir, no_heavy_work, capsys):
    base = ["-s", SOURCE, "-t", TARGET, "--model", tiny_model_dir]
    for argv, message in ((["edit", files["dir"], "-o", files["out"], *base], "input image is not a file"),
                          (["edit", files["good"], "-o", files["out"], "--mask", files["dir"], *base],
                           "mask is not a file"),
                          (["edit", files["good"], "-o", files["out"], "-s", SOURCE, "-t", TARGET, "--model",
                            files["good"]], "model path is not a folder"),
                          (["edit", files["good"], "-o", files["dir"], *base], "output path is a directory")):
        code, err = run_main(argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_words_outside_the_vocabulary_draw_one_warning_line(tiny_model_dir, tmp_path, files, capsys, caplog):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "dit4edit.json").write_text(json.dumps({"num_inference_steps": 2, "inversion": "ddim",
                                                     "vocabulary": SOURCE.split() + ["blue"]}))
    with caplog.at_level("WARNING"):
        code, err = run_main(["edit", files["good"], "-s", SOURCE, "-t", "a blue dog on a white watercolor background",
                              "-o", files["out"], "--model", model, "--quiet"], capsys)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["the target prompt has words this model was not trained on: dog, watercolor "
                        "(it ignores or misreads them)"]


def test_direct_inversion_flag_reaches_the_edit(files, tiny_model_dir, monkeypatch, capsys):
    seen = []
    edit = DiT4EditPipeline.edit
    monkeypatch.setattr(DiT4EditPipeline, "edit",
                        lambda self, *args, **kw: seen.append(kw["direct_inversion"]) or edit(self, *args, **kw))
    base = ["edit", files["good"], "-s", SOURCE, "-t", TARGET, "-o", files["out"], "--model", tiny_model_dir,
            "--steps", "2", "--inversion", "ddim", "--quiet"]
    assert run_main(base, capsys)[0] == 0 and run_main([*base, "--direct-inversion"], capsys)[0] == 0
    assert seen == [False, True]
