"""training/train_flow.py: a toy flow training stops, resumes where it stopped (same batches as an uninterrupted
run), and exports a folder that diffusers' own StableDiffusion3Pipeline loads and generates from."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dit4edit_research")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

import train_flow  # noqa: E402

TOY = ["--scenes", "16", "--batch", "4", "--width", "32", "--layers", "2", "--head-dim", "16", "--clip-width", "16",
       "--clip-layers", "2", "--clip-projection", "16", "--warmup", "1", "--ckpt-every", "1", "--steps", "4",
       "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    straight = root / "straight"
    assert train_flow.main(["--out", str(straight), *TOY]) == 0  # 4 steps, then the EMA pipeline is saved
    resumed = root / "resumed"
    resumed.mkdir()
    for cache in straight.glob("*_16.pt"):  # the latent cache is shared (it is only encoded once per run)
        shutil.copy(cache, resumed / cache.name)
    assert train_flow.main(["--out", str(resumed), *TOY, "--stop-at", "2"]) == 0
    first = torch.load(resumed / "flow.ckpt", weights_only=False)
    assert first["step"] == 2 and not (resumed / "pipeline_ema").exists()
    assert train_flow.main(["--out", str(resumed), *TOY, "--fp16"]) == 0
    return straight, resumed


def test_a_resumed_run_continues_from_its_checkpoint_with_the_same_batches(runs):
    straight, resumed = runs
    a = torch.load(straight / "flow.ckpt", weights_only=False)
    b = torch.load(resumed / "flow.ckpt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for part in a["parts"]:
        for key, value in a["parts"][part].items():
            torch.testing.assert_close(b["parts"][part][key], value, rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (resumed / "flow_loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert "resumed from step 2" in (resumed / "log.txt").read_text()


def test_the_export_loads_in_stable_diffusion_3_pipeline_and_generates(runs):
    from diffusers import StableDiffusion3Pipeline

    _, resumed = runs
    folder = resumed / "pipeline_ema"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    weights = list(folder.glob("*/*.safetensors"))
    assert len(weights) == 5  # transformer, VAE, two CLIPs, T5
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for f in weights for v in load_file(f).values())
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))  # a plain load: one dtype throughout
    pipe.set_progress_bar_config(disable=True)
    assert {m.dtype for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_3)} == {torch.float32}
    image = pipe("a red circle on a white background", num_inference_steps=2, guidance_scale=2.0,
                 max_sequence_length=24, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()
    wide = pipe("a blue star on a black background", width=256, height=128, num_inference_steps=2,
                output_type="np").images[0]
    assert wide.shape == (128, 256, 3)


def test_training_encodes_text_exactly_as_the_pipeline_does(runs):
    from diffusers import StableDiffusion3Pipeline

    _, resumed = runs
    pipe = StableDiffusion3Pipeline.from_pretrained(str(resumed / "pipeline_ema"))
    caption = "a large red circle and a small blue star on a beige background"
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(caption, None, None, do_classifier_free_guidance=True,
                                                      max_sequence_length=24)
    toks = (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3)
    joint = pipe.transformer.config.joint_attention_dim
    with torch.no_grad():
        for text, want, want_pooled in ((caption, emb, pooled), ("", neg, neg_pooled)):
            ids = train_flow.tokenize_all(toks, [text], 24)
            got, got_pooled = train_flow.encode_text(pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3,
                                                     *ids, joint)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(got_pooled, want_pooled)
    assert emb.shape[1] == pipe.tokenizer.model_max_length + 24


def test_the_clip_tokenizer_keeps_every_caption_word_whole(runs):
    _, resumed = runs
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(resumed / "pipeline_ema" / "tokenizer")
    caption = "a large red striped circle and a small blue dotted star on a beige background"
    assert tok.tokenize(caption) == [w + "</w>" for w in caption.split()]
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id == 0 and ids[-1] == tok.eos_token_id == tok.pad_token_id == 1


def test_logit_normal_timesteps_shift_towards_noise():
    rng = np.random.default_rng(0)
    plain = train_flow.sample_sigmas(rng, 20000, "logit-normal", 0.0, 1.0, 1.0)
    shifted = train_flow.sample_sigmas(np.random.default_rng(0), 20000, "logit-normal", 0.0, 1.0, 3.0)
    assert 0 < plain.min() and plain.max() < 1
    assert abs(np.median(plain) - 0.5) < 0.02 and np.median(shifted) == pytest.approx(0.75, abs=0.02)


SHIPPED = Path(__file__).resolve().parents[1] / "src/dit4edit/models/shapes-flow"


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="no shipped flow model")
def test_the_shipped_flow_model_is_small_and_stable_diffusion_3_pipeline_generates_from_it():
    from diffusers import StableDiffusion3Pipeline

    assert sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()) <= 12_000_000
    pipe = StableDiffusion3Pipeline.from_pretrained(str(SHIPPED))
    pipe.set_progress_bar_config(disable=True)
    settings = json.loads((SHIPPED / "dit4edit.json").read_text())
    assert set(settings) == {"guidance_scale", "num_inference_steps"}
    image = pipe("a red circle on a white background", num_inference_steps=4, guidance_scale=5.0,
                 max_sequence_length=24, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (128, 128, 3)
    corner = image[:16, :16].reshape(-1, 3).mean(0)
    assert (corner > 0.8).all()  # even at 4 steps the white background is drawn
