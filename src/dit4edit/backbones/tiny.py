"""Tiny random-weight pipelines of every family, saved as folders diffusers loads as the family's own pipeline.

Sizes follow diffusers' own fast tests (SD3: 4 layers, patch 1, head dim 8; SD3.5: dual attention in block 0 and RMS
q/k norm; FLUX: 1 double- and 1 single-stream block, rope axes [4, 4, 8]; one-level VAEs), with two changes that
let the tests see more: the CLIP encoders of SD3 are 16 wide, so their features sit side by side *and* get
zero-padded to the T5 width (48) as in the real models, and the VAEs carry the real models' scaling and shift.
Tokenizers are built here from a few sentences (no hub): a byte-level BPE CLIP tokenizer and a sentencepiece T5.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny import TINY_CAPTIONS, tiny_components

#: `make_tiny_model`'s families: the pipeline each folder loads as.
TINY_FAMILIES = {
    "pixart": "PixArtAlphaPipeline",
    "sigma": "PixArtSigmaPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd3.5": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}

CLIP_MAX_LENGTH = 77  # CLIP's context, as every SD3 / FLUX checkpoint's tokenizer has it


def train_clip_tokenizer(sentences=TINY_CAPTIONS, merges: int = 400):
    """A CLIP tokenizer (byte-level BPE, words end in `</w>`, lower case, `<|startoftext|>` ... `<|endoftext|>`)
    with merges learnt from `sentences` by the `tokenizers` library. Every byte is in the vocabulary, so any text
    encodes; words outside `sentences` split into several pieces, as rare words do in the real one."""
    # Deferred: only model building needs the tokenizer libraries.
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=merges, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(sentences), trainer)
    learnt = bpe.get_vocab()
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(bpe)]
    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = base + [b + "</w>" for b in base]  # CLIP's layout: bytes, bytes ending a word, merges, specials
    seen = set(tokens)
    for a, b in pairs:
        if a + b not in seen and a + b in learnt:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[p for p in pairs if p[0] + p[1] in seen],
                         model_max_length=CLIP_MAX_LENGTH)


def _merges(bpe) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]


def tiny_clip(tokenizer, hidden_size: int, projection: bool, seed: int):
    """A 5-layer CLIP text encoder (diffusers' test size) over `tokenizer`'s vocabulary and special ids."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        vocab_size=max(1000, len(tokenizer)), projection_dim=32, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=CLIP_MAX_LENGTH,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_t5(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )).eval()


def tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float, seed: int):
    """diffusers' test VAE (one level: 1 latent pixel per image pixel)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    ).eval()


def tiny_sd3_components(dual: bool = False, seed: int = 0) -> dict:
    """`StableDiffusion3Pipeline` components: SD3 (`dual=False`) or SD3.5 (`dual=True`: image-only `attn2` in block
    0, RMS q/k norms)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from ..tokenizer import train_t5_tokenizer

    clip = train_clip_tokenizer()
    t5_tokenizer = train_t5_tokenizer(TINY_CAPTIONS, vocab_size=96, max_length=256)
    torch.manual_seed(seed)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if dual else {}
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=48, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=96, **extra,
    ).eval()
    return dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(4, scaling_factor=1.5305, shift_factor=0.0609, seed=seed + 1),
        text_encoder=tiny_clip(clip, 16, projection=True, seed=seed + 2),
        tokenizer=clip,
        text_encoder_2=tiny_clip(clip, 16, projection=True, seed=seed + 3),
        tokenizer_2=train_clip_tokenizer(),
        text_encoder_3=tiny_t5(t5_tokenizer, 48, seed=seed + 4),
        tokenizer_3=t5_tokenizer,
        image_encoder=None,
        feature_extractor=None,
    )


def tiny_flux_components(guidance_distilled: bool = True, seed: int = 0) -> dict:
    """`FluxPipeline` components: FLUX.1-dev-like (`guidance_distilled`: a guidance embedding, dynamic shifting)
    or schnell-like (neither)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from ..tokenizer import train_t5_tokenizer

    clip = train_clip_tokenizer()
    t5_tokenizer = train_t5_tokenizer(TINY_CAPTIONS, vocab_size=96, max_length=512)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_distilled,
    ).eval()
    if guidance_distilled:  # FLUX.1-dev's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return dict(
        scheduler=scheduler,
        vae=tiny_vae(1, scaling_factor=0.3611, shift_factor=0.1159, seed=seed + 1),
        text_encoder=tiny_clip(clip, 32, projection=False, seed=seed + 2),
        tokenizer=clip,
        text_encoder_2=tiny_t5(t5_tokenizer, 32, seed=seed + 3),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def tiny_pipeline(family: str, seed: int = 0):
    """The family's own diffusers pipeline over tiny random components (`TINY_FAMILIES`)."""
    import diffusers

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}, got {family!r}")
    pipeline_class = getattr(diffusers, TINY_FAMILIES[family])
    if family in ("pixart", "sigma"):
        components = tiny_components(seed=seed)
    elif family in ("sd3", "sd3.5"):
        components = tiny_sd3_components(dual=family == "sd3.5", seed=seed)
    else:
        components = tiny_flux_components(guidance_distilled=family == "flux", seed=seed)
    return pipeline_class(**components)


def make_tiny_model(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight model of `family` (pixart | sigma | sd3 | sd3.5 | flux | flux-schnell) to `folder`
    in diffusers layout (safetensors); `diffusers.DiffusionPipeline.from_pretrained(folder)` loads it as the family's
    own pipeline. Returns the folder."""
    folder = Path(folder)
    tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder
