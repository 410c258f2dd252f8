"""DiT4EditPipeline on tiny random PixArt models: loading, sizes, inversion files, the edit loop and its hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SOURCE, TARGET, fresh_pipe, random_image, relative_error

from dit4edit.errors import DiT4EditError
from dit4edit.pipeline import DiT4EditPipeline, Inversion

STEPS = 6


def test_save_pretrained_round_trip(tiny_pipe, tiny_model_dir):
    loaded = DiT4EditPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder"):
        ours, theirs = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    a, trajectory_a = tiny_pipe.generate(SOURCE, 64, 64, STEPS, generator=torch.Generator().manual_seed(3))
    b, trajectory_b = loaded.generate(SOURCE, 64, 64, STEPS, generator=torch.Generator().manual_seed(3))
    # equal weights, other tensors in memory: BLAS may round differently, so equal up to float32 rounding
    assert relative_error(trajectory_b.trajectory, trajectory_a.trajectory) < 1e-5
    import numpy as np

    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_model_folder_errors(tmp_path, tiny_model_dir):
    with pytest.raises(DiT4EditError, match="model folder not found"):
        DiT4EditPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(DiT4EditError, match="no model_index.json"):
        DiT4EditPipeline.from_pretrained(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(DiT4EditError, match="not a PixArt-style pipeline: missing tokenizer, text_encoder"):
        DiT4EditPipeline.from_pretrained(partial)


def test_corrupt_weights_are_one_line_error(tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"garbage")
    with pytest.raises(DiT4EditError, match="cannot load model") as info:
        DiT4EditPipeline.from_pretrained(broken)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("size", [(64, 128), (128, 64), (70, 50)])
def test_edit_keeps_the_input_size(tiny_pipe, size):
    image = random_image(*size)
    inversion = tiny_pipe.invert(image, SOURCE, STEPS, method="ddim")
    work = tuple(16 * int(s / 16 + 0.5) for s in size)
    assert inversion.trajectory.shape == (STEPS + 1, 4, work[1] // 8, work[0] // 8)
    result = tiny_pipe.edit(inversion, TARGET)
    assert result.images[0].size == size and result.reconstruction.size == size


def test_inversion_file_round_trip(tiny_pipe, tmp_path):
    inversion = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, method="ddim-exact")
    path = inversion.save(tmp_path / "inv.safetensors")
    loaded = Inversion.load(path)
    assert torch.allclose(loaded.trajectory, inversion.trajectory, rtol=1e-6, atol=1e-7)
    for field in ("source_prompt", "num_inference_steps", "guidance_scale", "method", "original_size", "nfe"):
        assert getattr(loaded, field) == getattr(inversion, field)
    assert loaded.residuals == pytest.approx(inversion.residuals)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(DiT4EditError, match="not a dit4edit inversion file"):
        Inversion.load(tmp_path / "bad.safetensors")


def test_pinned_source_reproduces_the_input_latent_exactly(tiny_pipe):
    inversion = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, guidance_scale=1.0, method="ddim")
    result = tiny_pipe.edit(inversion, TARGET, guidance_scale=4.5, pin_source=True)
    assert torch.equal(result.latents[0].double(), inversion.input_latent)
    free = tiny_pipe.edit(inversion, TARGET, guidance_scale=4.5, pin_source=False)
    assert not torch.allclose(free.latents[0].double(), inversion.input_latent, atol=1e-3)


def test_free_source_reproduces_input_after_exact_inversion(tiny_pipe):
    inversion = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, method="ddim-exact", tol=1e-6)
    naive = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, method="ddim")
    errors = []
    for inv in (inversion, naive):
        result = tiny_pipe.edit(inv, [SOURCE, TARGET], pin_source=False)
        source = result.latents[0].double()
        errors.append(((source - inv.input_latent).norm() / inv.input_latent.norm()).item())
    # float32 batch-size effects, amplified by a random model at guidance 4.5, stay far below naive inversion's error
    assert errors[0] < 1e-3 and errors[0] * 100 < errors[1], errors
    # identical source and target prompts run identical rows of one batch (rows may round differently)
    assert relative_error(result.latents[1], result.latents[0]) < 1e-5
    assert len(result.images) == 2


def test_direct_inversion_makes_an_identity_edit_return_the_input_after_a_naive_inversion(tiny_pipe):
    # Naive DDIM inversion on a random model at guidance 4.5 is far from exact, so a target branch with the source's
    # own prompt drifts away from the input; taking the pinned source's error of each step keeps it on the input.
    inversion = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, method="ddim")
    plain = tiny_pipe.edit(inversion, [SOURCE, TARGET])
    direct = tiny_pipe.edit(inversion, [SOURCE, TARGET], direct_inversion=True)
    source = inversion.input_latent.float()
    assert relative_error(plain.latents[1], source) > 1e-2
    assert relative_error(direct.latents[1], source) < 1e-4
    assert relative_error(direct.latents[2], source) > 1e-2  # a real edit still changes the picture
    with pytest.raises(DiT4EditError, match="direct inversion .* cannot run with a free source branch"):
        tiny_pipe.edit(inversion, TARGET, pin_source=False, direct_inversion=True)


def test_generate_then_edit_without_inversion(tiny_pipe):
    image, trajectory = tiny_pipe.generate(SOURCE, 64, 128, STEPS, generator=torch.Generator().manual_seed(0))
    assert image.size == (128, 64) and trajectory.method == "generated"
    result = tiny_pipe.edit(trajectory, SOURCE, pin_source=False)
    # the same computation in a batch of two instead of one: equal up to float32 rounding
    assert relative_error(result.latents[1], trajectory.input_latent) < 1e-5
    import numpy as np

    difference = np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(image, dtype=int))
    assert difference.max() <= 1  # decoded in a batch of two instead of one


def test_edit_installs_control_per_step_and_restores(tiny_pipe):
    from dit4edit.control import AttentionControl

    inversion = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, method="ddim")
    before = dict(tiny_pipe.transformer.attn_processors)
    idle = tiny_pipe.edit(inversion, TARGET, control=AttentionControl(enabled=False), record_words=True)
    assert idle.controller.recorded_steps() == list(range(STEPS))  # the loop passed every step index
    assert set(idle.controller.word_maps(0)) >= {"red", "circle"} and set(idle.controller.word_maps(1)) >= {"blue"}
    assert dict(tiny_pipe.transformer.attn_processors) == before
    plain = tiny_pipe.edit(inversion, TARGET, control=None)
    assert plain.controller is None
    assert relative_error(idle.latents, plain.latents) < 1e-5
    controlled = tiny_pipe.edit(inversion, TARGET)  # the default: DiT4Edit's attention control
    assert not torch.allclose(controlled.latents[1], plain.latents[1], atol=1e-3)
    assert torch.equal(controlled.latents[0], plain.latents[0])  # the pinned source branch is untouched


def test_user_mask_keeps_the_source_outside(tiny_pipe):
    from PIL import Image

    inversion = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, method="ddim")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # left half editable
    result = tiny_pipe.edit(inversion, TARGET, mask=mask)
    source, target = result.latents[0], result.latents[1]  # (C, 8, 8)
    assert torch.equal(target[:, :, 4:], source[:, :, 4:])
    assert not torch.allclose(target[:, :, :4], source[:, :, :4], atol=1e-3)
    with pytest.raises(DiT4EditError, match="mask is 32x32, the image is 64x64"):
        tiny_pipe.edit(inversion, TARGET, mask=Image.new("L", (32, 32), 255))


def test_micro_conditions_model_runs_non_square():
    from dit4edit.tiny import tiny_components

    pipe = DiT4EditPipeline(**tiny_components(micro_conditions=True))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.use_additional_conditions
    conditions = pipe._micro_conditions((128, 64), rows=2)
    assert conditions["resolution"].tolist() == [[64, 128], [64, 128]]
    assert conditions["aspect_ratio"].tolist() == [[0.5], [0.5]]
    result = pipe(random_image(128, 64), SOURCE, TARGET, num_inference_steps=3, inversion_method="ddim")
    assert result.images[0].size == (128, 64)


def test_prompt_and_option_errors(tiny_pipe):
    image = random_image(32, 32)
    with pytest.raises(DiT4EditError, match="source prompt is empty"):
        tiny_pipe.invert(image, "   ", STEPS)
    with pytest.raises(DiT4EditError, match="unknown inversion method"):
        tiny_pipe.invert(image, SOURCE, STEPS, method="euler")
    with pytest.raises(DiT4EditError, match="T5 tokens long"):
        tiny_pipe.invert(image, " ".join(["circle"] * 200), STEPS)
    with pytest.raises(DiT4EditError, match="steps must be"):
        tiny_pipe.invert(image, SOURCE, 0)
    inversion = tiny_pipe.invert(image, SOURCE, 2, method="ddim")
    with pytest.raises(DiT4EditError, match="target prompt is empty"):
        tiny_pipe.edit(inversion, "")


def test_reconstruct_reports_metrics(tiny_pipe):
    image = random_image(64, 64)
    output, stats = tiny_pipe.reconstruct(image, SOURCE, STEPS, method="ddim-exact", tol=1e-6)
    assert output.size == (64, 64)
    assert set(stats) >= {"latent_nmse", "nfe", "psnr", "vae_psnr"}
    assert stats["latent_nmse"] < 1e-5 and stats["nfe"] > STEPS
    assert abs(stats["psnr"] - stats["vae_psnr"]) < 0.5  # exact inversion loses almost nothing beyond the VAE
    assert stats["step_residual"] < 1e-4  # every step solved (~2e-6 here: float32 stops the clean end near tol)
    assert tiny_pipe.reconstruct(image, SOURCE, 2, method="ddim")[1]["step_residual"] is None  # naive: not measured


def test_sdedit_keeps_size_and_depends_on_strength(tiny_pipe):
    image = random_image(64, 48)
    weak = tiny_pipe.sdedit(image, TARGET, strength=0.1, num_inference_steps=10,
                            generator=torch.Generator().manual_seed(0))
    strong = tiny_pipe.sdedit(image, TARGET, strength=1.0, num_inference_steps=10,
                              generator=torch.Generator().manual_seed(0))
    from dit4edit.images import psnr

    assert weak.size == strong.size == (64, 48)
    assert psnr(weak, image) > psnr(strong, image)
    with pytest.raises(DiT4EditError, match="strength"):
        tiny_pipe.sdedit(image, TARGET, strength=0)


def test_patch_merging_in_edit(tiny_pipe):
    from dit4edit.merging import MergeConfig

    inversion = tiny_pipe.invert(random_image(96, 96), SOURCE, STEPS, method="ddim")  # 6x6 token grid
    before = dict(tiny_pipe.transformer.attn_processors)
    plain = tiny_pipe.edit(inversion, TARGET, merge=None)
    default = tiny_pipe.edit(inversion, TARGET)  # 36 tokens: under min_tokens, so nothing merges
    assert relative_error(default.latents, plain.latents) < 1e-6
    zero = tiny_pipe.edit(inversion, TARGET, merge=MergeConfig(ratio=0.0, min_tokens=0))
    assert relative_error(zero.latents, plain.latents) < 1e-6
    merged = tiny_pipe.edit(inversion, TARGET, merge=MergeConfig(ratio=0.5, min_tokens=0, merge_ff=True))
    assert not torch.allclose(merged.latents[1], plain.latents[1], atol=1e-4)
    assert torch.equal(merged.latents[0], plain.latents[0])  # pinned source
    # merging limited to steps or blocks: all steps skipped = no merging; one block merging = something in between
    skipped = tiny_pipe.edit(inversion, TARGET, merge=MergeConfig(ratio=0.5, min_tokens=0, skip_steps=99))
    assert relative_error(skipped.latents, plain.latents) < 1e-6
    one_block = tiny_pipe.edit(inversion, TARGET, merge=MergeConfig(ratio=0.5, min_tokens=0, blocks=(1, 2)))
    attn_only = tiny_pipe.edit(inversion, TARGET, merge=MergeConfig(ratio=0.5, min_tokens=0))
    assert relative_error(one_block.latents[1], plain.latents[1]) > 1e-4
    assert relative_error(one_block.latents[1], attn_only.latents[1]) > 1e-4
    grouped = tiny_pipe.edit(inversion, TARGET, merge=MergeConfig(ratio=0.5, min_tokens=0, plan_every=2))
    assert relative_error(grouped.latents[1], attn_only.latents[1]) > 1e-4  # block 1 reuses block 0's plan
    assert torch.equal(grouped.latents[0], plain.latents[0])
    # one plan shared by the branches: with identical prompts the target still equals the free source
    free = tiny_pipe.edit(inversion, SOURCE, pin_source=False, merge=MergeConfig(ratio=0.5, min_tokens=0))
    assert relative_error(free.latents[1], free.latents[0]) < 1e-5
    assert dict(tiny_pipe.transformer.attn_processors) == before
    assert all(not block.ff._forward_hooks for block in tiny_pipe.transformer.transformer_blocks)


def test_embedded_model_loads_and_generates():
    from dit4edit.pipeline import default_model

    pipe = DiT4EditPipeline.from_pretrained(default_model())  # weights stored float16, loaded float32
    assert {m.dtype for m in (pipe.text_encoder, pipe.vae, pipe.transformer)} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    from diffusers import PixArtTransformer2DModel

    assert isinstance(pipe.transformer, PixArtTransformer2DModel) and pipe.default_size() == 128
    image, trajectory = pipe.generate("a red circle on a white background", 128, 128, 4,
                                      generator=torch.Generator().manual_seed(0))
    assert image.size == (128, 128) and trajectory.trajectory.shape == (5, 4, 16, 16)
    import numpy as np

    corner = np.asarray(image, dtype=float)[:8, :8].mean(axis=(0, 1))
    assert corner.min() > 150  # even 4 steps give a light background for "white background"


@pytest.mark.parametrize("image", [np.zeros((32, 32, 3), dtype=np.uint8), torch.zeros(3, 32, 32), b"\x89PNG", 42])
def test_invert_refuses_what_is_not_an_image(tiny_pipe, image):
    with pytest.raises(DiT4EditError, match="must be a PIL image or a file path"):
        tiny_pipe.invert(image, SOURCE, 2)


@pytest.mark.parametrize("call, message", [
    (lambda p, img, inv: p.invert(img, SOURCE, 2, guidance_scale=float("nan")), "guidance scale must be a finite"),
    (lambda p, img, inv: p.invert(img, SOURCE, 2, tol=0.0), "tol must be > 0"),
    (lambda p, img, inv: p.invert(img, SOURCE, 2.5), "steps must be an integer"),
    (lambda p, img, inv: p.reconstruct(img, SOURCE, 2, guidance_scale=float("inf")), "guidance scale must be a finite"),
    (lambda p, img, inv: p.edit(inv, TARGET, guidance_scale=float("nan")), "guidance scale must be a finite"),
    (lambda p, img, inv: p.generate(SOURCE, 0, 64, 2), "height must be >= 1"),
    (lambda p, img, inv: p.sdedit(img, TARGET, strength=float("nan")), "strength must be a finite"),
    (lambda p, img, inv: p.check_prompt(7), "the prompt must be text"),
])
def test_api_arguments_are_checked(tiny_pipe, call, message):
    image = random_image(32, 32)
    inversion = tiny_pipe.invert(image, SOURCE, 2, method="ddim")
    with pytest.raises(DiT4EditError, match=message):
        call(tiny_pipe, image, inversion)


def test_mask_keeps_the_pixels_outside_after_decoding(tiny_pipe):
    from PIL import Image

    picture = Image.new("RGB", (64, 64), (20, 20, 20))
    picture.paste((200, 40, 40), (0, 0, 32, 64))
    inversion = tiny_pipe.invert(picture, SOURCE, STEPS, method="ddim")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # left half editable
    outside = np.asarray(mask) == 0
    result = tiny_pipe.edit(inversion, TARGET, mask=mask)
    edited, kept = np.asarray(result.images[0], dtype=int), np.asarray(result.reconstruction, dtype=int)
    assert np.array_equal(edited[outside], kept[outside])  # default: the decoded source branch
    with_input = tiny_pipe.edit(inversion, TARGET, mask=mask, source_image=picture).images[0]
    assert np.array_equal(np.asarray(with_input, dtype=int)[outside], np.asarray(picture, dtype=int)[outside])
    unmasked = np.asarray(tiny_pipe.edit(inversion, TARGET).images[0], dtype=int)
    assert np.abs(unmasked[outside] - kept[outside]).max() > 0  # without the paste the decoder spreads the edit
    with pytest.raises(DiT4EditError, match="source_image is 32x32"):
        tiny_pipe.edit(inversion, TARGET, mask=mask, source_image=picture.resize((32, 32)))


def test_a_patch_1_transformer_edits_on_its_own_finer_token_grid():
    # One token per latent pixel (the embedded model's 16x16-token variant): word maps, the local blend and patch
    # merging must all work on the grid the transformer uses, not on PixArt's patch-2 grid.
    from dit4edit.control import AttentionControl
    from dit4edit.merging import MergeConfig
    from dit4edit.tiny import tiny_transformer

    pipe = fresh_pipe(transformer=tiny_transformer(patch_size=1))
    inversion = pipe.invert(random_image(64, 64), SOURCE, STEPS, method="ddim")  # 8x8 latent: 64 tokens at patch 1
    plain = pipe.edit(inversion, TARGET, control=AttentionControl(local_blend_changed=True), record_words=True,
                      merge=None)
    maps = plain.controller.word_maps(1)
    assert maps["blue"].shape == (8, 8) and torch.isfinite(maps["blue"]).all()
    mask = plain.controller.blend_mask(STEPS - 1)
    assert mask is not None and tuple(mask.shape) == (8, 8)
    merged = pipe.edit(inversion, TARGET, control=AttentionControl(local_blend_changed=True),
                       merge=MergeConfig(ratio=0.5, min_tokens=0))
    assert torch.equal(merged.latents[0], plain.latents[0])  # the pinned source
    assert relative_error(merged.latents[1], plain.latents[1]) > 1e-4  # merging changed the edit ...
    assert torch.isfinite(merged.latents).all() and merged.latents.shape == plain.latents.shape  # ... and ran


def test_local_blend_over_the_whole_image_says_so(tiny_pipe, caplog):
    from dit4edit.control import AttentionControl

    inversion = tiny_pipe.invert(random_image(64, 64), SOURCE, STEPS, method="ddim")
    everywhere = AttentionControl(local_blend_words=("circle",), local_blend_threshold=1e-6)
    with caplog.at_level("WARNING"):
        tiny_pipe.edit(inversion, TARGET, control=everywhere)
    lines = [r.getMessage() for r in caplog.records if "local-blend mask" in r.getMessage()]
    assert len(lines) == 1 and "covers 100% of the image" in lines[0] and "\n" not in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        tiny_pipe.edit(inversion, TARGET, control=AttentionControl(local_blend_words=("circle",),
                                                                   local_blend_threshold=1.0, local_blend_dilate=0))
    assert not any("local-blend mask" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):  # the changed words alone (a model's setting): a full mask is no mistake
        tiny_pipe.edit(inversion, TARGET, control=AttentionControl(local_blend_changed=True,
                                                                   local_blend_threshold=1e-6))
    assert not any("local-blend mask" in r.getMessage() for r in caplog.records)


def test_hub_id_error_is_our_one_line_only(capfd):
    with pytest.raises(DiT4EditError, match="cannot load model someone/no-such-model") as info:
        DiT4EditPipeline.from_pretrained("someone/no-such-model", local_files_only=True)
    assert "\n" not in str(info.value)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_embedded_generate_defaults_to_the_native_size():
    from dit4edit.pipeline import default_model

    pipe = DiT4EditPipeline.from_pretrained(default_model())
    pipe.set_progress_bar_config(disable=True)
    image, trajectory = pipe.generate(SOURCE, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert image.size == (128, 128) and trajectory.trajectory.shape[-2:] == (16, 16)


def test_merge_plans_come_from_the_source_conditional_row(tiny_pipe, monkeypatch):
    """The plan is made from the tokens of the source's conditional row, not its unconditional one."""
    from dit4edit import merging
    from dit4edit.layout import SOURCE as SOURCE_BRANCH
    from dit4edit.layout import BatchLayout
    from dit4edit.merging import MergeConfig

    inversion = tiny_pipe.invert(random_image(96, 96), SOURCE, 2, method="ddim")
    planned, seen = [], []
    plan = merging.plan_merge
    monkeypatch.setattr(merging, "plan_merge", lambda x, *a, **k: planned.append(x.clone()) or plan(x, *a, **k))
    # block 1: after block 0's cross-attention the rows differ by prompt (in block 0 every row is the same latent)
    attn1 = tiny_pipe.transformer.transformer_blocks[1].attn1
    handle = attn1.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        tiny_pipe.edit(inversion, TARGET, merge=MergeConfig(ratio=0.5, min_tokens=0))
    finally:
        handle.remove()
    layout = BatchLayout.for_scale(1, 4.5)
    batch, plan_input = seen[0], planned[1]  # (rows, N, C); the plan of block 1 at step 0
    assert batch.shape[0] == layout.rows == 4
    assert torch.equal(plan_input, batch[layout.row(SOURCE_BRANCH, cond=True)])
    assert not torch.equal(plan_input, batch[layout.row(SOURCE_BRANCH, cond=False)])


