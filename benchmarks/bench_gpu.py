"""Whole edits on a GPU next to diffusers' own PixArt-alpha generation: time, peak memory, ratio to the FLOP floor.

Not a test. Random-weight models of the real architectures (weights change neither speed nor memory): the
PixArt-XL-2 512 transformer for 512² and the 1024-MS transformer (micro-conditions) for 1024² and 1024x2048, the SD
VAE, and a T5-XXL-shaped text encoder (24 layers, 4096 wide). For each size it times, with the models loaded:

- `generation`: diffusers' `PixArtAlphaPipeline` from the same components, same steps, guidance and size (no
  resolution binning), image out;
- each edit variant: a whole edit, image in to image out (inversion, edit with attention control, VAE decode).
  Variants switch on one thing each: `merge` (patch merging, MergeConfig defaults), `plan<K>` (with `merge`: one
  merging plan per K blocks and step, `MergeConfig.plan_every=K`; `plan28` = one plan per step), `rows3` (the 3-row
  batch without the source's unconditional row), `compile` (regional torch.compile of the transformer blocks; the
  compile time is the first edit's extra time, reported apart), `offload` (model CPU offload), `definv` (the
  inversion method and tolerance a user gets by default, `dit4edit.defaults.RunSettings`, in place of `--inversion`:
  what users run), and `+` combines them. Every row reports the inversion's NFE.

Each variant is measured `--rounds` times after one warm-up run (eager variants alternate within a round; compiled
ones run after compiling once); medians are reported with the peak GPU memory (`torch.cuda.max_memory_allocated`).

FLOP floor. One transformer forward of one batch row (a "sample-forward") over N = (H/16)(W/16) image tokens and
T = 120 text tokens, width D, L blocks, feed-forward width F = 4D, patch p, costs (multiply-add = 2 FLOPs)
    L * (8ND² + 4N²D  +  4ND² + 4TD² + 4NTD  +  4NDF)       self-attention, cross-attention, feed-forward
    + 2N(4p²)D + 2T(4096D + D²) + 2N D(8p²) + small          patch embedding, caption projection, final layer
(`forward_flops`; 1.24 TFLOP at 512², 6.51 at 1024², 17.3 at 1024x2048 for PixArt-XL-2). The floor of a size is the
base edit's counted sample-forwards (inversion and edit, unmerged, 4 rows) times that, at `--peak-tflops` or, if not
given, the measured rate of a large dense matmul in the benchmark's dtype; VAE and T5 are left out of the floor.
`floor_ratio` = whole-edit time / floor time, the same floor for every variant of a size.

    python benchmarks/bench_gpu.py --json gpu.json                    # lent GPU: bf16, 30 steps, all sizes
    python benchmarks/bench_gpu.py --tiny --json tiny.json            # CPU smoke test: tiny models and sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch
from diffusers import PixArtAlphaPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from bench_edit import SOURCE, TARGET, timed
from dit4edit.compiling import compiled_blocks
from dit4edit.defaults import DEFAULTS
from dit4edit.merging import MergeConfig
from dit4edit.pipeline import DiT4EditPipeline
from dit4edit.tiny import pixart_scheduler, pixart_xl_components, pixart_xl_transformer, tiny_components
from dit4edit_research.devices import cpu_name, synchronize
from dit4edit_research.synthetic import generate_scene

SWITCHES = ("merge", "rows3", "compile", "offload", "definv")
DEFAULT_VARIANTS = "base,definv,merge,merge+plan28,rows3,offload,compile,compile+merge+rows3"
TEXT_TOKENS = 120  # PixArt reads 120 T5 tokens
GUIDANCE = 4.5


@dataclass(frozen=True)
class Variant:
    name: str
    merge: bool = False
    rows3: bool = False
    compile: bool = False
    offload: bool = False
    definv: bool = False  # the default inversion (method and tol) instead of --inversion
    plan_every: int = 1  # merging blocks per plan (MergeConfig.plan_every)

    @classmethod
    def parse(cls, name: str) -> Variant:
        parts = [] if name == "base" else name.split("+")
        plans = [part for part in parts if part.startswith("plan") and part[4:].isdigit() and int(part[4:]) >= 1]
        unknown = [part for part in parts if part not in SWITCHES and part not in plans]
        if (unknown or (("compile" in parts) and ("offload" in parts)) or len(plans) > 1
                or (plans and "merge" not in parts)):
            raise SystemExit(f"bench_gpu: unknown or unsupported variant {name!r} (base, or + of {SWITCHES} and "
                             "plan<K>; compile and offload do not combine here; plan<K> once, with merge)")
        flags = {part: True for part in parts if part not in plans}
        return cls(name, **flags, **({"plan_every": int(plans[0][4:])} if plans else {}))


def forward_flops(config, height: int, width: int, text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one transformer forward of one batch row at `height` x `width` latents (see the module docstring)."""
    p, layers = config.patch_size, config.num_layers
    d = config.num_attention_heads * config.attention_head_dim
    n, t = (height // p) * (width // p), text_tokens
    ff = 4 * d  # BasicTransformerBlock's feed-forward (mult 4)
    block = (8 * n * d * d + 4 * n * n * d  # self-attention: q, k, v, out projections; scores and values
             + 4 * n * d * d + 4 * config.cross_attention_dim * t * d + 4 * n * t * d  # cross-attention
             + 4 * n * d * ff)  # feed-forward
    embed = 2 * n * config.in_channels * p * p * d + 2 * t * (config.caption_channels * d + d * d)
    final = 2 * n * d * p * p * config.out_channels
    timestep = 2 * (256 * d + d * d + 6 * d * d)  # sinusoid -> MLP -> adaLN-single
    if config.use_additional_conditions:
        third = d // 3
        timestep += 2 * 2 * (256 * third + third * third)  # resolution and aspect-ratio embedders
    return float(layers * block + embed + final + timestep)


def matmul_tflops(device, dtype, side: int) -> float:
    """The best rate of a `side`³ matmul, in TFLOP/s."""
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device)[1] for _ in range(5))
    return 2 * side**3 / best / 1e12


