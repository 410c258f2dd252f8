"""The command line: end to end through a subprocess, and every bad input as a one-line error with no output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SOURCE, TARGET, random_image
from PIL import Image

from dit4edit.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dit4edit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_edit_end_to_end_with_saved_inversion(tiny_model_dir, tmp_path):
    source = tmp_path / "in.png"
    random_image(48, 80).save(source)
    output, inversion = tmp_path / "out" / "edited.png", tmp_path / "inv.safetensors"
    done = run_cli("edit", source, "-s", SOURCE, "-t", TARGET, "-o", output, "--model", tiny_model_dir,
                   "--steps", 4, "--inversion", "ddim", "--save-inversion", inversion)
    assert done.returncode == 0, done.stderr
    assert Image.open(output).size == (48, 80) and inversion.is_file()
    assert "Traceback" not in done.stderr and "%" in done.stderr  # progress bars shown
    again = tmp_path / "again.png"
    done = run_cli("edit", inversion, "-t", "a green circle on a white background", "-o", again,
                   "--model", tiny_model_dir, "--quiet")
    assert done.returncode == 0, done.stderr
    assert Image.open(again).size == (48, 80) and done.stderr == ""


def test_reconstruct_prints_json_and_generate_writes(tiny_model_dir, tmp_path):
    source = tmp_path / "in.png"
    random_image(64, 64).save(source)
    done = run_cli("reconstruct", source, "-s", SOURCE, "-o", tmp_path / "rec.png", "--model", tiny_model_dir,
                   "--steps", 4, "--inversion", "ddim-exact", "--quiet")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"latent_nmse", "nfe", "psnr", "vae_psnr"} <= set(stats) and stats["nfe"] > 4
    done = run_cli("generate", "-p", SOURCE, "-o", tmp_path / "gen.png", "--model", tiny_model_dir, "--steps", 3,
                   "--width", 32, "--height", 48, "--quiet")
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "gen.png").size == (32, 48)


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.png"
    random_image(32, 32).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    (not_model / "weights.bin").write_bytes(b"x")
    return dict(good=good, corrupt=corrupt, empty=empty, big=big, not_model=not_model, dir=tmp_path)


CASES = [
    (["edit", "{dir}/missing.png", "-s", SOURCE, "-t", TARGET], "input image not found"),
    (["edit", "{corrupt}", "-s", SOURCE, "-t", TARGET], "not an image or corrupt"),
    (["edit", "{empty}", "-s", SOURCE, "-t", TARGET], "empty (0 bytes)"),
    (["edit", "{good}", "-s", SOURCE, "-t", TARGET, "--model", "{not_model}"], "not a diffusers pipeline folder"),
    (["edit", "{good}", "-s", SOURCE, "-t", TARGET, "--model", "{dir}/nowhere"], "model folder not found"),
    (["edit", "{good}", "-s", "  ", "-t", TARGET], "source prompt is empty"),
    (["edit", "{good}", "-s", SOURCE, "-t", ""], "target prompt is empty"),
    (["edit", "{big}", "-s", SOURCE, "-t", TARGET, "--max-pixels", "1000"], "over the limit of 1000"),
    (["reconstruct", "{corrupt}", "-s", SOURCE], "not an image or corrupt"),
    (["generate", "-p", "", "--width", "32", "--height", "32"], "prompt is empty"),
    (["generate", "-p", SOURCE, "--width", "100000", "--height", "100000"], "over the limit"),
]


@pytest.mark.parametrize("argv, message", CASES)
def test_bad_input_is_one_line_exit_2_and_no_output(argv, message, files, tiny_model_dir, capsys):
    output = files["dir"] / "out.png"
    argv = [a.format(**files) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_model_dir)]
    code = main([*argv, "-o", str(output), "--quiet", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("dit4edit: error:") and err.count("\n") == 1, err
    assert not output.exists()


def test_output_that_is_a_directory_or_the_input(files, tiny_model_dir, capsys):
    good = files["good"]
    before = good.read_bytes()
    for output, message in ((files["dir"], "is a directory"), (good, "is the input image")):
        code = main(["edit", str(good), "-s", SOURCE, "-t", TARGET, "-o", str(output), "--model",
                     str(tiny_model_dir), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
    assert good.read_bytes() == before


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["edit", "x.png"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dit4edit: error:") and err.count("\n") == 1


def test_attention_command_writes_word_maps_and_mask(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "in.png"
    random_image(64, 32).save(source)
    out = tmp_path / "maps"
    code = main(["attention", str(source), "-s", SOURCE, "-t", TARGET, "-o", str(out), "--model",
                 str(tiny_model_dir), "--steps", "3", "--inversion", "ddim", "--local-blend", "blue", "--quiet"])
    assert code == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"source-01-red.png", "target-01-blue.png", "mask.png", "edited.png", "overview.png"} <= names
    assert Image.open(out / "source-01-red.png").size == (64, 32)


@pytest.mark.parametrize("flags, message", [
    (["--self-layers", "0:99"], "outside the model, which has 2 transformer blocks"),
    (["--self-layers", "a:b"], "START:END"),
    (["--reweight", "blue"], "WORD=VALUE"),
    (["--cross-replace-steps", "1.5"], "cross_replace_steps"),
    (["--cross-replace-changed", "2"], "cross_replace_changed"),
    (["--local-blend", "zebra"], "zebra"),
    (["--mask", "{dir}/missing.png"], "not found"),
    (["--mask", "{corrupt}"], "not an image or corrupt"),
])
def test_control_flag_errors(flags, message, files, tiny_model_dir, capsys):
    output = files["dir"] / "out.png"
    flags = [f.format(**files) for f in flags]
    code = main(["edit", str(files["good"]), "-s", SOURCE, "-t", TARGET, "-o", str(output), "--model",
                 str(tiny_model_dir), "--steps", "2", "--inversion", "ddim", "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not output.exists()


def test_mask_of_wrong_size_and_control_flags_end_to_end(files, tiny_model_dir, capsys):
    mask = files["dir"] / "mask.png"
    Image.new("L", (16, 16), 255).save(mask)
    output = files["dir"] / "out.png"
    base = ["edit", str(files["good"]), "-s", SOURCE, "-t", TARGET, "-o", str(output), "--model",
            str(tiny_model_dir), "--steps", "2", "--inversion", "ddim", "--quiet"]
    assert main([*base, "--mask", str(mask)]) == 2
    assert "mask is 16x16, the image is 32x32" in capsys.readouterr().err and not output.exists()
    ok = main([*base, "--self-replace-steps", "0.5", "--self-layers", "1:2", "--cross-replace-steps", "0.5",
               "--edit-mode", "replace", "--reweight", "blue=2", "--local-blend", "blue", "--cross-replace-changed", "0"])
    assert ok == 0 and Image.open(output).size == (32, 32)


@pytest.mark.parametrize("flags, message", [
    (["--merge-ratio", "0.9"], "use stride (4, 4) or larger"),
    (["--merge-ratio", "0.8", "--merge-stride", "2x2"], "too high for stride (2, 2)"),
    (["--merge-stride", "three"], "ROWSxCOLS"),
    (["--merge-min-tokens", "0", "--merge-blocks", "1:5"], "merge blocks 1:5 are outside the model's 2 blocks"),
    (["--merge-blocks", "2:1"], "merge blocks must be [start, end)"),
    (["--merge-skip-steps", "-1"], "--merge-skip-steps must be >= 0"),
])
def test_merge_flag_errors(flags, message, files, tiny_model_dir, capsys):
    output = files["dir"] / "out.png"
    code = main(["edit", str(files["good"]), "-s", SOURCE, "-t", TARGET, "-o", str(output), "--model",
                 str(tiny_model_dir), "--steps", "2", "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not output.exists()


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dit4edit", "edit", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--inversion" in done.stdout