def test_prompt_length_is_the_models(tiny_pipe, tmp_path):
    assert tiny_pipe.max_sequence_length == 120
    long_prompt = " ".join(["red circle"] * 25)  # between 120 and 300 tokens
    with pytest.raises(DiT4EditError, match="reads at most 120"):
        tiny_pipe.check_prompt(long_prompt)
    longer = fresh_pipe(max_sequence_length=300)
    longer.save_pretrained(tmp_path)
    loaded = DiT4EditPipeline.from_pretrained(tmp_path)
    assert loaded.max_sequence_length == 300 and loaded.check_prompt(long_prompt) == long_prompt
    embeds, mask = loaded.encode_prompt([SOURCE])
    assert embeds.shape[1] == mask.shape[1] == 300


@pytest.mark.parametrize("arguments, message", [
    (dict(inversion="inv.safetensors"), "inversion must be an Inversion, got str"),
    (dict(target_prompt=7), "target_prompt must be a prompt or a non-empty list of prompts"),
    (dict(control={"self_replace": 0.4}), "unknown attention-control setting"),
    (dict(control=0.4), "control must be changes to the attention control, an AttentionControl or None, got float"),
    (dict(mask=42), "the mask must be an image or its file, got int"),
    (dict(merge=0.5), "merge must be changes to patch merging, a MergeConfig or None, got float"),
    (dict(source_image=np.zeros((8, 8, 3))), "source_image must be a PIL image, got ndarray"),
])
def test_edit_arguments_of_the_wrong_type(tiny_pipe, arguments, message):
    inversion = tiny_pipe.invert(random_image(32, 32), SOURCE, 2, method="ddim")
    call = {"inversion": inversion, "target_prompt": TARGET, **arguments}
    with pytest.raises(DiT4EditError, match=message):
        tiny_pipe.edit(**call)
    with pytest.raises(DiT4EditError, match="max_pixels must be an integer"):
        tiny_pipe.invert(random_image(32, 32), SOURCE, 2, max_pixels="big")
