"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline` folders): an MM-DiT on a rectified flow.

Text: CLIP-L and CLIP-G penultimate features side by side (77 tokens), zero-padded to the T5 width, then the T5
sequence (256 tokens by default): `prompt_embeds (B, 77 + L, D)`; the pooled vector is both CLIPs' projections
side by side, as `StableDiffusion3Pipeline.encode_prompt` builds them. Joint attention runs over `[image, text]`
(`transformer_blocks.{i}.attn`); SD3.5's image-only `attn2` (its `dual_attention_layers`) is self-attention.
Velocity -> `denoised = x - s v`; classifier-free guidance on the velocity, rows `[uncond, cond]`.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from .base import IMAGE, TEXT, AttentionLayer, Backbone, FolderSpec, PromptTokens, TextInputs, word_map
from .flow import flow_schedule, sample_euler

_LAYER = re.compile(r"transformer_blocks\.(\d+)\.(attn2?)\.processor")


class SD3Backbone(Backbone):
    family = "sd3"
    folder = FolderSpec(
        pipelines=("StableDiffusion3Pipeline",),
        components=dict(
            transformer=("SD3Transformer2DModel",),
            scheduler=("FlowMatchEulerDiscreteScheduler",),
            vae=("AutoencoderKL",),
            text_encoder=("CLIPTextModelWithProjection",),
            tokenizer=("CLIPTokenizer", "CLIPTokenizerFast"),
            text_encoder_2=("CLIPTextModelWithProjection",),
            tokenizer_2=("CLIPTokenizer", "CLIPTokenizerFast"),
            text_encoder_3=("T5EncoderModel",),
            tokenizer_3=("T5Tokenizer", "T5TokenizerFast"),
        ),
    )

    def default_prompt_length(self) -> int:
        return 256  # StableDiffusion3Pipeline's max_sequence_length

    @property
    def clip_length(self) -> int:
        return self.pipe.tokenizer.model_max_length  # 77

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> TextInputs:
        pipe, prompts = self.pipe, list(prompts)
        features, pooled = [], []
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            features.append(out.hidden_states[-2].to(pipe.text_encoder.dtype))  # (B, 77, D_clip), penultimate
            pooled.append(out[0])  # (B, P_clip) text_embeds
        ids = pipe.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        t5 = pipe.text_encoder_3(ids.to(self.device))[0].to(pipe.text_encoder_3.dtype)  # (B, L, D), no mask
        clip = torch.cat(features, dim=-1)  # (B, 77, D_L + D_G)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, D)
        return TextInputs(prompt_embeds=torch.cat([clip, t5], dim=-2),  # (B, 77 + L, D)
                          pooled_prompt_embeds=torch.cat(pooled, dim=-1),
                          tokens=tuple(self.prompt_tokens(p) for p in prompts))

    def prompt_tokens(self, prompt: str) -> PromptTokens:
        """CLIP positions (both CLIPs share them) then T5 positions."""
        words, clip, clip_span = word_map(self.pipe.tokenizer, prompt, self.clip_length, "clip")
        _, t5, t5_span = word_map(self.pipe.tokenizer_3, prompt, self.max_sequence_length, "t5", clip_span.stop)
        return PromptTokens(prompt, words, clip + t5, (clip_span, t5_span))

    def schedule(self, num_steps: int, latent_hw: tuple[int, int], sigma_max: float = 1.0):
        scheduler, mu = self.pipe.scheduler, None
        if scheduler.config.get("use_dynamic_shifting"):  # as StableDiffusion3Pipeline computes it
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            grid = self.grid(latent_hw)
            config = scheduler.config
            mu = calculate_shift(grid.num_tokens, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.16))
        return flow_schedule(scheduler, num_steps, mu=mu, sigma_max=sigma_max)

    def sampler(self):
        return sample_euler

    @torch.no_grad()
    def predict(self, x, i, text, schedule, guidance_scale, layout, attention_kwargs=None):
        model_in = layout.join_guidance(x, x).to(self.device, self.dtype)  # (branches, ...) -> (rows, C, h, w)
        timestep = schedule.timesteps[i].to(self.device).expand(layout.rows)
        v = self.transformer(hidden_states=model_in, timestep=timestep, encoder_hidden_states=text.prompt_embeds,
                             pooled_projections=text.pooled_prompt_embeds, joint_attention_kwargs=attention_kwargs,
                             return_dict=False)[0]
        v = layout.guide(v.to(x.device, x.dtype), guidance_scale)  # (rows, ...) -> (branches, ...)
        return x - schedule.sigmas[i].item() * v

    def attention_layers(self):
        layers = []
        for name in self.transformer.attn_processors:
            match = _LAYER.fullmatch(name)
            if match is None:
                continue
            block, joint = int(match[1]), match[2] == "attn"
            order = (IMAGE, TEXT) if joint else (IMAGE,)
            layers.append(AttentionLayer(name, "joint" if joint else "self", block, order, order))
        return tuple(layers)
