"""Reconstruction benchmark for the inversion methods, printed as Markdown tables.

1. Round trip `latent_nmse` (||Sample(Invert(x)) - x||^2 / ||x||^2, the sampler matching the method) and NFE for
   ddim / ddim-exact / dpm / dpm-exact at 10 / 20 / 30 steps, on the analytic Gaussian denoiser (exact answer known)
   and on the tiny random-weight PixArt at guidance 4.5.
2. Source branch and identity edit: three ways to make the source branch reproduce the input
   (invert at the edit guidance and let the source run free; the same, pinned to the trajectory; invert at guidance
   1 and pin), measured by the source branch's latent error and by an identity edit (target prompt = source prompt,
   whose ideal output is the input itself).

3. `--curve DIR`: the tolerance / NFE / quality curve on the embedded model (its weights, not its dit4edit.json
   settings, so what a real checkpoint's defaults get): for held-out scenes of the synthetic world and flat-shape
   scenes drawn here with PIL (other positions, sizes, colours, with and without anti-aliasing), each inversion
   method at each tolerance and guidance: NFE, latent NMSE of the round trip, and reconstruction PSNR minus the VAE
   round trip's. Rows go to DIR/curve.jsonl as they are made (a rerun resumes); the table to stdout.

4. `--bdia`: BDIA-DDIM (an exactly invertible sampler, tried and kept out of the package) on the embedded model:
   round trips from the stored pair (x_0, x_1) and from x_0 alone, and the size of the inverted x_0;
   `--bdia-edits DIR`: the editing benchmark's 48 pairs with BDIA as inversion and edit sampler.

Run: .venv/bin/python benchmarks/bench_inversion.py [--tol 1e-5] > benchmarks/results/inversion.md
     .venv/bin/python benchmarks/bench_inversion.py --curve benchmarks/results/inversion-curve [--points ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dit4edit.solvers import INVERSIONS, Schedule, invert_ddim, sampler_for
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


def drawn_scenes():
    """Flat shapes drawn with PIL, not the synthetic world's renderer: (name, image, caption). Pure PIL colours,
    positions and sizes the world does not use, half of them anti-aliased (drawn 4x larger, downsampled)."""
    from PIL import Image, ImageDraw

    specs = [  # name, background, fill, shape, box (x0, y0, x1, y1) on 128x128, anti-aliased, caption
        ("circle-left", "white", "red", "circle", (14, 52, 58, 96), False, "a red circle on a white background"),
        ("square-corner-aa", (128, 128, 128), "blue", "square", (66, 8, 122, 64), True,
         "a blue square on a gray background"),
        ("triangle-big-aa", (225, 210, 180), "green", "triangle", (8, 10, 120, 118), True,
         "a large green triangle on a beige background"),
        ("circle-small", "black", "yellow", "circle", (92, 90, 116, 114), False,
         "a small yellow circle on a black background"),
    ]
    out = []
    for name, background, fill, shape, box, smooth, caption in specs:
        k = 4 if smooth else 1
        image = Image.new("RGB", (128 * k, 128 * k), background)
        draw = ImageDraw.Draw(image)
        x0, y0, x1, y1 = (v * k for v in box)
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        if smooth:
            image = image.resize((128, 128), Image.LANCZOS)
        out.append((name, image, caption))
    return out


def curve_scenes(count: int):
    """`count` held-out scenes of the synthetic world, then the drawn ones: (name, image, caption)."""
    from dit4edit_research.bench_synthetic import held_out_scenes

    world = [(f"world-{k}", scene.pil(), scene.caption) for k, scene in enumerate(held_out_scenes(count))]
    return world + drawn_scenes()


def run_curve(out_dir: str, points: list[tuple[str, float]], guidances: list[float], count: int, steps: int = 30):
    """The curve rows (see the module docstring), resuming from DIR/curve.jsonl."""
    from dit4edit import images as imgs
    from dit4edit.model_folder import default_model
    from dit4edit.pipeline import DiT4EditPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curve.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(r["scene"], r["guidance"], r["method"], r["tol"]) for r in rows}
    pipe = DiT4EditPipeline.from_pretrained(default_model())
    pipe.set_progress_bar_config(disable=True)
    schedule = Schedule.from_scheduler(pipe.scheduler, steps)
    with path.open("a") as log:
        for name, image, caption in curve_scenes(count):
            latent = pipe.encode_image(image).double()
            vae_psnr = imgs.psnr(pipe.decode_latents(latent)[0], image)
            for guidance in guidances:
                denoise = pipe.make_denoiser([caption], guidance, schedule, image.size)
                for method, tol in points:
                    if (name, guidance, method, tol) in done:
                        continue
                    start = time.perf_counter()
                    result = INVERSIONS[method](denoise, latent, schedule, tol=tol)
                    seconds = time.perf_counter() - start
                    back = sampler_for(method)(denoise, result.latent, schedule)[-1]
                    row = dict(scene=name, guidance=guidance, method=method, tol=tol, nfe=result.nfe,
                               latent_nmse=nmse(back, latent), seconds=seconds,
                               dpsnr=imgs.psnr(pipe.decode_latents(back)[0], image) - vae_psnr,
                               residual=max(result.residuals) if result.residuals else None)
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
    return rows


def curve_table(rows, steps: int = 30) -> str:
    """Per (guidance, method, tol): mean and worst PSNR minus the VAE's, scenes within 0.1 dB, NFE."""
    import statistics

    groups = {}
    for r in rows:
        groups.setdefault((r["guidance"], r["method"], r["tol"]), []).append(r)
    lines = ["| guidance | method | tol | scenes | PSNR - VAE mean / worst (dB) | within 0.1 dB | median latent NMSE "
             "| NFE mean (max) | NFE / naive |", "|---|---|---|---|---|---|---|---|---|"]
    for (guidance, method, tol), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        d = [r["dpsnr"] for r in group]
        nfe = [r["nfe"] for r in group]
        ok = sum(x >= -0.1 for x in d)
        lines.append(f"| {guidance} | {method} | {tol:g} | {len(group)} | {statistics.mean(d):+.2f} / {min(d):+.2f} | "
                     f"{ok}/{len(group)} | {statistics.median(r['latent_nmse'] for r in group):.1e} | "
                     f"{statistics.mean(nfe):.0f} ({max(nfe)}) | {statistics.mean(nfe) / steps:.1f} |")
    return "\n".join(lines)


