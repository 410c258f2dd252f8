"""Where does a shapes model lose (or never learn) an attribute? A one-step probe of its denoiser.

Held-out one-object scenes are encoded, noised to a timestep t with fixed noise, and denoised in one step to the
model's data prediction x0 = (x_t - sigma_t * eps) / alpha_t under three captions: the true one, one with the shape
word swapped, one with the colour word swapped. The oracle reads each decoded prediction, and the table says how
often its shape / colour agree with the image (the denoiser keeps what the noise has not destroyed) and with the
caption (the denoiser follows the words). A model that keeps shapes at low t but follows the shape word at no t
draws blobs when it generates: shape is decided at high noise, from the caption alone.

    python training/probe_denoiser.py --model src/dit4edit/models/shapes --json probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import PixArtAlphaPipeline

from common import alphas_cumprod, setup, to_tensor, to_uint8
from dit4edit_research.synthetic import COLOURS, SHAPES, generate_scene, oracle
from eval_generation import encode_prompts

#: Held-out seeds for the probe's scenes (training uses seeds below 10**6).
PROBE_SEED = 2 * 10**9
CAPTIONS = ("true", "shape swapped", "colour swapped")


@torch.no_grad()
def predict_x0(transformer, x0: torch.Tensor, noise: torch.Tensor, t: int, emb: torch.Tensor, mask: torch.Tensor,
               abar: torch.Tensor) -> torch.Tensor:
    """The transformer's one-step data prediction from x0 noised to timestep t with `noise` (same shape)."""
    a, s = abar[t].sqrt().item(), (1 - abar[t]).sqrt().item()
    xt = a * x0 + s * noise
    out = transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask,
                      timestep=torch.full((len(xt),), t, device=xt.device),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    eps = out[:, : x0.shape[1]]  # PixArt predicts [eps, learned sigma]
    return (xt - s * eps) / a


def swapped(caption: str, word: str, choices, k: int) -> str:
    """`caption` with `word` replaced by another of `choices` (which one depends on k)."""
    others = [c for c in choices if c != word]
    return " ".join(others[k % len(others)] if w == word else w for w in caption.split())


def probe(pipe, n: int = 32, timesteps=(50, 100, 200, 300, 400, 500, 700), seed: int = 0) -> dict:
    """Agreement rates {t: {caption kind: {"shape=image", "shape=caption", "colour=image", "colour=caption",
    "count"}}} over n one-object scenes (the shape / colour ones counted over predictions showing one object)."""
    device = pipe.transformer.device
    scenes = [generate_scene(PROBE_SEED + k, n_objects=1) for k in range(n)]
    images = to_tensor(np.stack([s.image for s in scenes])).to(device)
    x0 = pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor
    captions = {"true": [s.caption for s in scenes],
                "shape swapped": [swapped(s.caption, s.objects[0].shape, SHAPES, k) for k, s in enumerate(scenes)],
                "colour swapped": [swapped(s.caption, s.objects[0].colour, COLOURS, k) for k, s in enumerate(scenes)]}
    embeds = {kind: encode_prompts(pipe.tokenizer, pipe.text_encoder, caps, device) for kind, caps in captions.items()}
    abar = alphas_cumprod().to(device)
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=gen).to(device)  # one draw per t, shared by the three captions
        result[t] = {}
        for kind, (emb, mask) in embeds.items():
            pred = predict_x0(pipe.transformer, x0, noise, t, emb, mask, abar)
            decoded = to_uint8(pipe.vae.decode(pred / pipe.vae.config.scaling_factor).sample)
            counts = dict.fromkeys(("shape=image", "shape=caption", "colour=image", "colour=caption"), 0)
            single = 0
            for image, scene, caption in zip(decoded, scenes, captions[kind]):
                report = oracle(image)
                if len(report.objects) != 1:
                    continue
                single += 1
                seen, truth, words = report.objects[0], scene.objects[0], caption.split()
                counts["shape=image"] += seen.shape == truth.shape
                counts["shape=caption"] += seen.shape in words
                counts["colour=image"] += seen.colour == truth.colour
                counts["colour=caption"] += seen.colour in words
            result[t][kind] = {**{k: v / max(single, 1) for k, v in counts.items()}, "count": single / n}
    return result


def table(result: dict) -> str:
    lines = ["| t | caption | one object | shape = image | shape = caption | colour = image | colour = caption |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for t, kinds in result.items():
        for kind, r in kinds.items():
            lines.append(f"| {t} | {kind} | {100 * r['count']:.0f}% | {100 * r['shape=image']:.0f}% | "
                         f"{100 * r['shape=caption']:.0f}% | {100 * r['colour=image']:.0f}% | "
                         f"{100 * r['colour=caption']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("src/dit4edit/models/shapes"))
    p.add_argument("--n", type=int, default=32, help="held-out one-object scenes")
    p.add_argument("--timesteps", default="50,100,200,300,400,500,700")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    device = setup(args.threads)
    pipe = PixArtAlphaPipeline.from_pretrained(str(args.model), torch_dtype=torch.float32).to(device)
    result = probe(pipe, args.n, [int(t) for t in args.timesteps.split(",")])
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "n": args.n, "probe": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
