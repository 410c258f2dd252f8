"""Stages 1 and 3: the T5 tokenizer, then a small T5 encoder + PixArtTransformer2DModel trained jointly on VAE latents.

Needs the VAE from `train_vae.py` (`--out/vae`). Latents of a fixed set of training scenes are encoded once and cached
(`--out/latents_<n>.pt`), so training never runs the VAE. Epsilon-prediction MSE on PixArt's schedule (linear betas
1e-4..0.02, 1000 steps) on the first 4 of the 8 output channels; the caption is dropped 10% of the time (the empty
prompt, encoded exactly as the pipeline encodes it) for classifier-free guidance; 128x128 plus 256x128 / 128x256
buckets. Resumable: rerun the same command to continue from `--out/dit.ckpt`. Saves the whole pipeline at the end.

    python training/train_dit.py --out training/runs/shapes --steps 2000
"""

from __future__ import annotations

import argparse
import copy
import itertools
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
from tqdm import tqdm
from transformers import T5Config, T5EncoderModel, T5Tokenizer

import attention_loss
from common import LossLog, TimeBudget, alphas_cumprod, draw_bucket, load_checkpoint, log, lr_at, pool_scene, save_checkpoint, scene_pool, setup, to_tensor
from dit4edit_research.synthetic import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, SIZES, SceneObject, caption_for
from dit4edit.tiny import pixart_scheduler
from dit4edit.prompts import PIXART_ALPHA_TOKENS as MAX_TOKENS
from dit4edit.tokenizer import train_t5_tokenizer


def grammar_captions(extra_scenes=()) -> list[str]:
    """Every one-object caption (with and without size), the captions of `extra_scenes`, and each word alone 200
    times (without those, sentencepiece's unigram trainer on this tiny corpus keeps only ~40 character-like pieces;
    with them every word but "background" is one piece)."""
    captions = []
    for bg, colour, shape, size, pattern, mention in itertools.product(
        BACKGROUNDS, COLOURS, SHAPES, SIZES, PATTERNS + (None,), (False, True)
    ):
        captions.append(caption_for([SceneObject(shape, colour, size, pattern, 0, 0)], bg, mention))
    captions = sorted(set(captions + [s.caption for s in extra_scenes]))
    words = sorted({w for c in captions for w in c.split()})
    return captions + words * 200


def build_text_encoder(vocab_size: int, d_model: int, layers: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_model // 4,
            d_ff=2 * d_model,
            num_layers=layers,
            num_heads=4,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def build_transformer(width: int, layers: int, caption_channels: int, sample_size: int = 16,
                      patch_size: int = 2, interpolation_scale: int | None = None) -> PixArtTransformer2DModel:
    heads = width // 32
    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=width,
        caption_channels=caption_channels,
        sample_size=sample_size,
        patch_size=patch_size,
        interpolation_scale=interpolation_scale,
        norm_num_groups=32,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )


def tokenize(tokenizer, captions):
    """Exactly as the pipeline: max_length 120, padded to it, truncated, with the attention mask."""
    enc = tokenizer(list(captions), max_length=MAX_TOKENS, padding="max_length", truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, scenes, device, batch: int = 32) -> dict:
    """{(width, height): (latents (n, 4, h/8, w/8) scaled, [captions])} of the posterior means."""
    by_size: dict = {}
    for s in scenes:
        by_size.setdefault((s.width, s.height), []).append(s)
    out = {}
    vae.eval()
    for size, group in by_size.items():
        lats = []
        for i in tqdm(range(0, len(group), batch), desc=f"encode {size}", leave=False):
            x = to_tensor(np.stack([s.image for s in group[i : i + batch]])).to(device)
            lats.append(vae.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist.mode().cpu())
        out[size] = (torch.cat(lats) * vae.config.scaling_factor, [s.caption for s in group])
    return out


@dataclass
class TrainScene:
    """What training keeps of a scene: image, caption and `cover`, the (h/8, w/8) latent pixels an object touches
    (grown by one latent pixel), for the object-weighted loss; `alphas`, each object's coverage, for the attention
    loss."""

    width: int
    height: int
    image: np.ndarray
    caption: str
    cover: np.ndarray
    alphas: np.ndarray


