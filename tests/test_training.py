"""The training scripts' own logic: the generate-then-edit scorer that selects weights, and the warm start."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dit4edit_research")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

import common  # noqa: E402
import eval_editing  # noqa: E402
import probe_denoiser  # noqa: E402
from train_dit import build_transformer, positional_scale, warm_start  # noqa: E402


@pytest.mark.parametrize("k", range(4))  # one pair per edit kind
def test_a_perfect_edit_scores_success_and_an_unchanged_image_does_not(k):
    pair = eval_editing.edit_pairs(4)[k]
    perfect = eval_editing.score_edit(pair.source.image, pair.target.image, pair)
    assert perfect["kind"] == pair.edit.kind
    assert perfect["source_ok"] and perfect["success"]
    if pair.edit.kind != "background":  # outside the edited object nothing moved
        assert perfect["background_psnr"] == float("inf")
    unchanged = eval_editing.score_edit(pair.source.image, pair.source.image, pair)
    assert not unchanged["success"]


def test_a_changed_background_lowers_the_background_psnr():
    pair = next(p for p in eval_editing.edit_pairs(4) if p.edit.kind == "colour")
    noisy = np.clip(pair.target.image.astype(np.int16) + 12, 0, 255).astype(np.uint8)
    assert eval_editing.score_edit(pair.source.image, noisy, pair)["background_psnr"] < 30


def test_warm_start_copies_the_tensors_whose_shapes_match(tmp_path):
    torch.manual_seed(0)
    source = build_transformer(64, 2, 32, sample_size=8, patch_size=2)
    source.save_pretrained(tmp_path)
    finer = build_transformer(64, 2, 32, sample_size=8, patch_size=1)
    before = {k: v.clone() for k, v in finer.state_dict().items()}
    copied = warm_start(finer, type(source), tmp_path)
    after, reference = finer.state_dict(), source.state_dict()
    same_shape = [k for k in after if k in reference and reference[k].shape == after[k].shape]
    assert copied == len(same_shape) < len(after)
    assert all(torch.equal(after[k], reference[k]) for k in same_shape)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in same_shape)  # patch layers left as built



def test_a_patch_refined_model_starts_out_predicting_what_the_coarse_model_did(tmp_path):
    torch.manual_seed(0)
    coarse = build_transformer(64, 2, 32, sample_size=8, patch_size=2).eval()
    coarse.save_pretrained(tmp_path)
    scale = 2 * positional_scale(coarse.config)
    refined = build_transformer(64, 2, 32, sample_size=8, patch_size=1, interpolation_scale=scale).eval()
    warm_start(refined, type(coarse), tmp_path, refine_patch=1)
    copied_only = build_transformer(64, 2, 32, sample_size=8, patch_size=1, interpolation_scale=scale).eval()
    warm_start(copied_only, type(coarse), tmp_path)
    blocky = torch.randn(2, 4, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)  # what a coarse token sees
    text, t = torch.randn(2, 6, 32), torch.tensor([300, 700])

    def predict(model):
        with torch.no_grad():
            out = model(blocky, encoder_hidden_states=text, timestep=t,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out[:, :4]

    # a fine token predicts the mean of its coarse token's 2 x 2 sub-pixel predictions
    reference = torch.nn.functional.avg_pool2d(predict(coarse), 2).repeat_interleave(2, 2).repeat_interleave(2, 3)

    def error(model):
        return ((predict(model) - reference).norm() / reference.norm()).item()
    assert error(refined) < 0.3 < error(copied_only)


def test_the_denoiser_probe_inverts_the_noising_it_applies():
    """A transformer that predicts the very noise added gets the clean latents back; one that predicts no noise
    gets the noisy latents rescaled, far from them. The learned-sigma half of PixArt's output is ignored."""
    abar = common.alphas_cumprod()
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    emb, mask = torch.zeros(2, 3, 16), torch.ones(2, 3)

    def knows_the_noise(xt, **kwargs):
        return (torch.cat([noise, torch.full_like(noise, 7.0)], dim=1),)

    def predicts_no_noise(xt, **kwargs):
        return (torch.zeros(len(xt), 8, 8, 8),)

    for t in (100, 500, 900):
        assert torch.allclose(probe_denoiser.predict_x0(knows_the_noise, x0, noise, t, emb, mask, abar), x0, atol=1e-3)
        assert (probe_denoiser.predict_x0(predicts_no_noise, x0, noise, t, emb, mask, abar) - x0).abs().mean() > 0.05


def test_the_probe_swaps_exactly_one_word_for_another_choice():
    caption = "a large red square on a white background"
    swaps = {probe_denoiser.swapped(caption, "square", ("circle", "square", "star"), k) for k in range(4)}
    assert swaps == {"a large red circle on a white background", "a large red star on a white background"}


