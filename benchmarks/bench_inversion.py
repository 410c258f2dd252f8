"""Reconstruction benchmark for the inversion methods, printed as Markdown tables.

1. Round trip `latent_nmse` (||Sample(Invert(x)) - x||^2 / ||x||^2, the sampler matching the method) and NFE for
   ddim / ddim-exact / dpm / dpm-exact at 10 / 20 / 30 steps, on the analytic Gaussian denoiser (exact answer known)
   and on the tiny random-weight PixArt at guidance 4.5.
2. Source branch and identity edit: three ways to make the source branch reproduce the input
   (invert at the edit guidance and let the source run free; the same, pinned to the trajectory; invert at guidance
   1 and pin), measured by the source branch's latent error and by an identity edit (target prompt = source prompt,
   whose ideal output is the input itself).

Run: .venv/bin/python benchmarks/bench_inversion.py [--tol 1e-5] > benchmarks/results/inversion.md
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from dit4edit.solvers import INVERSIONS, Schedule, sampler_for
from dit4edit.tiny import gaussian_denoiser, pixart_scheduler


def nmse(a, b):
    return ((a - b).norm() ** 2 / b.norm() ** 2).item()


def round_trips(make_denoiser, x, steps_list, tol):
    rows = []
    for steps in steps_list:
        schedule = Schedule.from_scheduler(pixart_scheduler(), steps)
        denoise = make_denoiser(schedule)
        for name, invert in INVERSIONS.items():
            start = time.perf_counter()
            result = invert(denoise, x, schedule, tol=tol)
            seconds = time.perf_counter() - start
            back = sampler_for(name)(denoise, result.latent, schedule)[-1]
            rows.append((steps, name, nmse(back, x), result.nfe, seconds))
    return rows


def table(rows):
    lines = ["| steps | method | latent_nmse | NFE | NFE / naive | seconds |", "|---|---|---|---|---|---|"]
    for steps, name, error, nfe, seconds in rows:
        lines.append(f"| {steps} | {name} | {error:.2e} | {nfe} | {nfe / steps:.1f} | {seconds:.2f} |")
    return "\n".join(lines)


def source_branch_study(tol):
    import numpy as np
    from PIL import Image

    from dit4edit.pipeline import DiT4EditPipeline
    from dit4edit.tiny import tiny_components

    pipe = DiT4EditPipeline(**tiny_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((64, 64), Image.BILINEAR)
    prompt, target = "a red circle on a white background", "a blue circle on a white background"
    lines = ["| inversion | source branch | source latent_nmse | identity-edit latent_nmse | NFE |",
             "|---|---|---|---|---|"]
    for method in ("dpm-exact", "ddim-exact", "dpm"):
        for inv_guidance, pin in ((4.5, False), (4.5, True), (1.0, True)):
            inversion = pipe.invert(image, prompt, 30, guidance_scale=inv_guidance, method=method, tol=tol)
            x = inversion.input_latent
            same = pipe.edit(inversion, prompt, guidance_scale=4.5, pin_source=pin)
            other = pipe.edit(inversion, target, guidance_scale=4.5, pin_source=pin)
            src = nmse(other.latents[0].double(), x)
            ident = nmse(same.latents[1].double(), x)
            lines.append(f"| {method} at guidance {inv_guidance} | {'pinned' if pin else 'free'} | {src:.2e} | "
                         f"{ident:.2e} | {inversion.nfe} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; tol {args.tol}\n")
    x = 0.5 * torch.randn(1, 4, 32, 32, dtype=torch.float64)
    print("### Analytic Gaussian denoiser (x0 ~ N(0, 0.25 I), 4x32x32, float64)\n")
    print(table(round_trips(gaussian_denoiser, x, (10, 20, 30), args.tol)) + "\n")

    from dit4edit.pipeline import DiT4EditPipeline
    from dit4edit.tiny import tiny_components

    pipe = DiT4EditPipeline(**tiny_components(seed=0))
    latent = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def tiny(schedule):
        return pipe.make_denoiser(["a red circle on a white background"], 4.5, schedule, (64, 64))

    print("### Tiny random-weight PixArt (2 blocks), guidance 4.5, 4x8x8 latent\n")
    print(table(round_trips(tiny, latent, (10, 20, 30), args.tol)) + "\n")
    print("### Source branch and identity edit (tiny random PixArt, 30 steps, edit guidance 4.5)\n")
    print(source_branch_study(args.tol) + "\n")


if __name__ == "__main__":
    main()
