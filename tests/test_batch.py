"""Batch editing from a JSONL spec: per-item settings through the CLI's own options, failures recorded, resume after
kill -9, and two processes under torchrun splitting the items."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import SOURCE, TARGET, kill_9_after_first_record, random_image
from PIL import Image

from dit4edit import batch
from dit4edit.cli import EXIT_ITEMS_FAILED, build_parser, main, settings_from_args
from dit4edit.defaults import DEFAULTS
from dit4edit.errors import DiT4EditError
from dit4edit.request import EditRequest, Settings
from dit4edit.request import resolve as resolve_settings

OTHER = "a green circle on a white background"


def write_spec(path, items):
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return path


def command_settings(*extra) -> Settings:
    return settings_from_args(build_parser().parse_args(["batch", "spec.jsonl", "-o", "out", *extra]))


def resolver(*extra):
    command = command_settings(*extra)
    return lambda overrides: resolve_settings(command.with_options(overrides, "setting"))


def test_item_settings_use_the_edit_options():
    resolve = resolver("--steps", "7", "--reweight", "blue=2")
    base = resolve({})
    assert (base.steps, base.guidance, base.inversion, base.pin_source) == (7, 4.5, DEFAULTS.inversion, True)
    assert base.control is not None and base.merge is not None
    item = resolve({"steps": 3, "self-replace-steps": 0.5, "no_merge": True, "free_source": True,
                    "local_blend": "blue circle", "reweight": {"circle": 1.5}, "inversion": "ddim"})
    assert (item.steps, item.inversion, item.merge, item.pin_source) == (3, "ddim", None, False)
    assert not item.direct_inversion and resolve({"direct-inversion": True}).direct_inversion
    assert item.control.self_replace_steps == 0.5
    assert item.control.local_blend_words == ("blue", "circle")
    assert item.control.reweight == {"blue": 2.0, "circle": 1.5}  # the command's reweights, then the item's
    assert resolve({"no_attention_control": True}).control is None
    assert resolve_settings(command_settings("--no-merge").with_options({"no_merge": False})).merge is not None
    assert resolver("--max-pixels", "100")({}).max_pixels == 100  # the operator's cap: an item cannot raise it
    for bad, message in [({"steps": "many"}, "steps"), ({"steps": 2.7}, "steps must be an integer"),
                         ({"inversion": "euler"}, "inversion"), ({"max_pixels": 10**9}, "unknown setting"),
                         ({"local_blend_changed": "yes"}, "true or false"),
                         ({"colour": 1}, "unknown setting 'colour'"), ({"no_merge": "yes"}, "true or false"),
                         ({"model": "x"}, "unknown setting 'model'"), ({"offload": "model"}, "unknown setting"), ({"self_replace_steps": 3}, "[0, 1]")]:
        with pytest.raises(DiT4EditError, match=message.replace("[", r"\[").replace("]", r"\]")):
            resolve(bad)


def test_spec_items_ids_paths_and_bad_lines(tmp_path):
    spec = write_spec(tmp_path / "spec.jsonl", [
        {"image": "a.png", "source": SOURCE, "targets": [TARGET, OTHER]},
        "",
        {"id": "cat", "image": "sub/b.png", "source": SOURCE, "targets": TARGET, "mask": "m.png"},
        {"id": "cat", "image": "c.png", "source": SOURCE, "targets": [TARGET]},
        {"id": "../escape", "image": "c.png", "source": SOURCE, "targets": [TARGET]},
        {"image": "c.png", "targets": [TARGET]},
        {"image": "c.png", "source": SOURCE, "targets": []},
        "[1, 2]",
        "{not json",
    ])
    jobs = batch.read_spec(spec, command_settings())
    assert [job.item for job in jobs] == ["00001", "cat", "cat@line4", "00005", "00006", "00007", "00008", "00009"]
    first, named = jobs[0], jobs[1]
    assert first.outputs == ("00001-0.png", "00001-1.png") and first.request.image == str(tmp_path / "a.png")
    assert named.outputs == ("cat-0.png",) and named.request.settings.mask == str(tmp_path / "m.png")
    assert first.error is None and named.error is None
    errors = [job.error for job in jobs[2:]]
    assert "duplicate item id 'cat'" in errors[0] and "must be 1-100 letters" in errors[1]
    assert "'source' is missing" in errors[2] and "'targets' must be" in errors[3]
    assert "not a JSON object" in errors[4] and "not valid JSON" in errors[5]
    assert all("\n" not in error for error in errors)


def test_batch_command_records_each_output_and_goes_on_after_bad_items(tiny_model_dir, tmp_path, capsys):
    for name, seed in (("a.png", 0), ("b.png", 1)):
        random_image(32, 48, seed).save(tmp_path / name)
    spec = write_spec(tmp_path / "spec.jsonl", [
        {"image": "a.png", "source": SOURCE, "targets": [TARGET, OTHER, ""]},
        {"id": "missing", "image": "nope.png", "source": SOURCE, "targets": [TARGET]},
        {"id": "b", "image": "b.png", "source": SOURCE, "targets": [TARGET], "steps": 2, "no_merge": True},
        {"id": "bad-setting", "image": "b.png", "source": SOURCE, "targets": [TARGET], "guidance": "high"},
    ])
    out = tmp_path / "out"
    command = ["batch", str(spec), "-o", str(out), "--model", str(tiny_model_dir), "--steps", "3",
               "--inversion", "ddim", "--quiet"]
    assert main(command) == EXIT_ITEMS_FAILED  # every item that could run ran; the failures are recorded
    rows = batch.read_rows(out / "results.jsonl")
    status = {(row["item"], row["target"]): row["status"] for row in rows}
    assert status == {("00001", 0): "ok", ("00001", 1): "ok", ("00001", 2): "failed", ("missing", 0): "failed",
                      ("b", 0): "ok", ("bad-setting", 0): "failed"}
    for row in rows:
        if row["status"] == "ok":
            assert Image.open(out / row["output"]).size == (32, 48) and row["seconds"] > 0
        else:
            assert row["output"] is None and row["error"] and "\n" not in row["error"]
    assert sorted(path.name for path in out.glob("*.png")) == ["00001-0.png", "00001-1.png", "b-0.png"]
    assert "nope.png" in next(row["error"] for row in rows if row["item"] == "missing")

    # A rerun repeats nothing; with --retry-failed it redoes the failures, which succeed once the image is there.
    stamps = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    assert main(command) == EXIT_ITEMS_FAILED
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")} == stamps
    assert len(batch.read_rows(out / "shards" / "results-00000.jsonl")) == 6
    random_image(32, 32, 2).save(tmp_path / "nope.png")
    assert main([*command, "--retry-failed"]) == EXIT_ITEMS_FAILED
    rows = batch.read_rows(out / "results.jsonl")
    assert len(rows) == 6 and next(row for row in rows if row["item"] == "missing")["status"] == "ok"
    assert "4 done, 2 failed (see" in capsys.readouterr().out


def test_batch_bad_command_is_one_line_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    spec = write_spec(tmp_path / "spec.jsonl", [{"image": "a.png", "source": SOURCE, "targets": [TARGET]}])
    for args, message in [([str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o")], "batch spec not found"),
                          ([str(spec), "-o", str(tmp_path / "file")], "output must be a folder"),
                          ([str(spec), "-o", str(tmp_path / "o"), "--steps", "0"], "--steps must be between 1 and 1000"),
                          ([str(write_spec(tmp_path / "empty.jsonl", [""])), "-o", str(tmp_path / "o")], "no items")]:
        assert main(["batch", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _spec_of(tmp_path, count):
    random_image(32, 32).save(tmp_path / "in.png")
    items = [{"image": "in.png", "source": SOURCE, "targets": [TARGET, OTHER] if k % 3 == 0 else [TARGET]}
             for k in range(count)]
    return write_spec(tmp_path / "spec.jsonl", items), sum(len(item["targets"]) for item in items)


def _check_complete(out, expected):
    rows = batch.read_rows(out / "results.jsonl")
    keys = [(row["item"], row["target"]) for row in rows]
    assert len(rows) == expected and len(set(keys)) == expected
    assert all(row["status"] == "ok" for row in rows)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(row["output"] for row in rows)
    assert not list(out.rglob("*.tmp"))
    for row in rows:
        Image.open(out / row["output"]).load()  # every image whole
    return rows


def test_batch_resumes_after_kill_9_losing_and_repeating_nothing(tiny_model_dir, tmp_path):
    spec, expected = _spec_of(tmp_path, 16)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dit4edit", "batch", str(spec), "-o", str(out), "--model", str(tiny_model_dir),
               "--steps", "3", "--inversion", "ddim", "--quiet"]
    shard = out / "shards" / "results-00000.jsonl"
    kill_9_after_first_record(command, shard)
    first = batch.read_rows(shard)
    assert 0 < len(first) < expected, "the kill came after the run had finished"
    assert shard.read_bytes().endswith(b"\n") and not (out / "results.jsonl").exists()

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _check_complete(out, expected)
    recorded = batch.read_rows(shard)
    assert len(recorded) == expected and recorded[: len(first)] == first  # nothing redone, nothing lost


def test_batch_two_processes_split_the_items_disjointly_and_resume_after_kill_9(tiny_model_dir, tmp_path):
    spec, expected = _spec_of(tmp_path, 12)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dit4edit", "batch", str(spec), "-o", str(out), "--model", str(tiny_model_dir),
               "--steps", "3", "--inversion", "ddim", "--quiet"]
    shard_paths = [out / "shards" / f"results-{rank:05d}.jsonl" for rank in (0, 1)]
    kill_9_after_first_record(command, shard_paths[0])  # the launcher and both workers
    before = sum(len(batch.read_rows(path)) for path in shard_paths)
    assert 0 < before < expected and not (out / "results.jsonl").exists()

    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    _check_complete(out, expected)
    shards = [[(row["item"], row["target"]) for row in batch.read_rows(path)] for path in shard_paths]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    assert len(shards[0]) + len(shards[1]) == expected  # every output recorded once: nothing lost or redone


def test_a_failing_scorer_fails_its_output_and_not_the_batch(tiny_pipe, tmp_path):
    random_image(32, 32).save(tmp_path / "in.png")
    request = EditRequest(targets=(TARGET, OTHER), source=SOURCE, image=tmp_path / "in.png",
                          settings=Settings(steps=2, inversion="ddim"))
    job = batch.make_job("a", 1, request, ("a-0.png", "a-1.png"))

    def scorer(job, k, image):
        if k == 0:
            raise ValueError("run (9, 1) is outside a 2x2 mask\nsecond line")
        return {"score": float(image.size[0])}

    rows = list(batch.run_job(tiny_pipe, job, tmp_path, scorer=scorer))
    assert [row["status"] for row in rows] == ["failed", "ok"]
    assert rows[0]["error"] == "ValueError: run (9, 1) is outside a 2x2 mask" and rows[1]["score"] == 32.0


def test_results_are_written_whole_with_the_umask_mode(tmp_path):
    path = batch.write_atomic(tmp_path / "sub" / "results.jsonl", '{"item": "a"}\n')
    assert path.read_text() == '{"item": "a"}\n' and list(path.parent.iterdir()) == [path]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
