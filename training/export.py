"""Assemble the trained parts of a run into a diffusers-layout PixArtAlphaPipeline folder (the shipped model).

Takes the tokenizer (`run/tokenizer`), T5 encoder and transformer from `run/dit.ckpt` (EMA weights by default) and the
VAE from `run/vae_decoder` (phase-2 decoder), else `run/vae`, else the VAE of the pipeline the run started from
(`--init-from`); stores float16 weights by default to stay small. A README.md and the model's editing settings
(`dit4edit.json`) already in the destination are kept.

    python training/export.py --run training/runs/shapes --dest src/dit4edit/models/shapes
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline
from transformers import T5Tokenizer

from common import log, setup
from train_dit import build_text_encoder, build_transformer, save_pipeline


#: Files of a model folder that an export keeps: its README and its editing settings.
KEPT_FILES = ("README.md", "dit4edit.json")


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("training/runs/shapes"))
    p.add_argument("--dest", type=Path, default=Path("src/dit4edit/models/shapes"))
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--vae", type=Path, default=None, help="VAE folder (default: run/vae_decoder, else run/vae)")
    p.add_argument("--fp32", action="store_true", help="keep float32 weights (default: float16)")
    args = p.parse_args(argv)
    setup(None)
    tokenizer = T5Tokenizer.from_pretrained(args.run / "tokenizer")
    state = torch.load(args.run / "dit.ckpt", map_location="cpu", weights_only=False)
    a = state["args"]
    text_encoder = build_text_encoder(len(tokenizer), a["t5_width"], a["t5_layers"])
    transformer = build_transformer(a["width"], a["layers"], a["t5_width"], patch_size=a.get("patch_size", 2),
                                    interpolation_scale=a.get("interpolation_scale"))
    weights = state if args.raw else state["ema"]
    text_encoder.load_state_dict(weights["text_encoder"])
    transformer.load_state_dict(weights["transformer"])
    candidates = [args.vae, args.run / "vae_decoder", args.run / "vae"]
    if a.get("init_from"):
        candidates.append(Path(a["init_from"]) / "vae")
    vae_dir = next(c for c in candidates if c is not None and c.exists())
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    kept = {}
    if args.dest.exists():
        kept = {name: (args.dest / name).read_bytes() for name in KEPT_FILES if (args.dest / name).exists()}
        shutil.rmtree(args.dest)
    save_pipeline(args.dest, tokenizer, text_encoder, vae, transformer, fp16=not args.fp32)
    for name, data in kept.items():
        (args.dest / name).write_bytes(data)
    # It must load and generate like a real checkpoint, through diffusers' own pipeline.
    pipe = PixArtAlphaPipeline.from_pretrained(args.dest, torch_dtype=torch.float32)
    image = pipe("a red circle on a white background", height=128, width=128, num_inference_steps=5,
                 use_resolution_binning=False, clean_caption=False, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (128, 128, 3), image.shape
    log.info("exported step %d (%s weights, VAE from %s) to %s: %.1f MB", state["step"], "raw" if args.raw else "EMA",
             vae_dir, args.dest, folder_size(args.dest) / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
