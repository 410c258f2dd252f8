"""PixArt-Sigma through the same pipeline: a tiny Sigma-shaped folder (diffusers' PixArtSigmaPipeline layout, its own
VAE, prompts of up to 300 T5 tokens) loads with `from_pretrained`, inverts and edits under attention control."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image, relative_error
from diffusers import AutoencoderKL, PixArtSigmaPipeline

from dit4edit.errors import DiT4EditError
from dit4edit.pipeline import DiT4EditPipeline
from dit4edit.tiny import TINY_CAPTIONS, tiny_components, tiny_transformer
from dit4edit.tokenizer import train_t5_tokenizer

STEPS = 3


@pytest.fixture(scope="module")
def sigma_dir(tmp_path_factory):
    """A tiny model saved as diffusers saves PixArt-Sigma: model_index names PixArtSigmaPipeline; an SDXL-style VAE
    (scaling 0.13025, no micro-conditions on the transformer) and a tokenizer for 300-token prompts."""
    parts = tiny_components(seed=0)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.13025)
    pipe = PixArtSigmaPipeline(tokenizer=train_t5_tokenizer(TINY_CAPTIONS, vocab_size=96, max_length=300),
                               text_encoder=parts["text_encoder"], vae=vae.eval(),
                               transformer=tiny_transformer(sample_size=8), scheduler=parts["scheduler"])
    folder = tmp_path_factory.mktemp("sigma")
    pipe.save_pretrained(folder)
    return folder


def long_prompt(colour: str) -> str:
    """A prompt whose words after the first 120 T5 tokens carry the colour: PixArt-alpha would cut them off."""
    return " ".join(["a circle on a white background"] * 9 + [f"a {colour} circle"])


def test_sigma_folder_loads_with_its_prompt_length(sigma_dir):
    pipe = DiT4EditPipeline.from_pretrained(sigma_dir)
    assert pipe.max_sequence_length == 300 and pipe.vae.config.scaling_factor == 0.13025
    count = len(pipe.tokenizer(long_prompt("red")).input_ids)
    assert 120 < count <= 300
    assert pipe.check_prompt(long_prompt("red"))
    embeds, mask = pipe.encode_prompt([long_prompt("red")])
    assert embeds.shape[1] == 300 and int(mask.sum()) == count
    with pytest.raises(DiT4EditError, match="reads at most 300"):
        pipe.check_prompt(" ".join([long_prompt("red")] * 3))


def test_sigma_inverts_and_edits_beyond_120_tokens(sigma_dir):
    pipe = DiT4EditPipeline.from_pretrained(sigma_dir)
    pipe.set_progress_bar_config(disable=True)
    inversion = pipe.invert(random_image(64, 64), long_prompt("red"), STEPS, method="ddim-exact")
    same = pipe.edit(inversion, long_prompt("red"), pin_source=False)
    edited = pipe.edit(inversion, long_prompt("blue"), record_words=True)  # the default control, 300-token maps
    assert relative_error(same.latents[1], same.latents[0]) < 1e-5  # identical prompts: identity edit
    # the only difference sits past token 120: it reaches the model and the control's token alignment
    assert relative_error(edited.latents[1], same.latents[1]) > 1e-4
    assert "blue" in edited.controller.word_maps(1) and edited.images[0].size == (64, 64)
