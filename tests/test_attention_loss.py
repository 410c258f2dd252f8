"""The cross-attention localisation loss that teaches the embedded model's words to attend where their things are."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dit4edit_research")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

import attention_loss  # noqa: E402


def test_words_map_to_their_object_or_the_background():
    caption = "a small red striped circle and a blue star on a gray background"
    assert attention_loss.word_regions(caption) == [-1, 1, 1, 1, 1, -1, -1, 2, 2, -1, -1, 0, 0]


def test_tokens_take_their_words_region_and_multi_piece_words_are_covered():
    from dit4edit.pipeline import default_model
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(Path(default_model()) / "tokenizer")
    caption = "a red circle on a white background"
    regions = attention_loss.token_regions(tokenizer, caption, 32)
    pieces = tokenizer.tokenize(caption)
    assert len(pieces) > len(caption.split())  # "background" is several pieces
    assert list(regions[: len(pieces)]) == [-1, 1, 1, -1, -1] + [0] * (len(pieces) - 5)
    assert (regions[len(pieces) :] == -1).all()  # </s> and padding


def test_region_maps_share_each_cell_between_background_and_objects():
    alphas = np.zeros((2, 32, 32), np.float32)
    alphas[0, :16, :16] = 1.0  # object 1 fills the top-left cell
    alphas[1, 16:, 16:24] = 1.0  # object 2 covers half of the bottom-right cell
    maps = attention_loss.region_maps(alphas, 32, 32, cell=16, max_objects=3)
    assert maps.shape == (4, 2, 2)
    np.testing.assert_allclose(maps[1], [[1, 0], [0, 0]])
    np.testing.assert_allclose(maps[2], [[0, 0], [0, 0.5]])
    np.testing.assert_allclose(maps[0], [[0, 1], [1, 0.5]])
    assert not maps[3].any()


def test_the_loss_is_low_when_words_attend_inside_their_regions_and_high_outside():
    # 4 image tokens, 3 text tokens: token 0 -> object 1 (image token 0), token 1 -> background (tokens 1-3), token 2
    # unsupervised.
    maps = torch.tensor([[[0.0, 1, 1, 1], [1, 0, 0, 0]]])  # (B=1, R=2, N=4)
    regions = torch.tensor([[1, 0, -1]])

    def probs(column_of_token0_at_token0: float) -> torch.Tensor:
        p = torch.tensor([0.0, 0.5, 0.5]).repeat(1, 1, 4, 1)  # (B, heads, N, L): image tokens 1-3 -> text 1, 2
        p[0, 0, 0] = torch.tensor([column_of_token0_at_token0, 0.0, 1 - column_of_token0_at_token0])
        return p

    local = attention_loss.localisation_loss([probs(1.0)], regions, maps)
    spread = attention_loss.localisation_loss([probs(0.0)], regions, maps)
    assert local < spread
    # Token 0 attended only at its object: its term is 0; token 1 puts all its mass on tokens 1-3: 0 too.
    assert float(local) == pytest.approx(0.0, abs=1e-4)
    assert float(spread) > 5  # token 0's map has no mass on its object


def test_the_recording_processor_computes_what_diffusers_computes():
    from dit4edit.tiny import tiny_transformer

    torch.manual_seed(0)
    model = tiny_transformer(caption_channels=12)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kwargs = dict(encoder_hidden_states=text, encoder_attention_mask=mask, timestep=torch.tensor([10, 500]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    with torch.no_grad():
        expected = model(x, **kwargs)[0]
        store = attention_loss.install_recording(model)
        got = model(x, **kwargs)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert len(store) == 2 and store[0].shape == (2, 2, 16, 5)  # (B, heads, 4x4 image tokens, text)
    assert float(store[0][0, :, :, 3:].max()) < 1e-3  # padding gets no attention