def sample_bdia(denoise, x, schedule, gamma=1.0, x_next=None, callback=None):
    """BDIA-DDIM (Zhang, Lewis and Kleijn, ECCV 2024, eq. 16): x_{i+1} = ddim(x_i, i -> i+1) + gamma (x_{i-1} -
    ddim(x_i, i -> i-1)), ddim(x_i, i -> j) = a_j D(x_i) + s_j eps(x_i); first step DDIM unless `x_next` gives x_1.
    Tried as the exactly invertible sampler; kept here, not in the package (see `bdia_rows`)."""
    a, s = schedule.alphas, schedule.sigmas
    trajectory = [x]
    for i in range(schedule.num_steps):
        if i == 0 and x_next is not None:
            step = x_next
        else:
            x = trajectory[-1]
            d = denoise(x, i)
            eps = (x - a[i] * d) / s[i]
            step = a[i + 1] * d + s[i + 1] * eps
            if i > 0:
                step = step + gamma * (trajectory[i - 1] - (a[i - 1] * d + s[i - 1] * eps))
        if callback is not None:
            replaced = callback(i, step)
            step = step if replaced is None else replaced
        trajectory.append(step)
    return trajectory


def invert_bdia(denoise, x, schedule, gamma=1.0):
    """BDIA inversion: x_{N-1} by naive DDIM inversion, then x_{i-1} = ddim(x_i, i -> i-1) + (x_{i+1} -
    ddim(x_i, i -> i+1)) / gamma, explicitly (N NFE); `sample_bdia` from (x_0, x_1) retraces it exactly."""
    a, s = schedule.alphas, schedule.sigmas
    n = schedule.num_steps
    xs = [None] * n + [x]
    xs[n - 1] = invert_ddim(lambda y, j: denoise(y, j + n - 1), x, schedule.tail(n - 1)).latent
    for i in range(n - 1, 0, -1):
        d = denoise(xs[i], i)
        eps = (xs[i] - a[i] * d) / s[i]
        xs[i - 1] = a[i - 1] * d + s[i - 1] * eps + (xs[i + 1] - (a[i + 1] * d + s[i + 1] * eps)) / gamma
    return xs


