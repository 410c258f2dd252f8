"""FLUX.1 (`FluxPipeline` folders): double-stream MM-DiT blocks then single-stream blocks, on a rectified flow.

Text: the T5 sequence (512 tokens by default) is `prompt_embeds`, CLIP's pooled output `pooled_prompt_embeds`, as
`FluxPipeline.encode_prompt` builds them. Latents `(B, C, h, w)` are packed 2x2 into tokens `(B, h/2 * w/2, 4C)`
with position ids `img_ids` (row, column of each token) and `txt_ids` (zeros); RoPE runs over
`cat(txt_ids, img_ids)`, so every attention layer sees the token order `[text, image]`: the double-stream
`transformer_blocks.{i}.attn` as two streams joined, the `single_transformer_blocks.{i}.attn` as one stream.
Timestep and guidance enter in [0, 1]. FLUX.1-dev is guidance-distilled: the guidance scale is an input
(`guidance`), there is no classifier-free batch; schnell takes neither.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from .base import IMAGE, TEXT, AttentionLayer, Backbone, FolderSpec, PromptTokens, TextInputs, TokenGrid, word_map
from .flow import flow_schedule, sample_euler

_LAYER = re.compile(r"(single_)?transformer_blocks\.(\d+)\.attn\.processor")
PACK = 2  # latent pixels per token side


class FluxBackbone(Backbone):
    family = "flux"
    cfg = False  # no unconditional rows: dev takes the scale as an input, schnell ignores it
    folder = FolderSpec(
        pipelines=("FluxPipeline",),
        components=dict(
            transformer=("FluxTransformer2DModel",),
            scheduler=("FlowMatchEulerDiscreteScheduler",),
            vae=("AutoencoderKL",),
            text_encoder=("CLIPTextModel",),
            tokenizer=("CLIPTokenizer", "CLIPTokenizerFast"),
            text_encoder_2=("T5EncoderModel",),
            tokenizer_2=("T5Tokenizer", "T5TokenizerFast"),
        ),
    )

    def default_prompt_length(self) -> int:
        return 512  # FluxPipeline's max_sequence_length (schnell users often pass 256)

    @property
    def guidance_distilled(self) -> bool:
        """FLUX.1-dev: the guidance scale is an embedding input."""
        return bool(self.transformer.config.guidance_embeds)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> TextInputs:
        pipe, prompts = self.pipe, list(prompts)
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        pooled = pipe.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output  # (B, P)
        ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               return_tensors="pt").input_ids
        t5 = pipe.text_encoder_2(ids.to(self.device), output_hidden_states=False)[0]  # (B, L, D), no mask
        return TextInputs(prompt_embeds=t5.to(pipe.text_encoder_2.dtype),
                          pooled_prompt_embeds=pooled.to(pipe.text_encoder.dtype),
                          tokens=tuple(self.prompt_tokens(p) for p in prompts))

    def prompt_tokens(self, prompt: str) -> PromptTokens:
        """T5 positions only: CLIP reaches the model as the pooled vector alone."""
        words, t5, span = word_map(self.pipe.tokenizer_2, prompt, self.max_sequence_length, "t5")
        return PromptTokens(prompt, words, t5, (span,))

    def schedule(self, num_steps: int, latent_hw: tuple[int, int], sigma_max: float = 1.0):
        """`FluxPipeline`'s: sigmas `linspace(1, 1/N, N)`, shifted by `mu` from the number of image tokens."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # deferred: diffusers loads slowly

        config = self.pipe.scheduler.config
        mu = calculate_shift(self.grid(latent_hw).num_tokens, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        return flow_schedule(self.pipe.scheduler, num_steps, sigmas=sigmas, mu=mu, sigma_max=sigma_max)

    def sampler(self):
        return sample_euler

    @torch.no_grad()
    def predict(self, x, i, text, schedule, guidance_scale, layout, attention_kwargs=None):
        rows, hw = layout.rows, x.shape[-2:]
        model_in = pack(layout.join_guidance(x, x)).to(self.device, self.dtype)  # (rows, N, 4C)
        timestep = schedule.timesteps[i].to(self.device).expand(rows).to(model_in.dtype) / 1000
        guidance = None
        if self.guidance_distilled:
            guidance = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32).expand(rows)
        v = self.transformer(hidden_states=model_in, timestep=timestep, guidance=guidance,
                             pooled_projections=text.pooled_prompt_embeds, encoder_hidden_states=text.prompt_embeds,
                             txt_ids=self.text_ids(text.prompt_embeds.shape[1]), img_ids=self.image_ids(hw),
                             joint_attention_kwargs=attention_kwargs, return_dict=False)[0]
        v = unpack(v, hw).to(x.device, x.dtype)  # (rows, N, 4C) -> (rows, C, h, w)
        v = layout.guide(v, guidance_scale)  # no unconditional rows: each branch's own prediction
        return x - schedule.sigmas[i].item() * v

    def grid(self, latent_hw):
        return TokenGrid(latent_hw[0] // PACK, latent_hw[1] // PACK, PACK)

    def image_ids(self, latent_hw) -> torch.Tensor:
        """`(N, 3)` position ids of the packed tokens: (0, row, column), as `FluxPipeline` makes them."""
        grid = self.grid(latent_hw)
        ids = torch.zeros(grid.height, grid.width, 3)
        ids[..., 1] = torch.arange(grid.height)[:, None]
        ids[..., 2] = torch.arange(grid.width)[None, :]
        return ids.reshape(grid.num_tokens, 3).to(self.device, self.dtype)  # (h', w', 3) -> (N, 3)

    def text_ids(self, length: int) -> torch.Tensor:
        return torch.zeros(length, 3, device=self.device, dtype=self.pipe.text_encoder.dtype)

    def attention_layers(self):
        layers = []
        for name in self.transformer.attn_processors:
            match = _LAYER.fullmatch(name)
            if match is not None:
                order = (TEXT, IMAGE)
                layers.append(AttentionLayer(name, "single" if match[1] else "joint", int(match[2]), order, order))
        return tuple(layers)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """`(B, C, h, w)` -> `(B, h/2 * w/2, 4C)`: each 2x2 patch one token, channels then the 2x2 offsets."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // PACK, PACK, w // PACK, PACK)  # (B, C, h', 2, w', 2)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h', w', C, 2, 2)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, latent_hw) -> torch.Tensor:
    """The inverse of `pack` for a latent of `latent_hw`."""
    b, _, channels = tokens.shape
    h, w = latent_hw
    x = tokens.view(b, h // PACK, w // PACK, channels // (PACK * PACK), PACK, PACK)  # (B, h', w', C, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h', 2, w', 2)
    return x.reshape(b, channels // (PACK * PACK), h, w)
