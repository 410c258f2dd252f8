"""Benchmark a shapes model: oracle accuracy of images generated for held-out captions, and VAE round-trip PSNR.

Held-out scenes use seeds from 10**9 on (training uses seeds below 10**6). Generation: DPM-Solver++(2M) with PixArt's
scheduler config, classifier-free guidance against the empty prompt, prompts encoded exactly as the pipeline does
(120 T5 tokens, padded, attention mask to T5 and to the transformer). Prints a table and writes JSON.

    python training/eval_generation.py --model src/dit4edit/models/shapes --json training/runs/shapes/eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import PixArtAlphaPipeline
from PIL import Image

from common import psnr, setup, to_tensor, to_uint8
from dit4edit_research.bench_synthetic import held_out_scenes
from dit4edit_research.synthetic import caption_hits, oracle
from dit4edit.tiny import pixart_scheduler
from dit4edit.prompts import PIXART_ALPHA_TOKENS as MAX_TOKENS


def encode_prompts(tokenizer, text_encoder, prompts, device):
    enc = tokenizer(list(prompts), max_length=MAX_TOKENS, padding="max_length", truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    return text_encoder(ids, attention_mask=mask)[0], mask


@torch.no_grad()
def generate(pipe, prompts, width, height, steps=20, guidance=4.5, seed=0, device="cpu") -> np.ndarray:
    """(B, H, W, 3) uint8 images for `prompts` at one canvas size."""
    emb, mask = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, device)
    neg, neg_mask = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""] * len(prompts), device)
    cond = torch.cat([neg, emb])  # batch layout: [uncond..., cond...]
    cond_mask = torch.cat([neg_mask, mask])
    scheduler = pixart_scheduler()
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((len(prompts), 4, height // 8, width // 8), generator=gen).to(device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = torch.cat([latents, latents])
        out = pipe.transformer(inp, encoder_hidden_states=cond, encoder_attention_mask=cond_mask,
                               timestep=t.expand(inp.shape[0]).to(device),
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        eps_uncond, eps_cond = out.chunk(2, dim=1)[0].chunk(2)  # first 4 channels: epsilon; then uncond / cond
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return to_uint8(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("src/dit4edit/models/shapes"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--grid", type=Path, default=None, help="save the first 32 generations as a picture grid")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    device = setup(args.threads)
    t0 = time.time()
    pipe = PixArtAlphaPipeline.from_pretrained(str(args.model), torch_dtype=torch.float32).to(device)
    load_s = time.time() - t0
    scenes = held_out_scenes(args.n)

    # VAE round trip (posterior mode), per object colour.
    t0 = time.time()
    vae_psnr, per_colour = [], {}
    with torch.no_grad():
        for s in scenes:
            x = to_tensor(s.image[None]).to(device)
            rec = to_uint8(pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample)[0]
            v = psnr(rec, s.image)
            vae_psnr.append(v)
            for o in s.objects:
                per_colour.setdefault(o.colour, []).append(v)
    vae_s = time.time() - t0

    # Generation for the held-out captions, batched per canvas size.
    t0 = time.time()
    images: dict[int, np.ndarray] = {}
    by_size: dict = {}
    for k, s in enumerate(scenes):
        by_size.setdefault((s.width, s.height), []).append(k)
    for (w, h), ks in by_size.items():
        for i in range(0, len(ks), args.batch):
            chunk = ks[i : i + args.batch]
            out = generate(pipe, [scenes[k].caption for k in chunk], w, h, args.steps, args.guidance,
                           args.seed + chunk[0], device)
            for k, img in zip(chunk, out):
                images[k] = img
    gen_s = time.time() - t0
    hits = {"background": [], "count": [], "colour": [], "shape": [], "pattern": [], "size": [], "colour_any": [],
            "shape_any": []}
    by_bucket: dict = {}
    for k, s in enumerate(scenes):
        r = caption_hits(oracle(images[k]), s)
        for key in hits:
            vals = r[key] if isinstance(r[key], list) else [r[key]]
            hits[key] += vals
            by_bucket.setdefault(f"{s.width}x{s.height}", {}).setdefault(key, []).extend(vals)
    acc = {k: float(np.mean(v)) if v else None for k, v in hits.items()}
    result = {
        "model": str(args.model), "n": args.n, "steps": args.steps, "guidance": args.guidance,
        "accuracy": acc, "counts": {k: len(v) for k, v in hits.items()},
        "accuracy_by_canvas": {b: {k: float(np.mean(v)) for k, v in d.items() if v} for b, d in by_bucket.items()},
        "vae_psnr": float(np.mean(vae_psnr)),
        "vae_psnr_by_colour": {c: float(np.mean(v)) for c, v in sorted(per_colour.items())},
        "seconds": {"load": load_s, "vae": vae_s, "generation": gen_s},
    }
    print(f"{'metric':<22}{'value':>10}")
    for k, v in acc.items():
        print(f"{k + ' accuracy':<22}{'n/a' if v is None else f'{100 * v:9.1f}%':>10}  ({len(hits[k])} items)")
    print(f"{'VAE PSNR (dB)':<22}{result['vae_psnr']:>10.2f}")
    for c, v in result["vae_psnr_by_colour"].items():
        print(f"{'  ' + c:<22}{v:>10.2f}")
    print(f"seconds: load {load_s:.1f}, VAE {vae_s:.1f}, generation {gen_s:.1f} ({args.n} images, {args.steps} steps)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.grid:
        tiles = [Image.fromarray(images[k]).resize((96, 96)) for k in range(min(32, args.n))]
        grid = Image.new("RGB", (8 * 96, ((len(tiles) + 7) // 8) * 96), (255, 255, 255))
        for i, tile in enumerate(tiles):
            grid.paste(tile, ((i % 8) * 96, (i // 8) * 96))
        grid.save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
