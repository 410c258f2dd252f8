"""Stage 2: train the small AutoencoderKL (factor 8, 4 latent channels) on synthetic scenes.

Recipe: object-centred random crops (most of an image is flat background, the edges are what is hard), L1 + MSE
loss with a tiny KL weight, AdamW with warmup + cosine decay, then a final phase on whole 128x128 images so the
GroupNorm statistics match full-canvas use. Resumable: rerun the same command to continue from `--out/vae.ckpt`.

    python training/train_vae.py --out training/runs/shapes --steps 3000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from common import (HELD_OUT_SEED, LossLog, log, lr_at, psnr, resume, save_checkpoint, scene_pool, setup,
                    to_tensor, to_uint8)


def build_vae(channels=(16, 32, 64, 64), layers_per_block=1, groups=8) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=128,
        mid_block_add_attention=False,
    )


def crop_batch(images, centres, rng, batch: int, crop: int, object_share: float = 0.8) -> np.ndarray:
    """`batch` crops of crop x crop; with probability `object_share` the crop contains an object's centre."""
    out = np.empty((batch, crop, crop, 3), dtype=np.uint8)
    for b in range(batch):
        k = int(rng.integers(len(images)))
        img = images[k]
        h, w = img.shape[:2]
        if rng.random() < object_share and centres[k]:
            cx, cy = centres[k][int(rng.integers(len(centres[k])))]
            x0 = int(np.clip(cx - rng.uniform(0.15, 0.85) * crop, 0, w - crop))
            y0 = int(np.clip(cy - rng.uniform(0.15, 0.85) * crop, 0, h - crop))
        else:
            x0, y0 = int(rng.integers(w - crop + 1)), int(rng.integers(h - crop + 1))
        out[b] = img[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < 0.5:  # flips are free augmentation for an autoencoder
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


@torch.no_grad()
def evaluate(vae: AutoencoderKL, scenes, device) -> dict:
    """PSNR of the posterior-mode round trip on whole held-out scenes: mean, and per object colour."""
    vae.eval()
    values, per_colour = [], {}
    for scene in scenes:
        x = to_tensor(scene.image[None]).to(device)
        rec = to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample)[0]
        value = psnr(rec, scene.image)
        values.append(value)
        for obj in scene.objects:
            per_colour.setdefault(obj.colour, []).append(value)
    vae.train()
    return {"psnr": float(np.mean(values)), **{f"psnr_{c}": float(np.mean(v)) for c, v in sorted(per_colour.items())}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("training/runs/shapes"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--full-share", type=float, default=0.2, help="last share of steps on whole 128x128 images")
    p.add_argument("--batch", type=int, default=16, help="crops per step (whole images: batch * crop^2 / 128^2)")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 64])
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--pool", type=int, default=4000, help="training scenes (seeds 0..pool-1)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--stop-at", type=int, default=None, help="stop (and save) at this step; the schedule keeps --steps")
    p.add_argument("--decoder-only", action="store_true",
                   help="phase 2: load --out/vae, freeze the encoder (the latent space is then fixed, so the "
                        "transformer can train on it meanwhile) and train the decoder on whole images into --out/vae_decoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    device = setup(args.threads)
    torch.manual_seed(args.seed)
    if args.decoder_only:
        return train_decoder(args, device)

    vae = build_vae(args.channels, args.layers_per_block).to(device, memory_format=torch.channels_last)
    log.info("VAE: %.2fM parameters", sum(q.numel() for q in vae.parameters()) / 1e6)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ckpt_path = args.out / "vae.ckpt"
    start = resume(ckpt_path, vae, opt)

    t0 = time.time()
    pool = scene_pool(0, args.pool)
    images = [s.image for s in pool]
    centres = [[(o.cx, o.cy) for o in s.objects] for s in pool]
    square = [k for k, s in enumerate(pool) if s.width == s.height == 128]
    held_out = scene_pool(HELD_OUT_SEED, 40)
    log.info("rendered %d training scenes in %.1fs", len(pool), time.time() - t0)
    loss_log = LossLog(args.out / "vae_loss.jsonl")
    full_from = int(args.steps * (1 - args.full_share))
    full_batch = max(1, args.batch * args.crop**2 // 128**2)

    vae.train()
    stop = args.stop_at or args.steps
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=args.no_progress)
    for step in bar:
        rng = np.random.default_rng([args.seed, step])  # per-step data: resuming replays the same batches
        if step < full_from:
            batch = crop_batch(images, centres, rng, args.batch, args.crop)
        else:
            idx = rng.choice(square, size=full_batch, replace=False)
            batch = np.stack([images[k] for k in idx])
        x = to_tensor(batch).to(device).contiguous(memory_format=torch.channels_last)  # ~5x faster convs on CPU
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        posterior = vae.encode(x).latent_dist
        gen = torch.Generator(device).manual_seed(args.seed * 100003 + step)
        rec = vae.decode(posterior.sample(generator=gen)).sample
        l1 = (rec - x).abs().mean()
        l2 = ((rec - x) ** 2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + l2 + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        row = dict(step=step + 1, loss=loss.item(), l1=l1.item(), l2=l2.item(), kl=kl.item(),
                   lr=opt.param_groups[0]["lr"], psnr_batch=float(10 * np.log10(4.0 / max(l2.item(), 1e-10))))
        if (step + 1) % args.eval_every == 0 or step + 1 == stop:
            row.update(evaluate(vae, held_out, device))
            log.info("step %d: held-out PSNR %.2f dB", step + 1, row["psnr"])
        loss_log.write(**row)
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{row['psnr_batch']:.1f}")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == stop:
            save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1,
                            config=dict(vae.config), args=vars(args))

    # Scaling factor measured on the data (as SD's 0.18215 was): 1 / std of posterior means over training scenes.
    vae.eval()
    with torch.no_grad():
        sample = np.stack([images[k] for k in square[:256]])
        lat = torch.cat([vae.encode(to_tensor(sample[i : i + 32]).to(device)).latent_dist.mode()
                         for i in range(0, len(sample), 32)])
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(args.out / "vae")
    final = evaluate(vae, held_out, device)
    log.info("done: scaling_factor %.4f, held-out PSNR %.2f dB, %s", scaling, final["psnr"], final)
    loss_log.write(step=stop, final=True, scaling_factor=scaling, **final)
    return 0


def train_decoder(args, device) -> int:
    """Phase 2: frozen encoder (posterior moments of the pool computed once), decoder trained on whole images of
    every canvas bucket (so its GroupNorm statistics are those of real use), MSE + L1."""
    vae = AutoencoderKL.from_pretrained(args.out / "vae").to(device, memory_format=torch.channels_last)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ckpt_path = args.out / "vae_decoder.ckpt"
    start = resume(ckpt_path, vae, opt, "decoder training")
    pool = scene_pool(0, args.pool)
    held_out = scene_pool(HELD_OUT_SEED, 40)
    by_size: dict = {}
    for s in pool:
        by_size.setdefault((s.width, s.height), []).append(s.image)
    moments = {}
    vae.eval()
    with torch.no_grad():
        for size, imgs in by_size.items():
            moments[size] = torch.cat([
                vae.encode(to_tensor(np.stack(imgs[i : i + 32])).to(device).contiguous(memory_format=torch.channels_last)
                           ).latent_dist.parameters.cpu() for i in range(0, len(imgs), 32)])
            by_size[size] = np.stack(imgs)
    log.info("encoded the pool with the frozen encoder")
    sizes = sorted(by_size)
    loss_log = LossLog(args.out / "vae_decoder_loss.jsonl")
    vae.decoder.train()
    stop = args.stop_at or args.steps
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=args.no_progress)
    for step in bar:
        rng = np.random.default_rng([args.seed, 1, step])
        size = (128, 128) if rng.random() < 0.6 else sizes[int(rng.integers(len(sizes)))]
        n = args.batch * args.crop**2 // (size[0] * size[1])
        idx = rng.choice(len(by_size[size]), size=max(n, 1), replace=False)
        x = to_tensor(by_size[size][idx]).to(device).contiguous(memory_format=torch.channels_last)
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        gen = torch.Generator(device).manual_seed(args.seed * 100003 + step)
        z = DiagonalGaussianDistribution(moments[size][torch.from_numpy(idx)].to(device)).sample(generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l2 = ((rec - x) ** 2).mean()
        loss = l1 + l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        row = dict(step=step + 1, loss=loss.item(), l1=l1.item(), l2=l2.item(), lr=opt.param_groups[0]["lr"],
                   psnr_batch=float(10 * np.log10(4.0 / max(l2.item(), 1e-10))))
        if (step + 1) % args.eval_every == 0 or step + 1 == stop:
            row.update(evaluate(vae, held_out, device))
            vae.requires_grad_(False)
            for q in params:
                q.requires_grad_(True)
            vae.encoder.eval()
            log.info("decoder step %d: held-out PSNR %.2f dB", step + 1, row["psnr"])
        loss_log.write(**row)
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{row['psnr_batch']:.1f}")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == stop:
            save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1, args=vars(args))
            vae.save_pretrained(args.out / "vae_decoder")  # usable at any time by export.py
    final = evaluate(vae, held_out, device)
    loss_log.write(step=stop, final=True, **final)
    log.info("decoder done: held-out PSNR %.2f dB, %s", final["psnr"], final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