class RowCounter:
    """Counts transformer sample-forwards (batch rows) while installed."""

    def __init__(self, transformer):
        self.rows = 0
        self.handle = transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self.rows += hidden_states.shape[0]

    def remove(self) -> int:
        self.handle.remove()
        return self.rows


def build(tiny: bool, model: str, device, dtype, t5_layers: int, shared: dict | None = None) -> DiT4EditPipeline:
    """The 512 model (`model="512"`) or the 1024-MS model ("1024"); `shared` gives the tokenizer, text encoder and
    VAE of a pipeline built before (one T5-XXL on the card, not two)."""
    if tiny:
        # diffusers' PixArtAlphaPipeline passes micro-conditions when sample_size is 128, as the 1024-MS model's
        components = tiny_components(seed=0, sample_size=128 if model == "1024" else 8,
                                     micro_conditions=model == "1024")
    elif shared is None:
        components = pixart_xl_components(28, t5_layers, 64 if model == "512" else 128, device)
    else:
        with torch.device(device):
            components = dict(transformer=pixart_xl_transformer(28, 64 if model == "512" else 128).eval(),
                              scheduler=pixart_scheduler())
    pipe = DiT4EditPipeline(**{**components, **(shared or {})}).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Runner:
    def __init__(self, pipe: DiT4EditPipeline, device, steps: int, inversion: str, merge: MergeConfig):
        self.pipe, self.device, self.steps, self.inversion, self.merge = pipe, torch.device(device), steps, inversion, merge
        self.cuda = self.device.type == "cuda"

    def measure(self, fn) -> tuple[dict, object]:
        """Time `fn` (returns its stage times), with peak GPU memory and the sample-forwards it ran."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        counter = RowCounter(self.pipe.transformer)
        try:
            stages, total = timed(fn, self.device)
        finally:
            rows = counter.remove()
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        return dict(total=total, rows=rows, peak=peak, **stages)

    def whole_edit(self, image: Image.Image, variant: Variant) -> dict:
        pipe = self.pipe
        method, tol = (DEFAULTS.inversion, DEFAULTS.tol) if variant.definv else (self.inversion, DEFAULTS.tol)
        inversion, t_inv = timed(lambda: pipe.invert(image, SOURCE, self.steps, GUIDANCE, method=method, tol=tol),
                                 self.device)
        merge = replace(self.merge, plan_every=variant.plan_every) if variant.merge else None
        result, t_edit = timed(lambda: pipe.edit(inversion, TARGET, merge=merge, rows=3 if variant.rows3 else 4),
                               self.device)
        assert result.images[0].size == image.size
        return dict(inversion=t_inv, edit=t_edit, inversion_nfe=inversion.nfe, inversion_method=method)

    def edit_run(self, image, variant: Variant) -> dict:
        if not variant.offload:
            return self.measure(lambda: self.whole_edit(image, variant))
        self.pipe.enable_model_cpu_offload(device=self.device)  # all models to the CPU, hooks bring them back
        try:
            return self.measure(lambda: self.whole_edit(image, variant))
        finally:
            self.pipe.remove_all_hooks()
            self.pipe.to(self.device)

    def generation_run(self, generator_pipe, width: int, height: int) -> dict:
        def generate():
            image = generator_pipe(SOURCE, num_inference_steps=self.steps, guidance_scale=GUIDANCE, height=height,
                                   width=width, use_resolution_binning=False, clean_caption=False,
                                   max_sequence_length=TEXT_TOKENS, output_type="pil").images[0]
            assert image.size == (width, height)
            return {}

        return self.measure(generate)


def recompiles() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def bench_size(runner: Runner, width: int, height: int, variants: list[Variant], rounds: int, compile_options: dict):
    pipe = runner.pipe
    image = Image.fromarray(generate_scene(0, 128, 128).image).resize((width, height), Image.BICUBIC)
    generator_pipe = PixArtAlphaPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                         transformer=pipe.transformer, scheduler=pipe.scheduler)
    generator_pipe.set_progress_bar_config(disable=True)
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    warm: dict[str, dict] = {}
    generation: list[dict] = []
    eager = [v for v in variants if not v.compile]
    runner.generation_run(generator_pipe, width, height)  # warm-up: kernels, allocator, autotuning
    for v in eager:
        warm[v.name] = runner.edit_run(image, v)
    for _ in range(rounds):
        generation.append(runner.generation_run(generator_pipe, width, height))
        for v in eager:
            runs[v.name].append(runner.edit_run(image, v))
    compiled = [v for v in variants if v.compile]
    graphs = {}
    if compiled:
        torch._dynamo.reset()
        with compiled_blocks(pipe.transformer, **compile_options):
            for v in compiled:  # the first edit of each compiles what it needs (shapes, batch rows)
                warm[v.name] = runner.edit_run(image, v)
            before = recompiles()
            for _ in range(rounds):
                for v in compiled:
                    runs[v.name].append(runner.edit_run(image, v))
            graphs = {"graphs_compiled": before, "graphs_compiled_in_timed_rounds": recompiles() - before}
    return summarize(pipe, width, height, variants, runs, warm, generation, graphs)


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def peak(runs: list[dict]):
    peaks = [run["peak"] for run in runs if run["peak"] is not None]
    return max(peaks) if peaks else None


def summarize(pipe, width, height, variants, runs, warm, generation, graphs) -> dict:
    factor = pipe.vae_scale_factor
    per_forward = forward_flops(pipe.transformer.config, height // factor, width // factor)
    generation_s = median(generation, "total")
    base_rows = runs["base"][0]["rows"] if "base" in runs else None
    rows = []
    for v in variants:
        whole = median(runs[v.name], "total")
        row = dict(name=v.name, whole_edit_s=whole, inversion_s=median(runs[v.name], "inversion"),
                   edit_s=median(runs[v.name], "edit"), times=[run["total"] for run in runs[v.name]],
                   inversion_method=runs[v.name][0]["inversion_method"],
                   inversion_nfe=median(runs[v.name], "inversion_nfe"),
                   sample_forwards=runs[v.name][0]["rows"], peak_gib=peak(runs[v.name]),
                   edit_over_generation=whole / generation_s,
                   first_edit_s=warm[v.name]["total"], compile_s=warm[v.name]["total"] - whole if v.compile else None)
        row["flops"] = row["sample_forwards"] * per_forward
        rows.append(row)
    config = pipe.transformer.config
    model = "PixArt-XL-2-1024-MS" if config.use_additional_conditions else "PixArt-XL-2-512x512"
    width_d = config.num_attention_heads * config.attention_head_dim
    if (config.num_layers, width_d) != (28, 1152):
        model = f"{config.num_layers} blocks x {width_d}, {model} layout"
    return dict(size=f"{width}x{height}", model=model, tokens=(height // factor // 2) * (width // factor // 2),
                flops_per_forward=per_forward, generation_s=generation_s, generation_peak_gib=peak(generation),
                generation_sample_forwards=generation[0]["rows"], base_sample_forwards=base_rows,
                variants=rows, **graphs)


def add_floor(size: dict, rate_tflops: float) -> None:
    """The floor of a size: the base edit's sample-forwards at the peak rate; every variant's ratio to it."""
    forwards = size["base_sample_forwards"] or min(v["sample_forwards"] for v in size["variants"])
    size["floor_flops"] = forwards * size["flops_per_forward"]
    size["floor_s"] = size["floor_flops"] / (rate_tflops * 1e12)
    for v in size["variants"]:
        v["floor_ratio"] = v["whole_edit_s"] / size["floor_s"]


def card_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return cpu_name()


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, 32/64/64x128 px, 2 steps")
    p.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 (float32 with --tiny)")
    p.add_argument("--sizes", default=None, help="comma-separated WIDTHxHEIGHT (default 512,1024,1024x2048)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    p.add_argument("--steps", type=int, default=None, help="default 30 (2 with --tiny)")
    p.add_argument("--inversion", default="dpm", help="inversion method (default dpm: naive 2M inversion)")
    p.add_argument("--rounds", type=int, default=None, help="timed runs per variant (default 2; 1 with --tiny)")
    p.add_argument("--t5-layers", type=int, default=24, help="T5 encoder layers (T5-XXL: 24)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager "
                   "with --tiny)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's peak rate for the floor (default: measured on a large matmul)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    diffusers_logging.set_verbosity_error()
    tiny = args.tiny
    device = args.device or ("cpu" if tiny else "cuda")
    dtype = getattr(torch, args.dtype or ("float32" if tiny else "bfloat16"))
    steps = args.steps or (2 if tiny else 30)
    rounds = args.rounds or (1 if tiny else 2)
    sizes = [parse_size(s) for s in (args.sizes or ("32,64,64x128" if tiny else "512,1024,1024x2048")).split(",")]
    variants = [Variant.parse(name.strip()) for name in args.variants.split(",")]
    merge = MergeConfig(min_tokens=0) if tiny else MergeConfig()
    compile_options = {k: v for k, v in (("mode", args.compile_mode),
                                         ("backend", args.compile_backend or ("aot_eager" if tiny else None)))
                       if v is not None}
    torch._dynamo.config.recompile_limit = 64  # sizes, batch rows and variants: more graphs than the default 8
    torch.manual_seed(0)

    if args.peak_tflops:
        rate, rate_source = args.peak_tflops, "--peak-tflops"
    else:
        side = 256 if tiny else 8192
        rate = matmul_tflops(device, dtype, side)
        rate_source = f"measured: best of 5 {side}x{side} matmuls in {str(dtype).removeprefix('torch.')}"
    results = dict(card=card_name(device), device=str(device), dtype=str(dtype).removeprefix("torch."),
                   torch=torch.__version__, diffusers=__import__("diffusers").__version__, tiny=tiny,
                   steps=steps, guidance=GUIDANCE, inversion=args.inversion, rounds=rounds,
                   t5_layers=None if tiny else args.t5_layers, compile_options=compile_options,
                   peak_tflops=rate, peak_source=rate_source,
                   flops_formula="L*(8ND^2 + 4N^2D + 4ND^2 + 4TD^2 + 4NTD + 4NDF) + 2N(4p^2)D + 2T(4096D + D^2) "
                                 "+ 2ND(8p^2) + timestep MLPs; N image tokens, T = 120 text tokens, F = 4D",
                   sizes=[])
    pipe, model = None, None
    for width, height in sizes:
        wanted = "512" if max(width, height) <= (32 if tiny else 512) else "1024"
        if wanted != model:
            shared = None
            if pipe is not None:  # the other transformer leaves the card; T5 and VAE are shared
                pipe.transformer.to("cpu")
                shared = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae)
                del pipe
            pipe, model = build(tiny, wanted, device, dtype, args.t5_layers, shared), wanted
        runner = Runner(pipe, device, steps, args.inversion, merge)
        size = bench_size(runner, width, height, variants, rounds, compile_options)
        add_floor(size, rate)
        results["sizes"].append(size)
        print(markdown_size(size), flush=True)
    text = json.dumps(results, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(f"\ncard: {results['card']}, {results['dtype']}, {steps} steps, inversion {args.inversion}; peak rate "
          f"{rate:.1f} TFLOP/s ({rate_source})")
    return 0


def markdown_size(size: dict) -> str:
    gib = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [f"\n{size['size']} ({size['model']}, {size['tokens']} tokens, "
             f"{size['flops_per_forward'] / 1e12:.3f} TFLOP per sample-forward): diffusers generation "
             f"{size['generation_s']:.2f} s, peak {gib(size['generation_peak_gib'])} GiB; floor "
             f"{size['floor_s']:.3f} s",
             "| variant | whole edit (s) | inversion (s) | inversion, NFE | edit (s) | / generation | / floor "
             "| sample-forwards | peak GiB | compile (s) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for v in size["variants"]:
        compile_s = "" if v["compile_s"] is None else f"{v['compile_s']:.1f}"
        lines.append(f"| {v['name']} | {v['whole_edit_s']:.2f} | {v['inversion_s']:.2f} | "
                     f"{v['inversion_method']}, {v['inversion_nfe']:g} | {v['edit_s']:.2f} | "
                     f"{v['edit_over_generation']:.2f} | {v['floor_ratio']:.1f} | {v['sample_forwards']} | "
                     f"{gib(v['peak_gib'])} | {compile_s} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