def bdia_rows(count: int, steps: int = 30):
    """BDIA on the embedded model: round trip from the stored pair (x_0, x_1) and from x_0 alone, and the size of
    the inverted x_0 (a Gaussian start has std ~1)."""
    from dit4edit import images as imgs
    from dit4edit.model_folder import default_model
    from dit4edit.pipeline import DiT4EditPipeline

    pipe = DiT4EditPipeline.from_pretrained(default_model())
    pipe.set_progress_bar_config(disable=True)
    schedule = Schedule.from_scheduler(pipe.scheduler, steps)
    lines = ["| scene | guidance | gamma | NFE | PSNR - VAE from (x_0, x_1) | latent NMSE | from x_0 alone | std of x_0 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, image, caption in curve_scenes(count)[:count]:
        latent = pipe.encode_image(image).double()
        vae_psnr = imgs.psnr(pipe.decode_latents(latent)[0], image)
        for guidance in (1.5, 4.5):
            denoise = pipe.make_denoiser([caption], guidance, schedule, image.size)
            for gamma in (1.0, 0.5):
                xs = invert_bdia(denoise, latent, schedule, gamma)
                back = sample_bdia(denoise, xs[0], schedule, gamma, x_next=xs[1])[-1]
                alone = sample_bdia(denoise, xs[0], schedule, gamma)[-1]
                dpsnr = imgs.psnr(pipe.decode_latents(back)[0], image) - vae_psnr
                lines.append(f"| {name} | {guidance} | {gamma} | {steps} | {dpsnr:+.3f} | {nmse(back, latent):.1e} | "
                             f"{nmse(alone, latent):.1e} | {xs[0].std().item():.3g} |")
    return "\n".join(lines)


def bdia_edits(out_dir: str, count: int, guidance: float = 4.5, steps: int = 30) -> dict:
    """The editing benchmark's `dit4edit` method on the embedded model (its own control settings) with BDIA as the
    inversion and the edit's sampler: every branch starts from the stored pair (x_0, x_1). The package's pipeline
    samples from x_0 alone, so this swaps its "ddim" inverter and sampler for the run (restored after)."""
    from dit4edit.solvers import SAMPLERS, InversionResult
    from dit4edit_research.bench_synthetic import build_parser, run_editing

    from dit4edit.cli import load_pipeline

    pipe = load_pipeline(build_parser().parse_args(["--quiet"]))
    stored = {}

    def invert(denoise, x, schedule, **_):
        xs = invert_bdia(denoise, x, schedule)
        stored["x1"] = xs[1]
        return InversionResult(trajectory=xs, residuals=None, nfe=schedule.num_steps)

    def sample(denoise, x, schedule, callback=None, disable=True):
        return sample_bdia(denoise, x, schedule, x_next=stored["x1"].to(x).expand_as(x), callback=callback)

    saved = INVERSIONS["ddim"], SAMPLERS["ddim"]
    INVERSIONS["ddim"], SAMPLERS["ddim"] = invert, sample
    try:
        return run_editing(pipe, out_dir, count, ["dit4edit"], steps, guidance, disable_progress=True,
                           inversion="ddim")
    finally:
        INVERSIONS["ddim"], SAMPLERS["ddim"] = saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--curve", default=None, help="run the embedded model's curve into this folder instead")
    parser.add_argument("--points", default="dpm:1,ddim:1,ddim-exact:1e-3,ddim-exact:1e-4,ddim-exact:1e-5,"
                        "dpm-exact:1e-3,dpm-exact:1e-5", help="method:tol, comma-separated")
    parser.add_argument("--guidances", default="1.5,4.5")
    parser.add_argument("--scenes", type=int, default=8, help="held-out scenes of the synthetic world")
    parser.add_argument("--bdia", action="store_true", help="run the BDIA round trips on the embedded model instead")
    parser.add_argument("--bdia-edits", default=None, help="run the 48-pair editing benchmark with BDIA into this "
                        "folder instead")
    args = parser.parse_args()
    if args.bdia_edits:
        print(json.dumps(bdia_edits(args.bdia_edits, 48), indent=1))
        return
    if args.bdia:
        print(bdia_rows(min(args.scenes, 4)))
        return
    if args.curve:
        points = [(p.split(":")[0], float(p.split(":")[1])) for p in args.points.split(",")]
        rows = run_curve(args.curve, points, [float(g) for g in args.guidances.split(",")], args.scenes)
        print(curve_table(rows))
        return
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
