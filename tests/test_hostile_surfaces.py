"""Hostile and careless input on the surfaces (command line, batch specs, PIE-Bench folders, the web editor, the
Python API): each gets a one-line error or the right result, never silent wrong output, and a command never
writes over its inputs or removes files that are not its own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SOURCE, TARGET, random_image
from dit4edit import batch, images as imgs
from dit4edit.cli import main
from dit4edit.errors import DiT4EditError
from dit4edit.request import EditRequest, Settings

FAST = ["--steps", "2", "--inversion", "ddim", "--quiet"]
GEN = ["--steps", "2", "--quiet"]


def model_args(folder):
    return ["--model", str(folder), "--device", "cpu"]


def no_control_chars(text: str) -> bool:
    return not any(ord(c) < 32 and c != "\n" or ord(c) == 127 for c in text)


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "in.png"
    random_image(32, 32).save(path)
    return path


def spec_file(tmp_path, lines, name="spec.jsonl", prefix=""):
    path = tmp_path / name
    path.write_text(prefix + "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def item(image="in.png", **extra):
    return {"image": image, "source": SOURCE, "targets": [TARGET], **extra}


# --- the command line --------------------------------------------------------------------------------------------


def test_reweight_outside_its_cross_attention_window_says_so(small, tmp_path, tiny_model_dir, caplog):
    out = tmp_path / "o.png"
    code = main(["edit", str(small), "-s", SOURCE, "-t", TARGET, "-o", str(out), *FAST, *model_args(tiny_model_dir),
                 "--cross-replace-changed", "0", "--reweight", "blue=3"])
    assert code == 0 and out.is_file()
    lines = [r.getMessage() for r in caplog.records if "does nothing" in r.getMessage()]
    assert len(lines) == 1 and "'blue'" in lines[0] and "\n" not in lines[0]
    caplog.clear()
    # an unchanged word keeps its window: no warning
    code = main(["edit", str(small), "-s", SOURCE, "-t", TARGET, "-o", str(out), *FAST, *model_args(tiny_model_dir),
                 "--cross-replace-changed", "0", "--reweight", "circle=3"])
    assert code == 0 and not [r for r in caplog.records if "does nothing" in r.getMessage()]


def test_warnings_escape_control_characters_of_prompts(small, tmp_path, tiny_model_dir, caplog):
    target = "a blue\x1b]0;owned\x07 circle on a white background"
    code = main(["edit", str(small), "-s", SOURCE, "-t", target, "-o", str(tmp_path / "o.png"), *FAST,
                 *model_args(tiny_model_dir), "--cross-replace-changed", "0", "--reweight", "blue\x1b]0;owned\x07=2"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert code == 0 and any("does nothing" in w for w in warnings)
    assert all(no_control_chars(w) for w in warnings)
    assert any("\\x1b]0;owned\\x07" in w for w in warnings)


def test_edit_output_never_replaces_its_own_mask(small, tmp_path, tiny_model_dir, capsys):
    mask = tmp_path / "m.png"
    Image.new("L", (32, 32), 255).save(mask)
    before = mask.read_bytes()
    code = main(["edit", str(small), "-s", SOURCE, "-t", TARGET, "-o", str(tmp_path / "." / "m.png"), "--mask",
                 str(mask), *FAST, *model_args(tiny_model_dir)])
    assert code == 2 and "error" in capsys.readouterr().err
    assert mask.read_bytes() == before


def test_attention_refuses_an_input_under_its_fixed_names_and_clears_stale_maps(small, tmp_path, tiny_model_dir,
                                                                                 capsys):
    folder = tmp_path / "maps"
    folder.mkdir()
    shutil.copy(small, folder / "edited.png")
    before = (folder / "edited.png").read_bytes()
    code = main(["attention", str(folder / "edited.png"), "-s", SOURCE, "-t", TARGET, "-o", str(folder), *FAST,
                 *model_args(tiny_model_dir)])
    assert code == 2 and (folder / "edited.png").read_bytes() == before
    capsys.readouterr()
    again = tmp_path / "again"
    again.mkdir()
    (again / "target-09-zebra.png").write_bytes(before)  # a map of an earlier run with other words
    (again / "notes.png").write_bytes(before)  # not ours
    code = main(["attention", str(small), "-s", SOURCE, "-t", TARGET, "-o", str(again), *FAST,
                 *model_args(tiny_model_dir)])
    assert code == 0
    assert not (again / "target-09-zebra.png").exists() and (again / "notes.png").exists()
    assert (again / "overview.png").is_file()


def test_thin_image_is_refused_by_its_work_size_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch,
                                                                        capsys):
    import dit4edit.cli as cli

    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 4096), "white").save(thin)  # a tall strip: 4096 px, but 16x that to work on
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["edit", str(thin), "-s", SOURCE, "-t", TARGET, "-o", str(tmp_path / "o.png"), "--max-pixels",
                 "4096", *FAST, *model_args(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_oversized_model_config_is_one_line_before_loading(small, tmp_path, tiny_model_dir, monkeypatch, capsys):
    import dit4edit.cli as cli

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    config_path = copy / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [*config["block_out_channels"][:-1], 10**6]
    config_path.write_text(json.dumps(config))
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["edit", str(small), "-s", SOURCE, "-t", TARGET, "-o", str(tmp_path / "o.png"), *FAST,
                 *model_args(copy)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "over the limit" in err and "vae" in err


def test_non_finite_result_is_an_error_and_nothing_is_written(small, tmp_path, tiny_model_dir, monkeypatch, capsys):
    import dit4edit.cli as cli

    load = cli.load_pipeline

    def overflowing(*args, **kwargs):  # a model whose output overflows to infinity: its latents are not finite
        pipe = load(*args, **kwargs)
        pipe.transformer.proj_out.register_forward_hook(lambda module, inputs, output: output * float("inf"))
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", overflowing)
    out = tmp_path / "o.png"
    code = main(["edit", str(small), "-s", SOURCE, "-t", TARGET, "-o", str(out), *FAST, *model_args(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "finite" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.png"]


def test_generate_takes_max_pixels_and_writes_a_255_character_name(tmp_path, tiny_model_dir, capsys):
    base = ["generate", "-p", TARGET, "--width", "64", "--height", "64", *GEN, *model_args(tiny_model_dir)]
    refused = tmp_path / "big.png"
    assert main([*base, "-o", str(refused), "--max-pixels", "1000"]) == 2
    assert "limit of 1000" in capsys.readouterr().err and not refused.exists()
    long = tmp_path / ("g" * 251 + ".png")
    assert main([*base, "-o", str(long), "--max-pixels", "4096"]) == 0
    assert Image.open(long).size == (64, 64)
    assert [p.name for p in tmp_path.iterdir()] == [long.name]  # no temporary left


def test_zero_width_and_control_character_prompts_on_the_command_line(small, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "o.png"
    for target in ("\u2060\u200d", "\u200c \ufeff"):
        assert main(["edit", str(small), "-s", SOURCE, "-t", target, "-o", str(out), *FAST,
                     *model_args(tiny_model_dir)]) == 2
        assert "target prompt" in capsys.readouterr().err
    assert main(["generate", "-p", "\u200b\u200b", "-o", str(out), *GEN, *model_args(tiny_model_dir)]) == 2
    capsys.readouterr()
    code = main(["edit", str(small), "-s", SOURCE, "-t", TARGET, "-o", str(out), *FAST, *model_args(tiny_model_dir),
                 "--reweight", "\x1b[2J\x00=2"])
    err = capsys.readouterr().err
    assert code == 2 and no_control_chars(err) and "\\x1b" in err
    assert not out.exists()


def test_make_tiny_model_interrupted_leaves_no_partial_folder(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from dit4edit.pipeline import DiT4EditPipeline

    def half_then_interrupt(self, folder, *args, **kwargs):  # killed after the first components are written
        (Path(folder) / "text_encoder").mkdir(parents=True)
        (Path(folder) / "text_encoder" / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(DiT4EditPipeline, "save_pretrained", half_then_interrupt)
    target = tmp_path / "models" / "tiny"
    assert main(["make-tiny-model", str(target)]) == 130
    assert not target.exists() and list((tmp_path / "models").iterdir()) == []


def test_write_error_is_one_line(tmp_path, monkeypatch, capsys, tiny_model_dir):
    import errno

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "sub" / "g.png"
    code = main(["generate", "-p", TARGET, "--width", "32", "--height", "32", "-o", str(out), *GEN,
                 *model_args(tiny_model_dir)])
    err = capsys.readouterr().err
    assert code != 0 and code != 1 and len(err.strip().splitlines()) == 1 and "internal" not in err
    assert not out.exists() and not out.parent.exists()  # nor the folder made for it


# --- batch specs ---------------------------------------------------------------------------------------------------


def test_batch_output_never_replaces_its_inputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    random_image(32, 32).save(out / "a-0.png")
    random_image(32, 32).save(tmp_path / "in.png")
    Image.new("L", (32, 32), 255).save(out / "b-0.png")
    spec = spec_file(tmp_path, [item("out/a-0.png", id="a"), item(id="b", mask="out/b-0.png"), item(id="c")])
    jobs = batch.read_spec(spec, out=out)
    assert jobs[0].error and jobs[1].error and jobs[2].error is None
    # the spec itself where the batch records its results (a shard of its output folder)
    (out / batch.SHARDS).mkdir()
    inside = spec_file(out / batch.SHARDS, [item("../../in.png", id="d")], name="results-00000.jsonl")
    before = inside.read_bytes()
    with pytest.raises(DiT4EditError, match="records its results"):
        batch.read_spec(inside, out=out)
    assert inside.read_bytes() == before


def test_batch_ids_with_a_trailing_newline_or_300_characters_fail_their_item(tmp_path):
    random_image(32, 32).save(tmp_path / "in.png")
    spec = spec_file(tmp_path, [item(id="x\n"), item(id="y" * 300), item(id="\x1b]0;t\x07"),
                                item(id="z", source="\u200b\u2060"), item(id="n", guidance="\x00\x1b[2J"),
                                item(id="ok")])
    jobs = batch.read_spec(spec)
    assert [job.error is None for job in jobs] == [False, False, False, False, False, True]
    assert all(no_control_chars(job.error) for job in jobs[:5])
    assert "source prompt" in jobs[3].error
    assert all("\n" not in out for job in jobs for out in job.outputs)


def test_batch_item_settings_are_strict_and_cannot_raise_max_pixels(tmp_path):
    random_image(32, 32).save(tmp_path / "in.png")
    spec = spec_file(tmp_path, [
        item(id="a", local_blend_changed=False, local_blend="blue"),
        item(id="b", reweight="blue=2, circle=0.5"),
        item(id="c", reweight=["blue=2", "circle=0.5"]),
        item(id="d", reweight={"blue": 2, "circle": 0.5}),
        item(id="e", local_blend_changed="false"),
        item(id="f", max_pixels=10**8),
        item(id="g", steps=2.0000001),
    ])
    jobs = {job.item: job for job in batch.read_spec(spec, Settings(max_pixels=100))}
    control = jobs["a"].request.settings.control
    assert jobs["a"].error is None and control["local_blend_changed"] is False
    weights = [dict(jobs[k].request.settings.control["reweight"]) for k in "bcd"]
    assert weights[0] == weights[1] == weights[2] == {"blue": 2.0, "circle": 0.5}
    assert jobs["e"].error and jobs["f"].error and jobs["g"].error
    assert "max_pixels" in jobs["f"].error


def test_deeply_nested_line_fails_its_item_and_a_bom_is_read(tmp_path):
    random_image(32, 32).save(tmp_path / "in.png")
    nested = '{"id": "deep", "x": ' + "{" * 50000 + "}" * 50000 + "}"
    spec = spec_file(tmp_path, [item(id="first"), nested, item(id="last")], prefix="\ufeff")
    jobs = batch.read_spec(spec)
    assert [job.error is None for job in jobs] == [True, False, True]
    assert jobs[0].item == "first"


def test_batch_resume_redoes_what_changed(tmp_path):
    random_image(32, 32, seed=1).save(tmp_path / "a.png")
    random_image(32, 32, seed=2).save(tmp_path / "b.png")
    out = tmp_path / "out"
    out.mkdir()
    first = batch.read_spec(spec_file(tmp_path, [item("a.png"), item("b.png")]))
    for job in first:
        (out / job.outputs[0]).write_bytes(b"x")
    rows = {job.item: batch._row(job, 0, "run") for job in first}

    def standing(jobs, run="run"):
        return [batch.still_done(rows.get(job.item), job, 0, out, run) for job in jobs]

    assert standing(first) == [True, True]
    # a line inserted before them: their default ids now name other items
    inserted = batch.read_spec(spec_file(tmp_path, [item("b.png"), item("a.png"), item("b.png")]))
    assert standing(inserted)[:2] == [False, False]
    assert standing(batch.read_spec(spec_file(tmp_path, [item("a.png", targets=["a green circle"])]))) == [False]
    assert standing(batch.read_spec(spec_file(tmp_path, [item("a.png", guidance=3.0)]))) == [False]
    assert standing(first, run="another model") == [False, False]
    random_image(32, 32, seed=3).save(tmp_path / "a.png")  # the image changed under the same name
    assert standing(batch.read_spec(spec_file(tmp_path, [item("a.png"), item("b.png")]))) == [False, True]
    (out / first[1].outputs[0]).unlink()  # a deleted output
    assert standing(first[1:]) == [False]


def test_batch_model_key_follows_its_weights(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    before = batch.run_key(str(copy), local=True)
    weights = next(copy.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")
    assert batch.run_key(str(copy), local=True) != before


def test_batch_removes_only_its_own_temporaries_and_skips_foreign_rows(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / batch.SHARDS).mkdir()
    mine = out / f"{imgs.TEMP_PREFIX}abcd1234{imgs.TEMP_SUFFIX}"  # as a killed run of ours leaves one
    theirs = [out / ".draft.tmp", out / "sub" / ".n.tmp", out / "keep.tmp", out / "sub" / mine.name]
    for path in [*theirs, mine]:
        path.write_text("x")
    assert imgs.is_temp_file(mine)
    (out / batch.SHARDS / "results-00000.jsonl").write_text(
        json.dumps({"item": ["x"], "target": 0}) + "\n" + json.dumps({"item": {"a": 1}, "target": 0}) + "\n")
    random_image(32, 32).save(tmp_path / "in.png")
    jobs = batch.read_spec(spec_file(tmp_path, [item(id="bad", steps="two")]), out=out)
    rows = batch.run_jobs(jobs, out, lambda: pytest.fail("nothing to load"), batch.Processes(cpu=True),
                          disable_progress=True)
    assert [row["status"] for row in rows] == ["failed"]
    assert all(path.exists() for path in theirs)  # another's, or in a folder this run does not write to
    assert not mine.exists()


def test_each_finished_target_is_recorded_at_once(tmp_path, monkeypatch):
    random_image(32, 32).save(tmp_path / "in.png")
    out = tmp_path / "out"
    jobs = batch.read_spec(spec_file(tmp_path, [item(targets=[TARGET, "a green circle on a white background"])]),
                           out=out)

    class Result:
        images = [random_image(32, 32)]

    def run(pipe, request, inversion=None, targets=(), **kwargs):
        if targets == [1]:
            raise KeyboardInterrupt
        return Result(), "inversion"

    monkeypatch.setattr(batch, "run_request", run)
    with pytest.raises(KeyboardInterrupt):
        batch.run_jobs(jobs, out, lambda: object(), batch.Processes(cpu=True), disable_progress=True)
    rows = batch.read_rows(out / batch.SHARDS / "results-00000.jsonl")
    assert [(row["target"], row["status"]) for row in rows] == [(0, "ok")]


def test_a_failed_output_leaves_no_image(tmp_path, monkeypatch):
    random_image(32, 32).save(tmp_path / "in.png")
    out = tmp_path / "out"
    jobs = batch.read_spec(spec_file(tmp_path, [item()]), out=out)

    class Result:
        images = [random_image(32, 32)]

    monkeypatch.setattr(batch, "run_request", lambda *args, **kwargs: (Result(), "inversion"))

    def scorer(job, k, image):
        raise ValueError("the benchmark's mask does not fit")

    rows = list(batch.run_job(object(), jobs[0], out, scorer=scorer))
    assert rows[0]["status"] == "failed" and "mask" in rows[0]["error"]
    assert not (out / jobs[0].outputs[0]).exists()


def test_missing_batch_mask_is_named_as_a_mask(tmp_path, tiny_pipe):
    random_image(32, 32).save(tmp_path / "in.png")
    out = tmp_path / "out"
    jobs = batch.read_spec(spec_file(tmp_path, [item(mask="gone/nomask.png")]), out=out)
    rows = list(batch.run_job(tiny_pipe, jobs[0], out))
    assert rows[0]["status"] == "failed" and "mask" in rows[0]["error"]
    assert "input image" not in rows[0]["error"]


# --- PIE-Bench -----------------------------------------------------------------------------------------------------


def pie_folder(tmp_path, entries, bom=False):
    data = tmp_path / "pie"
    (data / "annotation_images").mkdir(parents=True)
    for entry in entries.values():
        path = data / "annotation_images" / entry.get("image_path", "none.png")
        if isinstance(entry.get("image_path"), str) and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            random_image(32, 32).save(path, format="PNG")
    (data / "mapping_file.json").write_text(("\ufeff" if bom else "") + json.dumps(entries), encoding="utf-8")
    return data


def pie_entry(image_path="0/a.png", **extra):
    return {"image_path": image_path, "original_prompt": "a [red] circle", "editing_prompt": "a [blue] circle",
            "editing_type_id": "0", "blended_word": "red blue", "mask": [0, 4], **extra}


def test_pie_entries_are_checked_before_any_edit(tmp_path):
    from dit4edit import piebench

    entries = {"000": pie_entry(), "001": pie_entry("0/b.png", editing_prompt=["a blue circle"]),
               "002": pie_entry("0/c.png", mask=[3]), "003": pie_entry("0/d.gif"),
               "004": pie_entry("0/a.png"), "005": pie_entry("0/e.png", original_prompt={"x": 1}),
               "006": pie_entry("0/f.png", original_prompt="[\u200b]\u200c")}
    data = pie_folder(tmp_path, entries, bom=True)
    jobs = {job.item: job for job in piebench.read_benchmark(data)}
    assert jobs["000"].error is None
    for key in ("001", "002", "003", "004", "005"):
        assert jobs[key].error and key in jobs[key].error, key
    assert "gif" in jobs["003"].error and "source prompt" in jobs["006"].error


def test_pie_output_folder_is_not_its_data_folder(tmp_path, tiny_model_dir, capsys):
    data = pie_folder(tmp_path, {"000": pie_entry()})
    link = tmp_path / "link"
    link.symlink_to(data)
    before = (data / "annotation_images" / "0" / "a.png").read_bytes()
    code = main(["pie-bench", "--data", str(data), "-o", str(link), "--metrics", "psnr", *FAST,
                 *model_args(tiny_model_dir)])
    assert code == 2 and "input folder" in capsys.readouterr().err
    assert (data / "annotation_images" / "0" / "a.png").read_bytes() == before


def test_pie_rerun_with_other_settings_redoes_its_rows_and_says_so(tmp_path, tiny_model_dir, capsys):
    data = pie_folder(tmp_path, {"000": pie_entry(), "001": pie_entry("1/b.png")})
    out = tmp_path / "out"
    base = ["pie-bench", "--data", str(data), "-o", str(out), "--metrics", "psnr", "--inversion", "ddim", "--quiet",
            *model_args(tiny_model_dir)]
    assert main([*base, "--steps", "2"]) == 0
    first = batch.read_rows(out / batch.RESULTS)
    assert main([*base, "--steps", "3", "--guidance", "3"]) == 0
    second = batch.read_rows(out / batch.RESULTS)
    assert [row["status"] for row in second] == ["ok", "ok"]
    assert all(a["key"] != b["key"] for a, b in zip(first, second))
    summary = (out / "summary.md").read_text()
    assert "steps 3, guidance 3" in summary and "steps 2" not in summary
    assert (data / "annotation_images" / "0" / "a.png").is_file()  # the benchmark's own images are untouched


# --- the web editor and the Python API -------------------------------------------------------------------------------


def test_rgba_mask_means_the_same_region_on_the_command_line_and_the_brush(tmp_path):
    from dit4edit.app import editor_mask
    from dit4edit.masks import load_mask

    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((20, 20, 20, 255), (4, 8, 20, 24))  # dark but painted
    layer.save(tmp_path / "m.png")
    cli_mask = np.asarray(load_mask(str(tmp_path / "m.png"), (32, 32))) > 127
    brush = np.asarray(editor_mask({"layers": [layer]})) > 127
    assert cli_mask.sum() == 16 * 16 and (cli_mask == brush).all()


def test_web_mask_layers_are_bounded_and_messages_hold_no_server_paths():
    from dit4edit.app import MAX_LAYER_SIDE, _for_client, editor_mask

    with pytest.raises(DiT4EditError):
        editor_mask({"layers": [Image.new("RGBA", (MAX_LAYER_SIDE + 1, 2))]})
    with pytest.raises(DiT4EditError):
        editor_mask({"layers": [b"\x89PNG not an image"]})
    with pytest.raises(DiT4EditError):
        editor_mask({"layers": [Image.new("RGBA", (8, 8)), Image.new("RGBA", (8, 9))]})
    upload = "/tmp/gradio/0123abcd/secret-name.png"
    message = _for_client(f"cannot read {upload}: truncated\x1b[0m", upload)
    assert "/tmp/gradio" not in message and "secret-name.png" in message and no_control_chars(message)


def test_web_server_bounds_uploads_and_cleans_its_cache(tiny_pipe, monkeypatch):
    pytest.importorskip("gradio")
    from dit4edit import app as web

    launched = {}

    class Fake:
        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(web, "build_app", lambda editor: Fake())
    web.serve(web.Editor(tiny_pipe), port=7999)
    assert launched.get("max_file_size") and launched.get("show_error") is False
    monkeypatch.undo()
    page = web.build_app(web.Editor(tiny_pipe))
    assert page.delete_cache and page.delete_cache[1] > 0  # uploads removed while serving and when it stops


def test_web_api_types_are_strict(tiny_pipe):
    gr = pytest.importorskip("gradio")
    from dit4edit import app as web

    edit = web._edit_handler(web.Editor(tiny_pipe), gr)
    image = random_image(32, 32)
    page = dict(steps=2, guidance=4.5, inversion="ddim", tol=None, self_replace_steps=None, self_layers="",
                cross_replace_steps=None, edit_mode=None, reweight="", local_blend="", local_blend_changed=False,
                merging=True, direct_inversion=False)
    for bad in ({"steps": 2.7}, {"local_blend_changed": "no"}, {"merging": "no"}, {"steps": True}):
        with pytest.raises(gr.Error):
            edit(image, SOURCE, TARGET, **{**page, **bad})


def test_web_editor_refuses_thin_images_and_invisible_prompts_before_inverting(tiny_pipe, monkeypatch):
    from dit4edit import app as web

    monkeypatch.setattr(web, "invert", lambda *a, **k: pytest.fail("inverted"))
    editor = web.Editor(tiny_pipe, settings=Settings(max_pixels=2048))
    with pytest.raises(DiT4EditError):
        editor.edit(Image.new("RGB", (2048, 1), "white"), SOURCE, TARGET)
    with pytest.raises(DiT4EditError):
        editor.edit(random_image(32, 32), SOURCE, "\u200b\u2063")
    with pytest.raises(DiT4EditError):
        EditRequest(targets=(TARGET,), source="\ufeff\u200e", image="x.png").check()


def test_python_api_refuses_wrong_arguments(tiny_pipe, tmp_path):
    from dataclasses import replace

    inversion = tiny_pipe.invert(random_image(32, 32), SOURCE, 2, 4.5, "ddim")
    short = replace(inversion, trajectory=inversion.trajectory[:1])
    with pytest.raises(DiT4EditError):
        tiny_pipe.edit(short, [TARGET])
    wide = replace(inversion, trajectory=torch.cat([inversion.trajectory] * 2, dim=-1))  # not its image's shape
    with pytest.raises(DiT4EditError):
        tiny_pipe.edit(wide, [TARGET])
    with pytest.raises(DiT4EditError):
        tiny_pipe.edit(replace(inversion, method="no-such-method"), [TARGET])
    with pytest.raises(DiT4EditError):
        tiny_pipe.generate(TARGET, 32, 32, 2, generator=7)
    with pytest.raises(DiT4EditError):
        inversion.save(tmp_path)
    huge = replace(inversion, trajectory=torch.full_like(inversion.trajectory, 1e30))
    with pytest.raises(DiT4EditError):
        tiny_pipe.edit(huge, [TARGET])
