"""PixArt-alpha and PixArt-Sigma (`PixArtAlphaPipeline` / `PixArtSigmaPipeline` folders): a DiT with self- and
cross-attention per block, predicting eps (and a learned variance) on a VP schedule.

Text: T5 embeddings with their 0/1 padding mask, `max_sequence_length` tokens (120 alpha, 300 Sigma, from the
folder), the prompt lower-cased and stripped as diffusers' `_text_preprocessing` does without `clean_caption`.
The model predicts 8 channels: the first 4 are eps, `denoised = (x - s eps) / a`; classifier-free guidance on eps,
rows `[uncond, cond]`. The 1024 models take resolution and aspect-ratio micro-conditions.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from typing import Sequence

import torch

from ..prompts import preprocess_prompt
from ..defaults import PIXART_ALPHA_TOKENS
from ..solvers import Schedule, sample_dpmpp_2m
from .base import IMAGE, TEXT, AttentionLayer, Backbone, FolderSpec, PromptTokens, TextInputs, word_map

SIGMA_TOKENS = 300  # PixArtSigmaPipeline's max_sequence_length
_LAYER = re.compile(r"transformer_blocks\.(\d+)\.attn([12])\.processor")


def preprocess(prompt: str) -> str:
    """The text PixArt's T5 reads, as diffusers' PixArt pipelines prepare it by default (`clean_caption=True`:
    cleaned where beautifulsoup4 and ftfy are installed, else lower-cased and stripped; `prompts.preprocess_prompt`)."""
    return preprocess_prompt(prompt, clean_caption=_can_clean_captions())


@functools.lru_cache(maxsize=1)
def _can_clean_captions() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("bs4", "ftfy"))


class PixArtBackbone(Backbone):
    family = "pixart"
    prediction = "epsilon"
    folder = FolderSpec(
        pipelines=("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
        components=dict(
            transformer=("PixArtTransformer2DModel",),
            scheduler=("DPMSolverMultistepScheduler",),
            vae=("AutoencoderKL",),
            text_encoder=("T5EncoderModel",),
            tokenizer=("T5Tokenizer", "T5TokenizerFast"),
        ),
    )

    def default_prompt_length(self) -> int:
        """A saved dit4edit pipeline's own `max_sequence_length`, else its pipeline's (Sigma 300, alpha 120)."""
        length = dict(self.pipe.config).get("max_sequence_length")
        if length is not None:
            return int(length)
        return SIGMA_TOKENS if type(self.pipe).__name__ == "PixArtSigmaPipeline" else PIXART_ALPHA_TOKENS

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> TextInputs:
        texts = [preprocess(p) for p in prompts]
        tokens = self.pipe.tokenizer(texts, padding="max_length", max_length=self.max_sequence_length,
                                     truncation=True, add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)  # (B, L)
        embeds = self.pipe.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]  # (B, L, D)
        return TextInputs(prompt_embeds=embeds.to(self.pipe.text_encoder.dtype), prompt_attention_mask=mask,
                          tokens=tuple(self.prompt_tokens(t) for t in texts))

    def prompt_tokens(self, prompt: str) -> PromptTokens:
        text = preprocess(prompt)
        words, owners, span = word_map(self.pipe.tokenizer, text, self.max_sequence_length, "t5")
        return PromptTokens(text, words, owners, (span,))

    def schedule(self, num_steps: int, latent_hw: tuple[int, int], sigma_max: float = 1.0) -> Schedule:
        return Schedule.from_scheduler(self.pipe.scheduler, num_steps)

    def sampler(self):
        return sample_dpmpp_2m

    @torch.no_grad()
    def predict(self, x, i, text, schedule, guidance_scale, layout, attention_kwargs=None):
        model_in = layout.join_guidance(x, x).to(self.device, self.dtype)  # (branches, ...) -> (rows, C, h, w)
        timestep = schedule.timesteps[i].to(self.device).expand(layout.rows)
        out = self.transformer(model_in, encoder_hidden_states=text.prompt_embeds.to(self.dtype),
                               encoder_attention_mask=text.prompt_attention_mask, timestep=timestep,
                               added_cond_kwargs=self.micro_conditions(x.shape[-2:], layout.rows),
                               cross_attention_kwargs=attention_kwargs, return_dict=False)[0]
        eps = out[:, : self.transformer.config.in_channels].to(x.device, x.dtype)  # [eps, learned sigma]: eps
        eps = layout.guide(eps, guidance_scale)  # (rows, ...) -> (branches, ...)
        a, s = schedule.alphas[i].item(), schedule.sigmas[i].item()
        return (x - s * eps) / a

    def micro_conditions(self, latent_hw, rows: int) -> dict:
        """Resolution and aspect ratio in pixels, for the models built with `use_additional_conditions`."""
        if not getattr(self.transformer, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        height, width = (side * self.vae_scale_factor for side in latent_hw)
        resolution = torch.tensor([[height, width]], device=self.device, dtype=self.dtype).expand(rows, -1)
        aspect = torch.tensor([[height / width]], device=self.device, dtype=self.dtype).expand(rows, -1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def attention_layers(self):
        layers = []
        for name in self.transformer.attn_processors:
            match = _LAYER.fullmatch(name)
            if match is not None:
                cross = match[2] == "2"
                layers.append(AttentionLayer(name, "cross" if cross else "self", int(match[1]), (IMAGE,),
                                             (TEXT,) if cross else (IMAGE,)))
        return tuple(layers)
