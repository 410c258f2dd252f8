"""Inversion files are untrusted input: every key, type, size and value is checked on load (one-line errors)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SOURCE, random_image
from safetensors.torch import save_file

from dit4edit import images
from dit4edit.errors import DiT4EditError
from dit4edit.inversion_file import MAX_LATENT, Inversion, check_model, model_record

STEPS = 3


@pytest.fixture(scope="module")
def saved(tiny_pipe, tmp_path_factory):
    inversion = tiny_pipe.invert(random_image(32, 48), SOURCE, STEPS, method="ddim")
    path = inversion.save(tmp_path_factory.mktemp("inv") / "inv.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["dit4edit"])
    return inversion, meta


def write(path, trajectory, meta):
    metadata = {"dit4edit": meta if isinstance(meta, str) else json.dumps(meta)}
    save_file({"trajectory": trajectory} if isinstance(trajectory, torch.Tensor) else trajectory, str(path),
              metadata=metadata)
    return path


def test_saved_file_records_the_model_and_loads(saved, tmp_path):
    inversion, meta = saved
    assert meta["model"]["latent_channels"] == 4 and meta["model"]["vae_scale_factor"] == 8
    assert 16 <= len(meta["model"]["probe"]) <= 32  # the first 8 values of 4 parameters (biases may be shorter)
    loaded = Inversion.load(write(tmp_path / "ok.safetensors", inversion.trajectory.float(), meta))
    assert loaded.model == inversion.model and loaded.original_size == (32, 48)


def changed(meta, **updates):
    return {**meta, **updates}


def without(meta, key):
    return {k: v for k, v in meta.items() if k != key}


BAD_META = [
    (lambda m: [1, 2], "is a JSON list"),
    (lambda m: "not json {", "metadata is not valid JSON"),
    (lambda m: without(m, "model"), "missing model"),
    (lambda m: without(m, "source_prompt"), "missing source_prompt"),
    (lambda m: changed(m, surprise=1), "unknown key(s) surprise"),
    (lambda m: changed(m, num_inference_steps="3"), "num_inference_steps must be an integer"),
    (lambda m: changed(m, num_inference_steps=0), "num_inference_steps must be between 1 and 1000"),
    (lambda m: changed(m, guidance_scale=float("nan")), "guidance_scale"),
    (lambda m: changed(m, method="euler"), "unknown method 'euler'"),
    (lambda m: changed(m, original_size=[32]), "original_size must be [width, height]"),
    (lambda m: changed(m, original_size=[-32, 48]), "original_size must be between"),
    (lambda m: changed(m, source_prompt=7), "source_prompt must be non-empty text"),
    (lambda m: changed(m, residuals="small"), "residuals must be a list"),
    (lambda m: changed(m, extra=[]), "extra must be a JSON object"),
    (lambda m: changed(m, model={"name": "x"}), "model must be an object"),
]


@pytest.mark.parametrize("edit, message", BAD_META)
def test_bad_metadata_is_one_line_error(saved, tmp_path, edit, message):
    inversion, meta = saved
    path = write(tmp_path / "bad.safetensors", inversion.trajectory.float(), edit(meta))
    with pytest.raises(DiT4EditError, match="not a valid dit4edit inversion file") as info:
        Inversion.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_image_size_is_checked_against_the_pixel_limit_before_loading(saved, tmp_path):
    inversion, meta = saved
    huge = write(tmp_path / "huge.safetensors", inversion.trajectory.float(), changed(meta, original_size=[12000, 12000]))
    with pytest.raises(DiT4EditError, match="over the limit of 4194304"):
        Inversion.load(huge)
    path = write(tmp_path / "ok.safetensors", inversion.trajectory.float(), meta)
    with pytest.raises(DiT4EditError, match="over the limit of 1000"):
        Inversion.load(path, max_pixels=1000)


@pytest.mark.parametrize("shape_of", [
    lambda t: t[0],  # 3-D
    lambda t: t.flatten(),  # 1-D
    lambda t: t.repeat(1, 4, 1, 1),  # 16 channels
    lambda t: t[:, :, :5],  # odd height
    lambda t: t[:2],  # too few points for the steps
    lambda t: torch.cat([t, t]),  # more points than steps
])
def test_trajectory_shape_must_fit_the_settings(saved, tmp_path, shape_of):
    inversion, meta = saved
    path = write(tmp_path / "shape.safetensors", shape_of(inversion.trajectory.float()).contiguous(), meta)
    with pytest.raises(DiT4EditError, match=r"its trajectory is \[.*need \[4, 4, 6, 4\]"):
        Inversion.load(path)


def test_other_tensors_and_non_finite_values(saved, tmp_path):
    inversion, meta = saved
    trajectory = inversion.trajectory.float().clone()
    extra = write(tmp_path / "extra.safetensors", {"trajectory": trajectory, "x": torch.zeros(1)}, meta)
    with pytest.raises(DiT4EditError, match="expected trajectory"):
        Inversion.load(extra)
    with pytest.raises(DiT4EditError, match="its trajectory is torch.int32, not float32"):
        Inversion.load(write(tmp_path / "int.safetensors", trajectory.int(), meta))
    trajectory[1, 0, 0, 0] = float("nan")
    with pytest.raises(DiT4EditError, match="NaN or infinite"):
        Inversion.load(write(tmp_path / "nan.safetensors", trajectory, meta))
    with pytest.raises(DiT4EditError, match="inversion file not found"):
        Inversion.load(tmp_path / "missing.safetensors")


def test_inversion_from_another_model_is_refused(saved, tiny_pipe):
    from dit4edit.pipeline import DiT4EditPipeline
    from dit4edit.tiny import tiny_components

    inversion, _ = saved
    assert tiny_pipe.check_inversion(inversion) is inversion
    other = DiT4EditPipeline(**tiny_components(seed=1))
    with pytest.raises(DiT4EditError, match="made by another model"):
        other.edit(inversion, SOURCE)
    half = DiT4EditPipeline(**tiny_components(seed=0)).to(torch.bfloat16)  # same weights, other precision
    assert half.check_inversion(inversion) is inversion
    wide = Inversion(**{**inversion.__dict__, "model": {**inversion.model, "latent_channels": 16}})
    with pytest.raises(DiT4EditError, match="16 latent channels; this model has 4"):
        tiny_pipe.edit(wide, SOURCE)


def test_save_is_atomic_and_leaves_no_temporary_file(saved, tmp_path):
    inversion, _ = saved
    inversion.save(tmp_path / "a.safetensors")
    inversion.save(tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# --- sizes as worked on, values as real latents reach -------------------------------------------------------------


@pytest.mark.parametrize("size", [[2, 3000], [5000, 1]])
def test_thin_image_of_an_inversion_is_limited_by_its_work_size(saved, tmp_path, size):
    inversion, meta = saved
    work = images.work_size(tuple(size))
    limit = 4 * size[0] * size[1]  # the file's own pixels are well within it, the worked-on ones are not
    assert work[0] * work[1] > limit
    path = write(tmp_path / "thin.safetensors", inversion.trajectory.float(), changed(meta, original_size=size))
    with pytest.raises(DiT4EditError, match=f"worked on at {work[0]}x{work[1]}.*over the limit of {limit}"):
        Inversion.load(path, max_pixels=limit)


def test_trajectory_values_beyond_real_latents_are_refused(saved, tmp_path):
    inversion, meta = saved
    trajectory = inversion.trajectory.float().clone()
    trajectory[-1, 3, 5, 2] = -2 * MAX_LATENT  # one finite value in the encoded image, far beyond any latent
    with pytest.raises(DiT4EditError, match="trajectory holds values up to 2e\\+04") as info:
        Inversion.load(write(tmp_path / "far.safetensors", trajectory, meta))
    assert "\n" not in str(info.value)
    loud = Inversion(**{**inversion.__dict__, "trajectory": inversion.trajectory * 1e30})
    with pytest.raises(DiT4EditError, match="trajectory holds values up to"):
        loud.check()
    assert inversion.check() is inversion


@pytest.mark.parametrize("change, message", [
    (lambda inv: {"trajectory": inv.trajectory[:3]}, "trajectory is \\[3, 4, 6, 4\\]; 3 steps of a 32x48"),
    (lambda inv: {"trajectory": inv.trajectory[:, :, :, :2]}, "need \\[4, 4, 6, 4\\]"),
    (lambda inv: {"trajectory": inv.trajectory.int()}, "must be a float tensor"),
    (lambda inv: {"trajectory": inv.trajectory.tolist()}, "must be a float tensor, got list"),
    (lambda inv: {"num_inference_steps": 2.0}, "num_inference_steps must be an integer"),
    (lambda inv: {"method": "euler"}, "unknown method"),
    (lambda inv: {"source_prompt": "\u200b"}, "source_prompt must be non-empty"),
    (lambda inv: {"model": {**inv.model, "probe": []}}, "probe must be a non-empty list"),
])
def test_inversion_built_in_python_gets_the_checks_of_a_file(saved, change, message):
    inversion, _ = saved
    bad = Inversion(**{**inversion.__dict__, **change(inversion)})
    with pytest.raises(DiT4EditError, match=message) as info:
        bad.check()
    assert "\n" not in str(info.value)


# --- which model made it ------------------------------------------------------------------------------------------


def test_model_record_is_a_fingerprint_not_a_local_path(tiny_pipe, tmp_path):
    folder = tmp_path / "private" / "my-model"
    folder.mkdir(parents=True)
    record = model_record(tiny_pipe.transformer, tiny_pipe.vae, str(folder))
    assert record["name"] == "my-model" and str(tmp_path) not in json.dumps(record)
    assert model_record(tiny_pipe.transformer, tiny_pipe.vae, "owner/model-x")["name"] == "owner/model-x"
    assert len(record["fingerprint"]) == 16 and int(record["fingerprint"], 16) >= 0
    assert model_record(tiny_pipe.transformer, tiny_pipe.vae, "elsewhere")["fingerprint"] == record["fingerprint"]
    check_model(record, record)


def test_fingerprint_and_check_tell_other_weights_apart(tiny_pipe):
    from dit4edit.tiny import tiny_components

    ours = model_record(tiny_pipe.transformer, tiny_pipe.vae, "a")
    other = tiny_components(seed=1)
    theirs = model_record(other["transformer"], other["vae"], "a")
    assert theirs["fingerprint"] != ours["fingerprint"]
    with pytest.raises(DiT4EditError, match="made by another model \\(a\\)"):
        check_model(theirs, ours)


@pytest.mark.parametrize("probe_change", [
    lambda model: {**model, "probe": []},
    lambda model: {key: value for key, value in model.items() if key != "probe"},
    lambda model: {**model, "probe": None},
])
def test_record_without_a_weight_probe_is_refused(saved, tiny_pipe, tmp_path, probe_change):
    inversion, meta = saved
    record = probe_change(meta["model"])
    with pytest.raises(DiT4EditError, match="model (probe must be a non-empty list|must be an object)"):
        Inversion.load(write(tmp_path / "noprobe.safetensors", inversion.trajectory.float(), changed(meta,
                                                                                                      model=record)))
    with pytest.raises(DiT4EditError, match="no weight probe"):
        check_model(record, model_record(tiny_pipe.transformer, tiny_pipe.vae))


def test_older_file_with_a_path_and_a_probe_still_loads_and_checks(saved, tiny_pipe, tmp_path):
    inversion, meta = saved
    older = changed(meta, model={key: meta["model"][key] for key in ("name", "latent_channels", "vae_scale_factor",
                                                                      "probe")})
    older["model"]["name"] = "/home/someone/models/shapes"
    loaded = Inversion.load(write(tmp_path / "older.safetensors", inversion.trajectory.float(), older))
    check_model(loaded.model, model_record(tiny_pipe.transformer, tiny_pipe.vae))


def test_model_record_reads_offloaded_weights():
    from test_offload import sequential_offload_on_cpu

    from dit4edit.pipeline import DiT4EditPipeline
    from dit4edit.tiny import tiny_components

    pipe = DiT4EditPipeline(**tiny_components(seed=0))
    before = model_record(pipe.transformer, pipe.vae, "m")
    sequential_offload_on_cpu(pipe)  # weights on the meta device, the values in the hooks' copy
    assert next(pipe.transformer.parameters()).device.type == "meta"
    after = model_record(pipe.transformer, pipe.vae, "m")
    assert after == before


WRITE_WHEN_FILES_ARE_CAPPED = """
import resource, signal, sys
from dit4edit.errors import DiT4EditError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap then fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
import torch
from dit4edit.inversion_file import Inversion
inversion = Inversion(torch.zeros(3, 4, 16, 16), "a cat", 2, 4.5, "ddim", (128, 128))
try:
    inversion.save(sys.argv[1])
except DiT4EditError as error:
    print("ERROR", error)
"""


def test_write_error_while_saving_is_one_line_and_leaves_nothing(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "new-folder" / "inv.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", WRITE_WHEN_FILES_ARE_CAPPED, str(out)], capture_output=True,
                            text=True, env=env, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"ERROR cannot write the inversion file {out}: ") and "too large" in lines[0]
    assert list(tmp_path.iterdir()) == []