def test_a_toy_training_run_samples_small_buckets_and_resumes(tmp_path):
    # 16 scenes, all batches from the non-square buckets (a few scenes each), half-batch 4: a bucket smaller than
    # the batch gives all its scenes (it once failed drawing 4 distinct scenes from 3). Then a resume to step 3.
    import json

    import train_dit
    from dit4edit.pipeline import default_model

    out = tmp_path / "run"
    argv = ["--out", str(out), "--scenes", "16", "--init-from", default_model(), "--width", "160", "--layers", "6",
            "--batch", "8", "--nonsquare-share", "1.0", "--threads", "0", "--no-progress", "--ckpt-every", "1"]
    assert train_dit.main([*argv, "--steps", "2"]) == 0
    assert train_dit.main([*argv, "--steps", "3"]) == 0
    rows = [json.loads(line) for line in (out / "dit_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # the second run resumed at step 2, not from the start
    assert all(np.isfinite(r["loss"]) and r["bucket"][0] != r["bucket"][1] for r in rows)
    assert (out / "pipeline_ema" / "transformer").is_dir()


def test_a_toy_run_with_the_attention_loss_logs_it_and_it_falls_when_trained_alone(tmp_path):
    # The localisation term is logged beside the diffusion loss, and with a large weight a few steps on the same
    # 8 scenes lower it: the gradient reaches the cross-attention through the recording processors.
    import json

    import train_dit
    from dit4edit.pipeline import default_model

    out = tmp_path / "run"
    argv = ["--out", str(out), "--scenes", "8", "--init-from", default_model(), "--width", "160", "--layers", "6",
            "--batch", "8", "--nonsquare-share", "0", "--threads", "0", "--no-progress", "--ckpt-every", "100",
            "--drop-caption", "0", "--lr", "3e-3", "--warmup", "1", "--attention-loss", "10", "--steps", "6"]
    assert train_dit.main(argv) == 0
    rows = [json.loads(line) for line in (out / "dit_loss.jsonl").read_text().splitlines()]
    attention = [r["attention_loss"] for r in rows]
    assert all(np.isfinite(a) and a > 0 for a in attention)
    assert all(r["loss"] > r["diffusion_loss"] for r in rows)
    assert attention[-1] < 0.8 * attention[0]


def test_a_run_refined_to_patch_1_keeps_the_learned_positions_through_later_warm_starts(tmp_path):
    # patch 2 -> 1 doubles the positional interpolation scale (8 positions become 16 at half steps); a run that
    # warm-starts from the refined model must keep that scale, or every learned position would move.
    import train_dit
    from diffusers import PixArtTransformer2DModel
    from dit4edit.pipeline import default_model

    def run(out, init_from):
        argv = ["--out", str(out), "--scenes", "8", "--init-from", str(init_from), "--width", "160", "--layers", "6",
                "--patch-size", "1", "--batch", "4", "--nonsquare-share", "0", "--threads", "0", "--no-progress",
                "--ckpt-every", "100", "--steps", "1"]
        assert train_dit.main(argv) == 0
        return PixArtTransformer2DModel.load_config(out / "pipeline_ema" / "transformer")

    refined = run(tmp_path / "refined", default_model())
    assert (refined["patch_size"], refined["interpolation_scale"]) == (1, 2)
    again = run(tmp_path / "again", tmp_path / "refined" / "pipeline_ema")
    assert (again["patch_size"], again["interpolation_scale"]) == (1, 2)


def test_a_warm_start_onto_a_coarser_patch_is_refused_before_any_work(tmp_path):
    import train_dit
    from dit4edit.pipeline import default_model

    with pytest.raises(SystemExit, match="--init-from has patch 2: it refines to a patch that divides it, not to "
                                         "--patch-size 4"):
        train_dit.main(["--out", str(tmp_path / "run"), "--init-from", default_model(), "--patch-size", "4"])
    assert not (tmp_path / "run" / "tokenizer").exists()  # nothing written


def test_a_toy_vae_run_and_its_decoder_phase_each_resume_where_they_stopped(tmp_path):
    # Crops for step 1, whole images after it; each phase stopped at step 2, then resumed to step 3 from its
    # checkpoint (the weights, the optimiser and the step), and the decoder phase starts from the saved VAE.
    import json

    import train_vae

    out = tmp_path / "vae"
    argv = ["--out", str(out), "--pool", "12", "--channels", "8", "8", "--batch", "2", "--crop", "32",
            "--full-share", "0.5", "--warmup", "1", "--eval-every", "100", "--threads", "0", "--no-progress"]
    for phase, log_name in (([], "vae_loss.jsonl"), (["--decoder-only"], "vae_decoder_loss.jsonl")):
        assert train_vae.main([*argv, *phase, "--steps", "3", "--stop-at", "2"]) == 0
        assert train_vae.main([*argv, *phase, "--steps", "3"]) == 0
        rows = [json.loads(line) for line in (out / log_name).read_text().splitlines()]
        steps = [r["step"] for r in rows if not r.get("final")]
        assert steps == [1, 2, 3], phase  # resumed at step 2, not from the start
        assert all(np.isfinite(r["loss"]) for r in rows if not r.get("final"))
    assert (out / "vae_decoder" / "config.json").exists()


def test_a_time_budget_fixes_the_schedule_from_the_timed_steps_and_buckets_replay_per_step(monkeypatch):
    import types

    import common

    import itertools

    # start, step 10 timed, step 40 timed: 1 s a step, 60 s of the budget gone
    clock = itertools.chain([100.0, 130.0, 160.0, 160.0], itertools.repeat(160.0))
    monkeypatch.setattr(common.time, "time", lambda: next(clock))
    args = types.SimpleNamespace(time_budget=600, steps=10**6, seed=3, nonsquare_share=0.5, batch=8)
    bar = types.SimpleNamespace(total=None)
    budget = common.TimeBudget(args, 0, bar)
    stops = [budget.stop_at(step, 10**6) for step in range(0, 41)]
    assert stops[-1] == 40 + 540 == args.steps == bar.total and stops[39] == 10**6
    assert common.TimeBudget(args, 5, bar).window is None  # a resumed run keeps the schedule it started with
    draws = [common.draw_bucket(args, step, "square", ["wide", "tall"])[1:] for step in range(40)]
    assert draws == [common.draw_bucket(args, step, "square", ["wide", "tall"])[1:] for step in range(40)]
    assert {batch for _, batch in draws} == {4, 8} and ("square", 8) in draws
