"""Tiny PixArt-architecture components with random weights, for tests and for a demo without real weights.

They use the very classes a real PixArt-alpha checkpoint loads (`PixArtTransformer2DModel`, `AutoencoderKL`,
`T5EncoderModel`, `T5Tokenizer`, `DPMSolverMultistepScheduler`), so every code path they exercise is the real one.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel

from .tokenizer import train_t5_tokenizer

#: The scheduler configuration PixArt-alpha checkpoints ship (`scheduler/scheduler_config.json`).
PIXART_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    timestep_spacing="linspace",
    steps_offset=0,
)

TINY_CAPTIONS = [
    f"a {size}{colour} {shape} on a {background} background"
    for size in ("", "large ", "small ")
    for colour in ("red", "green", "blue", "yellow", "purple", "orange")
    for shape in ("circle", "square", "triangle", "star", "cat", "dog")
    for background in ("white", "black", "gray", "beige")
] + [
    "a photo of a cat sitting on a wooden table",
    "an elephant walking through tall grass, at sunset",
    "a watercolor painting of a lighthouse by the sea",
    "two dogs and a bicycle in the snow!",
]


def pixart_xl_transformer(blocks: int = 28, sample_size: int = 64) -> PixArtTransformer2DModel:
    """The PixArt-XL-2 transformer architecture (16 heads x 72 = 1152 wide, T5-XXL captions) with random weights and
    `blocks` of its 28 blocks, for speed benchmarks (weights do not change speed). `sample_size` 64 is the 512 model,
    128 the 1024-MS model, which also takes resolution / aspect-ratio conditions."""
    return PixArtTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=blocks,
        cross_attention_dim=1152,
        caption_channels=4096,
        sample_size=sample_size,
        patch_size=2,
        use_additional_conditions=sample_size == 128,
    )


def pixart_xl_components(blocks: int = 28, t5_layers: int = 24, sample_size: int = 64, device=None) -> dict:
    """PixArt-alpha's full pipeline architecture with random weights, for speed and memory benchmarks: the
    PixArt-XL-2 transformer (`pixart_xl_transformer`), the SD VAE PixArt uses (sd-vae-ft-ema layout), and a T5 encoder
    shaped like T5-XXL's (4096 wide, 64 heads, 32128-token vocabulary, `t5_layers` of its 24 layers) behind this
    module's small trained tokenizer. Modules are created on `device` (random init of ~5 B parameters is slow on a
    CPU)."""
    tokenizer = train_t5_tokenizer(TINY_CAPTIONS, vocab_size=96)
    with torch.device(device or "cpu"):
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
            feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        ))
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            scaling_factor=0.18215,
        )
        transformer = pixart_xl_transformer(blocks, sample_size)
    for module in (text_encoder, vae, transformer):
        module.eval()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                scheduler=pixart_scheduler())


def pixart_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG)


def tiny_transformer(num_layers: int = 2, *, sample_size: int = 8, micro_conditions: bool = False,
                     caption_channels: int = 32, patch_size: int = 2) -> PixArtTransformer2DModel:
    """A random-weight PixArt transformer, 2 heads x 8 wide (x 12 with micro-conditions), patch 2 (PixArt's) unless
    `patch_size` says otherwise, captions `caption_channels` wide (the tiny T5's width)."""
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12 if micro_conditions else 8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=24 if micro_conditions else 16,
        caption_channels=caption_channels,
        sample_size=sample_size,
        patch_size=patch_size,
        norm_num_groups=4,
        use_additional_conditions=micro_conditions,
    ).eval()


def gaussian_denoiser(schedule, c: float = 0.5):
    """The exact denoiser of data `x0 ~ N(0, c^2 I)` on a `solvers.Schedule`: `D(x_i) = a c^2 x / (a^2 c^2 + s^2)`
    at point i, an analytic model whose inversions tests and benchmarks can check exactly."""

    def denoise(x, i):
        a, s = schedule.alphas[i], schedule.sigmas[i]
        return a * c**2 * x / (a**2 * c**2 + s**2)

    return denoise


def tiny_components(seed: int = 0, *, sample_size: int = 8, micro_conditions: bool = False) -> dict:
    """Random-weight PixArt components: 2 transformer blocks, a 3-downsample VAE, a 2-layer T5.

    `sample_size` is the latent side the transformer's position embedding is built for (any size runs);
    `micro_conditions=True` makes the transformer take resolution/aspect-ratio conditions like the 1024 model.
    """
    torch.manual_seed(seed)
    tokenizer = train_t5_tokenizer(TINY_CAPTIONS, vocab_size=96)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 8,
        scaling_factor=5.0,  # brings this random VAE's latents to about unit scale, like a trained one
    )
    transformer = tiny_transformer(sample_size=sample_size, micro_conditions=micro_conditions)
    for module in (text_encoder, vae, transformer):
        module.eval()
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=pixart_scheduler(),
    )