def latent_cover(alphas: np.ndarray, height: int, width: int, dilate: int = 1) -> np.ndarray:
    """(h/8, w/8) float32: 1 where any object covers part of the 8x8 pixel cell or a neighbour within `dilate`."""
    any_alpha = alphas.max(axis=0) if len(alphas) else np.zeros((height, width), np.float32)
    cells = (any_alpha.reshape(height // 8, 8, width // 8, 8).max(axis=(1, 3)) > 0).astype(np.float32)
    padded = np.pad(cells, dilate)
    grown = np.zeros_like(cells)
    for dy in range(2 * dilate + 1):
        for dx in range(2 * dilate + 1):
            grown = np.maximum(grown, padded[dy : dy + cells.shape[0], dx : dx + cells.shape[1]])
    return grown


def _train_scene(k: int) -> TrainScene:
    s = pool_scene(k, k)  # seed k, as scene_pool(0, n)
    return TrainScene(s.width, s.height, s.image, s.caption, latent_cover(s.alphas, s.height, s.width), s.alphas)


def training_scenes(count: int, workers: int = 1) -> list[TrainScene]:
    """The first `count` training scenes (seeds 0..count-1), rendered by `workers` processes."""
    if workers <= 1:
        return [_train_scene(k) for k in tqdm(range(count), desc="render", leave=False)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_train_scene, range(count), chunksize=256)


def object_weights(scenes) -> dict:
    """{(width, height): (n, 1, h/8, w/8) float}: 1 on latent pixels an object touches, else 0.
    Same scene order as `encode_latents`."""
    by_size: dict = {}
    for s in scenes:
        by_size.setdefault((s.width, s.height), []).append(torch.from_numpy(s.cover)[None])
    return {size: torch.stack(ms) for size, ms in by_size.items()}


class EMA:
    def __init__(self, modules: dict, decay: float):
        self.decay = decay
        self.shadow = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        shadow = [e for k in modules for e in self.shadow[k].parameters()]
        live = [q for m in modules.values() for q in m.parameters()]
        torch._foreach_lerp_(shadow, live, 1 - d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("training/runs/shapes"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64, help="128x128 samples per step (non-square buckets: half)")
    p.add_argument("--nonsquare-share", type=float, default=0.25, help="share of steps on 256x128 / 128x256")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--text-lr-mult", type=float, default=2.0, help="T5 and caption projection learn faster")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--drop-caption", type=float, default=0.1)
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="extra loss weight on latent pixels near objects (most of a scene is flat background)")
    p.add_argument("--high-noise-share", type=float, default=0.0,
                   help="share of timesteps drawn from [500, 1000) instead of [0, 1000): layout, colour and count "
                        "are decided at high noise")
    p.add_argument("--min-snr", type=float, default=0.0,
                   help="min-SNR loss weighting with this gamma (e.g. 5; 0 = off): less weight on nearly clean steps")
    p.add_argument("--attention-loss", type=float, default=0.0,
                   help="weight of the cross-attention localisation loss (training/attention_loss.py; 0 = off)")
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--t5-width", type=int, default=128)
    p.add_argument("--t5-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--patch-size", type=int, default=2, help="transformer patch size (1: a 16x16 token grid at 128 px)")
    p.add_argument("--interpolation-scale", type=int, default=None,
                   help="PixArt's positional-embedding scale (default: --init-from's, times its patch / --patch-size, so "
                        "the weights keep the positions they learned; without --init-from, PixArt's default)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a pipeline folder to start from: its tokenizer, VAE and T5 are used, and every transformer "
                        "tensor whose shape matches is copied (width and depth must match to copy the blocks); a "
                        "coarser patch (2 -> 1) is refined: patch embedding and output layer mapped, positions kept")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (fp32 weights)")
    p.add_argument("--scenes", type=int, default=6000, help="training scenes encoded once (seeds 0..)")
    p.add_argument("--workers", type=int, default=1, help="processes that render the training scenes")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training steps: --steps is set from the speed of steps 10-40 (logged; rerun "
                        "with that --steps to replay the run)")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--stop-at", type=int, default=None, help="stop (checkpoint saved) at this step; the schedule keeps --steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fp16", action="store_true", help="store the saved pipeline's weights as float16")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    device = setup(args.threads)
    torch.manual_seed(args.seed)
    if args.init_from:  # before any heavy work: can the weights be copied or refined onto this patch size?
        source = PixArtTransformer2DModel.load_config(args.init_from / "transformer")
        if source["patch_size"] % args.patch_size:
            raise SystemExit(f"--init-from has patch {source['patch_size']}: it refines to a patch that divides it, "
                             f"not to --patch-size {args.patch_size}")
        if args.interpolation_scale is None:  # keep the positions the weights learned
            args.interpolation_scale = source["patch_size"] // args.patch_size * positional_scale(source)

    # Stage 1: tokenizer on the caption grammar.
    tok_dir = args.out / "tokenizer"
    if args.init_from and not tok_dir.exists():
        T5Tokenizer.from_pretrained(args.init_from / "tokenizer").save_pretrained(tok_dir)
    if tok_dir.exists():
        tokenizer = T5Tokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_t5_tokenizer(grammar_captions(scene_pool(0, 300)), vocab_size=args.vocab)
        tokenizer.save_pretrained(tok_dir)
    log.info("tokenizer: %d pieces; %s", len(tokenizer), tokenizer.tokenize("a large red striped circle and a "
                                                                          "small blue dotted star on a beige background"))

    vae_dir = args.init_from / "vae" if args.init_from else args.out / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).to(device, memory_format=torch.channels_last)
    cache = args.out / f"latents_{args.scenes}.pt"
    covers = args.out / f"covers_{args.scenes}.pt"
    targets_path = args.out / f"attention_{args.scenes}_p{args.patch_size}.pt"
    scenes = None  # rendered at most once, for whatever is not cached yet
    if cache.exists() and covers.exists():
        data = torch.load(cache, weights_only=False)
        weights_by_bucket = torch.load(covers)
    else:
        t0 = time.time()
        scenes = training_scenes(args.scenes, args.workers)
        log.info("rendered %d scenes in %.0fs", args.scenes, time.time() - t0)
        data = encode_latents(vae, scenes, device)
        weights_by_bucket = object_weights(scenes)
        torch.save(data, cache)
        torch.save(weights_by_bucket, covers)
        log.info("rendered and encoded %d scenes in %.0fs", args.scenes, time.time() - t0)
    attention_targets = None
    if args.attention_loss:
        if targets_path.exists():
            attention_targets = torch.load(targets_path)
        else:
            scenes = scenes or training_scenes(args.scenes, args.workers)
            attention_targets = attention_loss.attention_targets(scenes, tokenizer, 8 * args.patch_size, MAX_TOKENS)
            torch.save(attention_targets, targets_path)
        for size, (maps, _) in attention_targets.items():
            if len(maps) != len(data[size][0]):
                raise SystemExit(f"{targets_path} has {len(maps)} scenes of {size}, the latents {len(data[size][0])}")
    del scenes
    del vae
    if not args.object_weight:
        weights_by_bucket = None
    buckets = sorted(data)  # [(128, 128), (128, 256), (256, 128)]
    square = (128, 128)
    others = [b for b in buckets if b != square]
    ids_by_bucket = {b: tokenize(tokenizer, data[b][1]) for b in buckets}
    empty_ids, empty_mask = tokenize(tokenizer, [""])

    text_encoder = build_text_encoder(len(tokenizer), args.t5_width, args.t5_layers).to(device)
    transformer = build_transformer(args.width, args.layers, args.t5_width, patch_size=args.patch_size,
                                    interpolation_scale=args.interpolation_scale).to(device)
    if args.init_from and not (args.out / "dit.ckpt").exists():  # a resumed run loads its checkpoint instead
        copied = warm_start(text_encoder, T5EncoderModel, args.init_from / "text_encoder")
        copied += warm_start(transformer, PixArtTransformer2DModel, args.init_from / "transformer",
                             refine_patch=args.patch_size)
        log.info("warm start from %s: %d tensors copied", args.init_from, copied)
    log.info("T5: %.2fM, transformer: %.2fM parameters",
             sum(q.numel() for q in text_encoder.parameters()) / 1e6,
             sum(q.numel() for q in transformer.parameters()) / 1e6)
    text_params = list(text_encoder.parameters()) + list(transformer.caption_projection.parameters())
    text_ids = {id(q) for q in text_params}
    main_params = [q for q in transformer.parameters() if id(q) not in text_ids]
    opt = torch.optim.AdamW([{"params": main_params, "mult": 1.0},
                             {"params": text_params, "mult": args.text_lr_mult}], lr=args.lr, weight_decay=0.01,
                            fused=device.type == "cuda")
    modules = {"text_encoder": text_encoder, "transformer": transformer}
    ema = EMA(modules, args.ema)
    abar = alphas_cumprod().to(device)
    attention_store = attention_loss.install_recording(transformer) if attention_targets is not None else None

    ckpt_path = args.out / "dit.ckpt"
    start = 0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        text_encoder.load_state_dict(state["text_encoder"])
        transformer.load_state_dict(state["transformer"])
        for k in modules:
            ema.shadow[k].load_state_dict(state["ema"][k])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        if args.time_budget:
            args.steps = state["args"]["steps"]  # the schedule the budget fixed when the run started
        log.info("resumed from step %d", start)

    loss_log = LossLog(args.out / "dit_loss.jsonl")
    text_encoder.train()
    transformer.train()
    stop = args.stop_at or args.steps
    bar = tqdm(total=stop, initial=start, disable=args.no_progress)
    budget = TimeBudget(args, start, bar)
    t_begin = time.time()
    step = start
    while step < stop:
        stop = budget.stop_at(step, stop)
        rng, bucket, batch = draw_bucket(args, step, square, others)
        latents_all, _ = data[bucket]
        batch = min(batch, len(latents_all))  # a toy run's small bucket: all of it, each scene once
        idx = torch.from_numpy(rng.choice(len(latents_all), size=batch, replace=False))
        x0 = latents_all[idx].to(device)
        ids, mask = ids_by_bucket[bucket][0][idx], ids_by_bucket[bucket][1][idx]
        drop = torch.from_numpy(rng.random(batch) < args.drop_caption)
        ids = torch.where(drop[:, None], empty_ids, ids)
        mask = torch.where(drop[:, None], empty_mask, mask)
        # Padding is masked out of T5 and of the cross-attention, so cutting it is exact (and much faster).
        length = int(mask.sum(1).max())
        ids, mask = ids[:, :length].to(device), mask[:, :length].to(device)
        t = rng.integers(0, 1000, size=batch)
        high = rng.random(batch) < args.high_noise_share
        t = torch.from_numpy(np.where(high, rng.integers(500, 1000, size=batch), t)).to(device)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = abar[t].sqrt()[:, None, None, None]
        s = (1 - abar[t]).sqrt()[:, None, None, None]
        xt = a * x0 + s * noise

        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup) * group["mult"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            emb = text_encoder(input_ids=ids, attention_mask=mask)[0]
            out = transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        eps = out.float().chunk(2, dim=1)[0]  # PixArt's second half is the learned-sigma output; unused here
        if weights_by_bucket is not None:
            w = 1.0 + args.object_weight * weights_by_bucket[bucket][idx].to(device)  # (B, 1, h, w)
        else:
            w = torch.ones_like(x0[:, :1])
        if args.min_snr:
            # Min-SNR weighting (Hang et al. 2023) for epsilon prediction: min(SNR, gamma) / SNR per sample.
            snr = abar[t] / (1 - abar[t])
            w = w * (snr.clamp(max=args.min_snr) / snr)[:, None, None, None]
        loss = ((eps - noise) ** 2 * w).mean() / w.mean()
        extra = {}
        if attention_store is not None:
            maps, regions = attention_targets[bucket]
            regions = torch.where(drop[:, None], -1, regions[idx][:, :length]).to(device)
            localisation = attention_loss.localisation_loss(attention_store, regions, maps[idx].to(device))
            extra["diffusion_loss"] = loss.item()
            attention_store.clear()
            loss = loss + args.attention_loss * localisation
            extra["attention_loss"] = localisation.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(text_encoder.parameters()) + list(transformer.parameters()), 1.0)
        opt.step()
        ema.update(modules, step)
        loss_log.write(step=step + 1, loss=loss.item(), grad_norm=float(grad_norm), bucket=list(bucket),
                       lr=opt.param_groups[0]["lr"], **extra)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        step += 1
        if step % args.ckpt_every == 0 or step == stop:
            save_checkpoint(ckpt_path, text_encoder=text_encoder.state_dict(), transformer=transformer.state_dict(),
                            ema={k: m.state_dict() for k, m in ema.shadow.items()}, opt=opt.state_dict(),
                            step=step, args=vars(args))
    bar.close()
    log.info("%d steps in %.0fs", step - start, time.time() - t_begin)

    if stop < args.steps:
        return 0
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    for name, weights in (("pipeline", modules), ("pipeline_ema", ema.shadow)):
        save_pipeline(args.out / name, tokenizer, weights["text_encoder"], vae, weights["transformer"], args.fp16)
    log.info("saved %s and %s", args.out / "pipeline", args.out / "pipeline_ema")
    return 0


