"""Whole-edit time (inversion + edit, VAE and text encoder included) with and without token merging.

Not a test. Builds a `DiT4EditPipeline` of PixArt-XL-2's architecture with random weights (weights do not change
speed): the transformer (16 heads x 72, `--blocks` of its 28 blocks), the SD VAE architecture PixArt uses, and a T5
encoder as wide as T5-XXL (4096) but with `--t5-layers` of its 24 layers (it runs once per prompt, so its depth
hardly shows in an edit). One image is inverted and edited with every variant in each round, variants alternating,
and the medians are reported with the ratio merged / unmerged for the edit alone and for the whole edit.

    python benchmarks/bench_edit.py                                            # CPU: 2 blocks, 1024², 10 steps
    python benchmarks/bench_edit.py --device cuda --dtype bfloat16 --blocks 28 --steps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from dit4edit.merging import MergeConfig
from dit4edit.pipeline import DiT4EditPipeline
from dit4edit.tiny import pixart_xl_components
from dit4edit_research.devices import describe_device, synchronize
from dit4edit_research.synthetic import generate_scene

SOURCE, TARGET = "a red circle on a white background", "a blue circle on a white background"


def build_pipeline(blocks: int, t5_layers: int, sample_size: int, device, dtype) -> DiT4EditPipeline:
    pipe = DiT4EditPipeline(**pixart_xl_components(blocks, t5_layers, sample_size, device))
    return pipe.to(device=device, dtype=dtype)


def timed(fn, device):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--blocks", type=int, default=2, help="transformer blocks (PixArt-XL-2 has 28)")
    p.add_argument("--t5-layers", type=int, default=1, help="T5 layers (T5-XXL's encoder has 24)")
    p.add_argument("--size", default="1024", help="WIDTH[xHEIGHT] in pixels")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--inversion", default="dpm", help="inversion method (dpm, dpm-exact, ddim, ddim-exact)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.8)
    args = p.parse_args(argv)
    diffusers_logging.set_verbosity_error()
    width, _, height = args.size.partition("x")
    width, height = int(width), int(height or width)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    sample_size = 64 if max(width, height) <= 512 else 128
    pipe = build_pipeline(args.blocks, args.t5_layers, sample_size, args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(generate_scene(0, 128, 128).image).resize((width, height), Image.BICUBIC)
    variants = {
        "no merging": None,
        f"merge {args.ratio}": MergeConfig(ratio=args.ratio, min_tokens=0),
        f"merge {args.ratio} + ff": MergeConfig(ratio=args.ratio, merge_ff=True, min_tokens=0),
    }
    print(f"# whole-edit benchmark\n\ndevice: {describe_device(args.device)}, dtype {args.dtype}")
    print(f"PixArt-XL-2 architecture, random weights, {args.blocks} of 28 transformer blocks, SD VAE, T5 4096 wide "
          f"with {args.t5_layers} of 24 layers; {width}x{height}, {args.steps} steps, inversion {args.inversion}, "
          f"attention control on (defaults), guidance 4.5")
    print(f"command: {' '.join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}\n")

    def invert():
        return pipe.invert(image, SOURCE, num_inference_steps=args.steps, method=args.inversion)

    inversion = invert()  # warm-up: kernels, allocator, autotuning
    for merge in variants.values():
        pipe.edit(inversion, TARGET, merge=merge)
    times = {"inversion": []} | {name: [] for name in variants}
    peaks = {name: 0.0 for name in variants}
    for _ in range(args.rounds):
        inversion, t = timed(invert, args.device)
        times["inversion"].append(t)
        for name, merge in variants.items():
            if torch.device(args.device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _, t = timed(lambda: pipe.edit(inversion, TARGET, merge=merge), args.device)
            times[name].append(t)
            if torch.device(args.device).type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["no merging"]
    print(f"| variant | edit (s) | edit ratio | inversion + edit (s) | whole-edit ratio | peak GPU memory (GiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in variants:
        whole = med["inversion"] + med[name]
        peak = f"{peaks[name]:.1f}" if peaks[name] else "n/a"
        print(f"| {name} | {med[name]:.2f} | {med[name] / base:.2f} | {whole:.2f} | "
              f"{whole / (med['inversion'] + base):.2f} | {peak} |")
    print(f"\ninversion ({args.inversion}, merging never applies to it): {med['inversion']:.2f} s; "
          f"medians of {args.rounds} rounds; all times: "
          + ", ".join(f"{k} {[round(t, 2) for t in v]}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
