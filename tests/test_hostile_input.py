"""Hostile and careless input on the surfaces (the command line, batch specs, PIE-Bench folders, the web editor, the
Python API): each case is a one-line error or the right result, never a silent wrong answer, never a write over an
input, never a deletion of somebody else's file."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import SOURCE, TARGET, random_image
from PIL import Image

from dit4edit import batch, cli
from dit4edit.app import Editor, _for_client, editor_mask
from dit4edit.errors import DiT4EditError
from dit4edit.masks import load_mask
from dit4edit.request import Settings

FAST = ["--steps", "2", "--inversion", "ddim", "--quiet"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(code, err, message):
    assert code == 2 and err.startswith("dit4edit: error:") and err.count("\n") == 1 and message in err, err


@pytest.fixture
def picture(tmp_path):
    random_image(32, 32).save(tmp_path / "in.png")
    return tmp_path / "in.png"


def spec_of(path, *items):
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items), encoding="utf-8")
    return path


def batch_run(spec, out, model, capsys, *extra):
    return run(["batch", spec, "-o", out, "--model", model, *FAST, *extra], capsys)


# --- sizes counted as computed, model configs bounded --------------------------------------------------------------


def test_a_thin_image_is_refused_by_the_size_it_is_worked_on_before_any_model_loads(tmp_path, tiny_pipe, capsys,
                                                                                      monkeypatch):
    Image.new("RGB", (4000, 2), "white").save(tmp_path / "strip.png")  # 8,000 pixels, worked on as 4000x16
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    code, err = run(["edit", tmp_path / "strip.png", "-s", SOURCE, "-t", TARGET, "-o", tmp_path / "o.png",
                     "--max-pixels", "10000"], capsys)
    one_line_error(code, err, "over the limit")
    with pytest.raises(DiT4EditError, match="over the limit"):
        Editor(tiny_pipe, settings=Settings(max_pixels=10000)).edit(tmp_path / "strip.png", SOURCE, TARGET)


def test_an_oversized_model_config_is_refused_before_loading(tiny_model_dir, tmp_path, picture, capsys):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "transformer" / "config.json").read_text())
    config["num_attention_heads"] = 10**6
    (copy / "transformer" / "config.json").write_text(json.dumps(config))
    code, err = run(["edit", picture, "-s", SOURCE, "-t", TARGET, "-o", tmp_path / "o.png", "--model", copy], capsys)
    one_line_error(code, err, "num_attention_heads")


def test_generate_has_its_own_pixel_limit(tiny_model_dir, tmp_path, capsys):
    code, err = run(["generate", "-p", SOURCE, "-o", tmp_path / "g.png", "--model", tiny_model_dir, "--width", "64",
                     "--height", "64", "--max-pixels", "1000"], capsys)
    one_line_error(code, err, "over the limit")
    assert not (tmp_path / "g.png").exists()


# --- outputs never replace inputs, and nothing but our own files is removed ---------------------------------------


def test_an_output_that_is_the_mask_under_another_name_is_refused(picture, tmp_path, tiny_model_dir, capsys):
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    os.link(tmp_path / "mask.png", tmp_path / "same-mask.png")
    before = (tmp_path / "mask.png").read_bytes()
    code, err = run(["edit", picture, "-s", SOURCE, "-t", TARGET, "-o", tmp_path / "same-mask.png", "--mask",
                     tmp_path / "mask.png", "--model", tiny_model_dir, *FAST], capsys)
    assert code == 2 and err.count("\n") == 1
    assert (tmp_path / "mask.png").read_bytes() == before


def test_attention_never_writes_over_an_input_named_like_its_pictures(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "maps"
    folder.mkdir()
    random_image(32, 32).save(folder / "overview.png")
    before = (folder / "overview.png").read_bytes()
    code, err = run(["attention", folder / "overview.png", "-s", SOURCE, "-o", folder, "--model", tiny_model_dir,
                     *FAST], capsys)
    one_line_error(code, err, "one of this command's inputs")
    assert (folder / "overview.png").read_bytes() == before


def test_attention_into_a_used_folder_leaves_only_this_runs_maps(picture, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "maps"
    assert run(["attention", picture, "-s", SOURCE, "-t", TARGET, "-o", out, "--model", tiny_model_dir, *FAST],
               capsys)[0] == 0
    first = {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    assert run(["attention", picture, "-s", "a red circle", "-o", out, "--model", tiny_model_dir, *FAST],
               capsys)[0] == 0
    second = {p.name for p in out.iterdir()}
    assert second < first | {"notes.txt"} and "notes.txt" in second  # fewer words: no stale maps, other files kept
    assert not any(name.startswith("target-") for name in second) and "edited.png" not in second


def test_a_batch_item_whose_output_is_its_own_image_fails_and_the_image_stays(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    random_image(32, 32).save(out / "me-0.png")
    before = (out / "me-0.png").read_bytes()
    spec = spec_of(tmp_path / "spec.jsonl", {"id": "me", "image": "out/me-0.png", "source": SOURCE, "targets": TARGET})
    code, _ = batch_run(spec, out, tiny_model_dir, capsys)
    rows = batch.read_rows(out / "results.jsonl")
    assert code == cli.EXIT_ITEMS_FAILED and rows[0]["status"] == "failed" and "input" in rows[0]["error"]
    assert (out / "me-0.png").read_bytes() == before


def test_pie_bench_refuses_an_output_folder_that_is_its_data_through_a_link(tmp_path, capsys):
    data = tmp_path / "pie"
    (data / "annotation_images").mkdir(parents=True)
    (data / "mapping_file.json").write_text("{}")
    os.symlink(data, tmp_path / "link")
    code, err = run(["pie-bench", "--data", data, "-o", tmp_path / "link"], capsys)
    one_line_error(code, err, "input folder")


def test_batch_removes_only_its_own_temporaries(tmp_path, tiny_model_dir, capsys, picture):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / ".draft.tmp").write_text("a user's file")
    (out / "notes" / ".dit4edit-abcdefgh.tmp").write_text("not in a folder this run writes to")
    (out / ".dit4edit-12345678.tmp").write_text("left by a killed run")
    spec = spec_of(tmp_path / "spec.jsonl", {"image": "in.png", "source": SOURCE, "targets": TARGET})
    assert batch_run(spec, out, tiny_model_dir, capsys)[0] == 0
    assert (out / ".draft.tmp").exists() and (out / "notes" / ".dit4edit-abcdefgh.tmp").exists()
    assert not (out / ".dit4edit-12345678.tmp").exists()


# --- resume: only what still stands counts as done ------------------------------------------------------------------


def test_batch_resume_redoes_what_changed_and_what_was_deleted(tmp_path, tiny_model_dir, capsys, picture):
    random_image(32, 32, seed=1).save(tmp_path / "b.png")
    lines = [{"image": "in.png", "source": SOURCE, "targets": TARGET},
             {"image": "b.png", "source": SOURCE, "targets": TARGET}]
    spec, out = spec_of(tmp_path / "spec.jsonl", *lines), tmp_path / "out"
    assert batch_run(spec, out, tiny_model_dir, capsys)[0] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    spec_of(spec, lines[0], {**lines[1], "targets": "a green circle on a white background"})  # a changed prompt
    assert batch_run(spec, out, tiny_model_dir, capsys)[0] == 0
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert again["00001-0.png"] == stamps["00001-0.png"] and again["00002-0.png"] != stamps["00002-0.png"]
    (out / "00001-0.png").unlink()  # a deleted output is not done
    assert batch_run(spec, out, tiny_model_dir, capsys)[0] == 0
    assert (out / "00001-0.png").exists()
    prompts = [row["prompt"] for row in batch.read_rows(out / "results.jsonl")]
    assert prompts == [TARGET, "a green circle on a white background"]
    assert batch_run(spec, out, tiny_model_dir, capsys, "--guidance", "2")[0] == 0  # other settings: redone
    assert all(p.stat().st_mtime_ns != again.get(p.name) for p in out.glob("*.png"))


def test_a_shard_row_that_is_not_ours_is_skipped(tmp_path, tiny_model_dir, capsys, picture):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "results-00000.jsonl").write_text('{"item": ["x"], "target": 0}\n{"item": "a", "target": "0"}\n')
    spec = spec_of(tmp_path / "spec.jsonl", {"id": "a", "image": "in.png", "source": SOURCE, "targets": TARGET})
    assert batch_run(spec, out, tiny_model_dir, capsys)[0] == 0
    assert [row["status"] for row in batch.read_rows(out / "results.jsonl")] == ["ok"]


# --- spec lines and benchmark entries: each one fails alone, before its edit ----------------------------------------


def test_bad_spec_lines_fail_alone(tmp_path, tiny_model_dir, capsys, picture):
    spec = tmp_path / "spec.jsonl"
    good = {"id": "good", "image": "in.png", "source": SOURCE, "targets": TARGET, "local_blend_changed": True,
            "reweight": "blue=2"}
    items = [good,
             "[" * 5000 + "]" * 5000,  # nested too deep for the parser
             {"id": "nl\n", "image": "in.png", "source": SOURCE, "targets": TARGET},
             {"id": "x" * 300, "image": "in.png", "source": SOURCE, "targets": TARGET},
             {"id": "raise", "image": "in.png", "source": SOURCE, "targets": TARGET, "max_pixels": 10**9},
             {"id": "ghost", "image": "in.png", "source": SOURCE, "targets": TARGET, "mask": "nomask.png"},
             {"id": "blank", "image": "in.png", "source": SOURCE, "targets": "\u200b\u2060"},
             {"id": "esc", "image": "in.png", "source": SOURCE, "targets": TARGET, "colour\x1b[31m": 1}]
    spec.write_bytes(b"\xef\xbb\xbf" + "".join((i if isinstance(i, str) else json.dumps(i)) + "\n"
                                               for i in items).encode())  # a byte-order mark on line 1
    code, _ = batch_run(spec, tmp_path / "out", tiny_model_dir, capsys)
    rows = {row["line"]: row for row in batch.read_rows(tmp_path / "out" / "results.jsonl")}
    assert code == cli.EXIT_ITEMS_FAILED and rows[1]["status"] == "ok"
    errors = {line: rows[line]["error"] for line in range(2, 9)}
    assert "nested" in errors[2] and "id" in errors[3] and "id" in errors[4]
    assert "unknown setting 'max_pixels'" in errors[5]  # the operator's limit: an item cannot raise it
    assert "mask not found" in errors[6] and "empty" in errors[7]
    assert "\x1b" not in errors[8] and "\\x1b" in errors[8]
    assert not list((tmp_path / "out").glob("nl*")) and all("\n" not in e for e in errors.values())


def pie_folder(tmp_path, entries: dict):
    data = tmp_path / "pie"
    (data / "annotation_images").mkdir(parents=True)
    random_image(32, 32).save(data / "annotation_images" / "a.jpg")
    (data / "mapping_file.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(entries).encode())
    return data


def test_bad_pie_bench_entries_fail_alone_before_any_edit(tmp_path, tiny_model_dir, capsys):
    good = {"image_path": "a.jpg", "original_prompt": SOURCE, "editing_prompt": "a [blue] circle on a white background",
            "editing_type_id": "6", "blended_word": "red blue", "mask": [0, 10]}
    data = pie_folder(tmp_path, {"000000000001": good,
                                 "000000000002": {**good, "original_prompt": [SOURCE]},
                                 "000000000003": {**good, "image_path": "b.gif", "mask": [0, 10]},
                                 "000000000004": {**good, "mask": [-5, 10]},
                                 "000000000005": good})  # writes what entry 1 writes
    out = tmp_path / "out"
    code, _ = run(["pie-bench", "--data", data, "-o", out, "--model", tiny_model_dir, *FAST, "--metrics", "psnr"],
                  capsys)
    rows = {row["item"]: row for row in batch.read_rows(out / "results.jsonl")}
    assert code == cli.EXIT_ITEMS_FAILED and rows["000000000001"]["status"] == "ok"
    assert [rows[f"00000000000{k}"]["status"] for k in (2, 3, 4, 5)] == ["failed"] * 4
    assert "original_prompt" in rows["000000000002"]["error"] and "b.gif" in rows["000000000003"]["error"]
    assert "earlier entry" in rows["000000000005"]["error"]
    assert sorted(p.name for p in (out / "annotation_images").iterdir()) == ["a.jpg"]


# --- results that cannot be right are errors ------------------------------------------------------------------------


def test_a_result_that_is_not_finite_is_an_error_not_a_black_image(tiny_pipe, picture, monkeypatch):
    inversion = tiny_pipe.invert(picture, SOURCE, 2, method="ddim")
    handle = tiny_pipe.transformer.register_forward_hook(lambda module, args, out: (out[0] * float("nan"),))
    try:
        with pytest.raises(DiT4EditError, match="NaN or infinite"):
            tiny_pipe.edit(inversion, TARGET)
    finally:
        handle.remove()


def test_a_reweight_that_cannot_act_says_so(tiny_pipe, picture, caplog):
    inversion = tiny_pipe.invert(picture, SOURCE, 3, method="ddim")
    with caplog.at_level(logging.WARNING, logger="dit4edit"):
        tiny_pipe.edit(inversion, TARGET, control={"cross_replace_changed": 0.0, "reweight": {"blue": 5.0}})
    assert any("reweight of 'blue' does nothing" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dit4edit"):
        tiny_pipe.edit(inversion, TARGET, control={"cross_replace_changed": 1.0, "reweight": {"blue": 5.0}})
    assert not any("does nothing" in r.getMessage() for r in caplog.records)


def test_the_python_api_checks_what_it_is_given(tiny_pipe, picture, tmp_path):
    with pytest.raises(DiT4EditError, match="generator"):
        tiny_pipe.generate(SOURCE, 32, 32, 2, generator=5)
    inversion = tiny_pipe.invert(picture, SOURCE, 3, method="ddim")
    with pytest.raises(DiT4EditError):
        inversion.save(tmp_path)  # a folder
    cut = type(inversion)(**{**vars(inversion), "trajectory": inversion.trajectory[:2]})
    with pytest.raises(DiT4EditError, match="trajectory"):
        tiny_pipe.edit(cut, TARGET)
    stretched = type(inversion)(**{**vars(inversion), "trajectory": torch.zeros(4, 4, 6, 4)})
    with pytest.raises(DiT4EditError, match="trajectory"):
        tiny_pipe.edit(stretched, TARGET)


# --- writing ---------------------------------------------------------------------------------------------------------


def test_a_long_valid_output_name_works_and_a_write_error_is_one_line(picture, tmp_path, tiny_model_dir, capsys,
                                                                      monkeypatch):
    long = tmp_path / ("a" * 251 + ".png")
    assert run(["edit", picture, "-s", SOURCE, "-t", TARGET, "-o", long, "--model", tiny_model_dir, *FAST],
               capsys)[0] == 0 and long.exists()

    def full(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    code, err = run(["edit", picture, "-s", SOURCE, "-t", TARGET, "-o", tmp_path / "o.png", "--model",
                     tiny_model_dir, *FAST], capsys)
    one_line_error(code, err, "No space left")
    assert not (tmp_path / "o.png").exists() and not list(tmp_path.glob(".dit4edit-*"))


def test_make_tiny_model_interrupted_leaves_no_partial_folder(tmp_path, capsys, monkeypatch):
    from dit4edit.pipeline import DiT4EditPipeline

    def interrupted(self, folder, **kwargs):
        (folder / "text_encoder").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(DiT4EditPipeline, "save_pretrained", interrupted)
    assert cli.main(["make-tiny-model", str(tmp_path / "tiny")]) == 130
    assert not (tmp_path / "tiny").exists() and list(tmp_path.iterdir()) == []


# --- the web editor ------------------------------------------------------------------------------------------------


def test_the_web_brush_and_a_mask_file_with_transparency_mean_the_same_region(tmp_path):
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((0, 0, 0, 255), (0, 0, 12, 32))  # opaque black on the left, transparent elsewhere
    layer.save(tmp_path / "mask.png")
    from_file = np.asarray(load_mask(tmp_path / "mask.png", (32, 32)))
    from_brush = np.asarray(editor_mask({"background": None, "layers": [layer], "composite": None}))
    assert np.array_equal(from_file, from_brush) and from_file[:, :12].min() == 255 and from_file[:, 12:].max() == 0


def test_the_web_editor_refuses_bad_layers_and_shows_no_server_paths(tmp_path):
    with pytest.raises(DiT4EditError, match="not an image"):
        editor_mask({"layers": ["/etc/passwd"]})
    with pytest.raises(DiT4EditError, match="at most"):
        editor_mask({"layers": [Image.new("RGBA", (9000, 2))]})
    upload = "/tmp/gradio/5f2c9e/photo.png"
    message = _for_client(f"cannot read input image {upload}: not an image", upload)
    assert "photo.png" in message and "/tmp/gradio" not in message


def test_web_settings_are_strict_and_prompts_must_show_something(tiny_pipe, picture):
    editor = Editor(tiny_pipe, settings=Settings(steps=2, inversion="ddim"))
    for options, message in (({"steps": 2.7}, "integer"), ({"local_blend_changed": "no"}, "true or false")):
        with pytest.raises(DiT4EditError, match=message):
            editor.settings.with_options(options)
    with pytest.raises(DiT4EditError, match="source prompt is empty"):
        editor.edit(picture, "\u200b\u200c", TARGET)


def test_a_zero_width_prompt_on_the_command_line_is_empty(picture, tmp_path, capsys):
    code, err = run(["edit", picture, "-s", SOURCE, "-t", "\u200b\ufeff", "-o", tmp_path / "o.png"], capsys)
    one_line_error(code, err, "target prompt is empty")


def test_each_batch_output_is_recorded_as_soon_as_it_is_done(tiny_pipe, picture, monkeypatch):
    from dit4edit.request import EditRequest

    request = EditRequest(targets=(TARGET, SOURCE, TARGET), source=SOURCE, image=str(picture),
                          settings=Settings(steps=2, inversion="ddim"))
    job = batch.make_job("big", 1, request, ("big-0.png", "big-1.png", "big-2.png"))
    edits = []
    original = tiny_pipe.edit
    monkeypatch.setattr(tiny_pipe, "edit", lambda *a, **k: edits.append(1) or original(*a, **k))
    rows = batch.run_job(tiny_pipe, job, picture.parent)
    assert next(rows)["target"] == 0 and len(edits) == 1  # recorded before the next target runs
    assert [row["target"] for row in rows] == [1, 2] and len(edits) == 3