def positional_scale(config) -> int:
    """The positional-embedding interpolation scale a PixArt transformer with this config uses."""
    return config.get("interpolation_scale") or max(config["sample_size"] // 64, 1)


def refine_patch_tensors(source: dict, patch: int, fine: int, out_channels: int) -> dict:
    """A patch-`patch` transformer's patch embedding and output layer, mapped to patch `fine` (a divisor).

    A fine token sees the pixels a coarse token would see if each were repeated k x k times (k = patch / fine): its
    embedding kernel is the coarse kernel summed over each k x k block. A fine token predicts the mean of the coarse
    token's k x k sub-pixel predictions. On a latent that is constant over k x k blocks the refined model (with the
    positions scaled by k) starts close to the coarse one; training takes it from there.
    """
    k = patch // fine
    if k * fine != patch:
        raise ValueError(f"patch {fine} does not divide patch {patch}")
    weight = source["pos_embed.proj.weight"]  # (D, C, P, P)
    d, c = weight.shape[:2]
    out = {"pos_embed.proj.weight": weight.reshape(d, c, fine, k, fine, k).sum((3, 5)),
           "pos_embed.proj.bias": source["pos_embed.proj.bias"]}
    # proj_out rows are ordered (row, column, channel) within the patch: PixArt's unpatchify.
    w, b = source["proj_out.weight"], source["proj_out.bias"]
    out["proj_out.weight"] = w.reshape(fine, k, fine, k, out_channels, -1).mean((1, 3)).reshape(-1, w.shape[-1])
    out["proj_out.bias"] = b.reshape(fine, k, fine, k, out_channels).mean((1, 3)).reshape(-1)
    return out


def warm_start(module: torch.nn.Module, cls, folder: Path, refine_patch: int | None = None) -> int:
    """Copy into `module` every tensor of the pretrained `cls` in `folder` whose name and shape match; with
    `refine_patch`, a coarser-patch source's patch embedding and output layer are mapped (`refine_patch_tensors`)."""
    pretrained = cls.from_pretrained(folder, torch_dtype=torch.float32)
    source = pretrained.state_dict()
    if refine_patch and pretrained.config.patch_size != refine_patch:
        source.update(refine_patch_tensors(source, pretrained.config.patch_size, refine_patch,
                                           pretrained.config.out_channels))
    target = module.state_dict()
    matched = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    module.load_state_dict(matched, strict=False)
    return len(matched)


def save_pipeline(folder: Path, tokenizer, text_encoder, vae, transformer, fp16: bool = False) -> None:
    dtype = torch.float16 if fp16 else torch.float32
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=copy.deepcopy(text_encoder).to("cpu", dtype).eval(),
        vae=copy.deepcopy(vae).to("cpu", dtype).eval(),
        transformer=copy.deepcopy(transformer).to("cpu", dtype).eval(),
        scheduler=pixart_scheduler(),
    )
    pipe.save_pretrained(folder)


if __name__ == "__main__":
    raise SystemExit(main())
