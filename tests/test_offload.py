"""Memory options: diffusers' CPU offloading and VAE tiling/slicing with `invert` and `edit`, on the CPU.

accelerate's offload hooks move each model (or layer) to an execution device when it runs. Without a GPU the
execution device here is the CPU: model offload then exercises the hooks and the hand-over between models;
sequential offload keeps the weights on the meta device between calls, so anything that takes its device from the
parameters instead of the hooks fails. What only a GPU shows (host-device copies, peak memory) is not tested here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from conftest import SOURCE, TARGET, fresh_pipe, random_image, relative_error

from dit4edit.cli import main
from dit4edit.merging import MergeConfig
from dit4edit.pipeline import DiT4EditPipeline

MERGE = MergeConfig(ratio=0.5, stride=(2, 2), min_tokens=0, merge_ff=True)  # merging applies at 64 px


@pytest.fixture(scope="module")
def reference():
    """Inversion and edits (unmerged, merged) of the plain pipeline, without any memory option."""
    pipe = fresh_pipe()
    image = random_image(64, 64)
    inversion = pipe.invert(image, SOURCE, num_inference_steps=4, method="dpm")
    return image, inversion, pipe.edit(inversion, TARGET), pipe.edit(inversion, TARGET, merge=MERGE)


def sequential_offload_on_cpu(pipe: DiT4EditPipeline) -> None:
    """The hooks `enable_sequential_cpu_offload` installs, with the CPU as execution device. (diffusers names that
    device `cpu:0`, which accelerate's weight hand-over does not handle, so the hooks are installed directly.)"""
    for name in ("text_encoder", "transformer", "vae"):
        model = getattr(pipe, name)
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)


def check_same_as_reference(pipe, reference):
    image, inversion, edited, merged = reference
    mine = pipe.invert(image, SOURCE, num_inference_steps=4, method="dpm")
    assert relative_error(mine.trajectory, inversion.trajectory) < 1e-5
    assert relative_error(pipe.edit(mine, TARGET).latents, edited.latents) < 1e-5
    assert relative_error(pipe.edit(mine, TARGET, merge=MERGE).latents, merged.latents) < 1e-5


def test_model_offload_gives_the_same_edit(reference):
    pipe = fresh_pipe()
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._all_hooks and pipe._execution_device.type == "cpu"
    check_same_as_reference(pipe, reference)
    assert pipe._all_hooks  # each method hands the models back and keeps offloading installed


def test_sequential_offload_gives_the_same_edit(reference):
    pipe = fresh_pipe()
    sequential_offload_on_cpu(pipe)
    assert next(pipe.transformer.parameters()).device.type == "meta"  # weights wait off the execution device
    check_same_as_reference(pipe, reference)


def test_vae_slicing_gives_the_same_images(reference):
    _, inversion, edited, _ = reference
    pipe = fresh_pipe()
    pipe.vae.enable_slicing()
    result = pipe.edit(inversion, TARGET)  # decodes source and target rows one at a time
    assert relative_error(result.latents, edited.latents) < 1e-5
    for mine, theirs in ((result.images[0], edited.images[0]), (result.reconstruction, edited.reconstruction)):
        difference = np.abs(np.asarray(mine, dtype=int) - np.asarray(theirs, dtype=int))
        assert difference.max() <= 1  # a rounding step at most


def test_vae_tiling_runs_tiled_and_is_exact_within_one_tile(reference, monkeypatch):
    image, inversion, edited, _ = reference
    pipe = fresh_pipe()
    pipe.vae.enable_tiling()  # the tiny VAE's tiles are 64 px (its sample_size)
    assert relative_error(pipe.edit(inversion, TARGET).latents, edited.latents) < 1e-5  # 64 px: one tile
    calls = []
    for method in ("_tiled_encode", "tiled_decode"):
        original = getattr(pipe.vae, method)
        monkeypatch.setattr(pipe.vae, method, lambda *a, _f=original, _m=method, **k: calls.append(_m) or _f(*a, **k))
    big = pipe.invert(random_image(128, 96), SOURCE, num_inference_steps=2, method="dpm")
    result = pipe.edit(big, TARGET)
    assert "_tiled_encode" in calls and "tiled_decode" in calls
    assert result.images[0].size == (128, 96)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_offload_without_gpu_is_one_line_error_before_loading(device, tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.png"
    random_image(32, 32).save(source)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(DiT4EditPipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["edit", str(source), "-s", SOURCE, "-t", TARGET, "-o", str(tmp_path / "out.png"),
                 "--model", str(tmp_path), "--offload", "model", "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and "--offload model needs a GPU" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()


def test_vae_tiling_flag_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    enabled = []
    for method in ("enable_tiling", "enable_slicing"):
        original = getattr(AutoencoderKL, method)
        monkeypatch.setattr(AutoencoderKL, method,
                            lambda self, *a, _f=original, _m=method, **k: enabled.append(_m) or _f(self, *a, **k))
    source, output = tmp_path / "in.png", tmp_path / "out.png"
    random_image(80, 48).save(source)
    code = main(["edit", str(source), "-s", SOURCE, "-t", TARGET, "-o", str(output), "--model", str(tiny_model_dir),
                 "--steps", "2", "--inversion", "ddim", "--vae-tiling", "--quiet"])
    assert code == 0 and sorted(enabled) == ["enable_slicing", "enable_tiling"]
    from PIL import Image

    assert Image.open(output).size == (80, 48)
