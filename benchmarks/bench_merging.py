"""Token merging speed and error on the PixArt-XL-2 architecture (random weights): one transformer forward per size.

Not a test. Times one forward of an edit batch as `DiT4EditPipeline.edit` runs it: the 4 rows of one target under
classifier-free guidance (`BatchLayout(1)`), DiT4Edit's attention control installed at a mid-schedule step (mutual
self-attention in the deeper half, Prompt-to-Prompt on cross-attention; `--no-control` leaves diffusers' processors),
and merging by `token_merging` with one plan from the source's conditional row shared by every row. Sizes 512^2,
1024^2 and 1024x2048, each merge ratio, variants alternating inside every repeat so machine load hits them alike;
reports medians, the ratio merged/unmerged, peak memory, the relative error of the output against the unmerged
forward, and where the time goes (attn1 / attn2 / feed-forward / outside the blocks). `--plan-every K ...` adds,
for each ratio, merging with one plan per K blocks and step (`MergeConfig.plan_every`; K >= the blocks run: one plan
per step) next to the default plan per block.

    python benchmarks/bench_merging.py                                    # CPU, 2 of the 28 blocks
    python benchmarks/bench_merging.py --device cuda --dtype bfloat16 --blocks 28 --plan-every 2 4 7 28

Merging follows Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion" (see dit4edit.merging).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from diffusers.utils import logging as diffusers_logging

from dit4edit.control import AttentionControl, AttentionController, TokenEdit, install, steps_before
from dit4edit.layout import SOURCE, BatchLayout
from dit4edit.merging import MergeConfig, token_grid, token_merging
from dit4edit.tiny import pixart_xl_transformer
from dit4edit_research.devices import describe_device, synchronize

#: latent (h, w) per image size; PixArt's VAE downsamples 8x.
SIZES = {"512": (64, 64), "1024": (128, 128), "1024x2048": (128, 256)}
#: The edit batch: one target, with classifier-free guidance.
LAYOUT = BatchLayout(1)
NUM_STEPS = 30
L = 120  # T5 tokens


@dataclass(frozen=True)
class Variant:
    label: str
    config: MergeConfig | None  # None: the model's own processors


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--blocks", type=int, default=2, help="transformer blocks (PixArt-XL-2 has 28)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.8], help="merge ratios besides 0")
    p.add_argument("--ff-ratios", nargs="*", type=float, default=[0.8], help="ratios also run with merge_ff=True")
    p.add_argument("--stride", nargs=2, type=int, default=[3, 3])
    p.add_argument("--plan-every", nargs="*", type=int, default=[2, 28], metavar="K",
                   help="also merge with one plan per K blocks, for every ratio (and FF ratio); K is capped at "
                        "--blocks and repeats dropped (default 2 28)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats at 1024^2")
    p.add_argument("--repeats-small", type=int, default=5, help="repeats at 512^2")
    p.add_argument("--repeats-large", type=int, default=2, help="repeats at 1024x2048")
    p.add_argument("--step", type=int, default=15, help=f"the edit step the forward runs at (of {NUM_STEPS})")
    p.add_argument("--no-control", action="store_true", help="diffusers' processors instead of attention control")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_transformer(sample_size: int, blocks: int, device, dtype) -> PixArtTransformer2DModel:
    """PixArt-XL-2 (16 heads x 72 = 1152 wide, T5-XXL captions) with `blocks` blocks and random weights."""
    with torch.device(device):  # initialise on the device: random init of 0.6B parameters is slow on a CPU
        model = pixart_xl_transformer(blocks, sample_size)
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(latent_hw, batch: int, device, dtype, seed: int) -> dict:
    """Image-like latents (smooth field + noise, unit variance), 120 T5 tokens, t = 500."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    coarse = torch.randn(batch, 4, h // 8, w // 8, generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)  # (B, 4, h, w)
    latents = smooth + 0.3 * torch.randn(batch, 4, h, w, generator=g)
    latents = latents / latents.std()
    size = torch.tensor([[h * 8.0, w * 8.0]] * batch)
    return dict(
        hidden_states=latents.to(device, dtype),
        encoder_hidden_states=torch.randn(batch, 120, 4096, generator=g).to(device, dtype),
        encoder_attention_mask=torch.ones(batch, 120, device=device),
        timestep=torch.full((batch,), 500, device=device),
        added_cond_kwargs=dict(
            resolution=size.to(device, dtype), aspect_ratio=(size[:, :1] / size[:, 1:]).to(device, dtype)
        ),
    )


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def make_controller(blocks: int, latent_hw) -> AttentionController:
    """DiT4Edit's default control for a one-word swap (target token 3 takes source token 3's attention)."""
    swap = TokenEdit(torch.eye(L), torch.ones(L), torch.full((L,), steps_before(0.8, NUM_STEPS)), torch.ones(L))
    return AttentionController(AttentionControl(), LAYOUT, num_steps=NUM_STEPS, num_blocks=blocks,
                               grid=token_grid(latent_hw), token_edits=[swap])


class PeakMemory:
    """Peak memory of a region: CUDA allocator peak, or on CPU the peak resident set above the start (sampled)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.rss()
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.rss())

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


@contextlib.contextmanager
def component_timer(model, device, totals: dict):
    """Add the wall time of every block, and of its attn1 / attn2 / ff, to `totals` (syncs a GPU)."""
    handles = []
    for block in model.transformer_blocks:
        for name, module in [("block", block)] + [(name, getattr(block, name)) for name in ("attn1", "attn2", "ff")]:

            def before(module, args, name=name):
                synchronize(device)
                module._bench_start = time.perf_counter()

            def after(module, args, output, name=name):
                synchronize(device)
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - module._bench_start

            handles += [module.register_forward_pre_hook(before, prepend=True), module.register_forward_hook(after)]
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def attn1_outputs(model, store: list):
    """Append every block's self-attention output to `store` (on the CPU, in float32), in block order."""
    handles = [
        block.attn1.register_forward_hook(lambda module, args, output: store.append(output.float().cpu()))
        for block in model.transformer_blocks
    ]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.float() - reference.float()).norm() / reference.float().norm())


@contextlib.contextmanager
def variant_installed(model, variant: Variant, grid):
    if variant.config is None:
        yield
    else:
        with token_merging(model, variant.config, grid, plan_row=LAYOUT.row(SOURCE, cond=True)):
            yield


def timed_forward(model, inputs, variant, grid, device, parts: dict | None = None, memory=None) -> float:
    """Seconds of one forward; with `parts`, also the per-module times (hooks, which sync a GPU); with `memory` (a
    PeakMemory), its peak."""
    timer = component_timer(model, device, parts) if parts is not None else contextlib.nullcontext()
    with variant_installed(model, variant, grid), timer, memory or contextlib.nullcontext():
        synchronize(device)
        start = time.perf_counter()
        forward(model, inputs)
        synchronize(device)
        elapsed = time.perf_counter() - start
    if parts is not None:
        parts["total"] = elapsed
    return elapsed


def measure_size(model, inputs, variants, grid, repeats, device) -> dict:
    """A warm-up, one untimed pass per variant (outputs for the errors), then `repeats` rounds that time every
    variant in turn; peak memory from the first round. The per-module times come from the timed rounds on a CPU
    (hooks cost nothing there) and from one extra round on a GPU (the hooks synchronise)."""
    forward(model, inputs)  # warm-up: one-time allocations and kernel set-up stay out of every number below
    results = error_pass(model, inputs, variants, grid)
    on_cpu = torch.device(device).type == "cpu"
    for repeat in range(repeats):
        for v in variants:
            r = results[v.label]
            parts = {} if on_cpu else None
            memory = PeakMemory(device) if repeat == 0 else None
            r["times"].append(timed_forward(model, inputs, v, grid, device, parts, memory))
            r.setdefault("mem", memory)
            if on_cpu:
                r["parts"].append(parts)
    if not on_cpu:
        for v in variants:
            results[v.label]["parts"].append({})
            timed_forward(model, inputs, v, grid, device, results[v.label]["parts"][-1])
    for r in results.values():
        r["median"] = statistics.median(r["times"])
        r["parts"] = {key: statistics.median(p[key] for p in r["parts"]) for key in r["parts"][0]}
    return results


def error_pass(model, inputs, variants, grid) -> dict:
    """Each variant's relative error against the first (unmerged) one: of the output's eps channels, and of every
    block's self-attention output (mean over blocks)."""
    results, reference = {}, None
    for v in variants:
        attn = []
        with variant_installed(model, v, grid), attn1_outputs(model, attn):
            out = forward(model, inputs)[:, :4].float().cpu()  # the eps channels the sampler uses
        if reference is None:
            reference = (out, attn)
        results[v.label] = dict(
            times=[],
            parts=[],
            error=relative_error(out, reference[0]),
            attn_error=statistics.mean(map(relative_error, attn, reference[1])),
        )
    return results


def use_mmap_for_large_blocks():
    """Make glibc return freed tensors to the OS, so the resident set tracks live CPU memory (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed


def report(size, latent_hw, results, variants, batch, blocks):
    """Markdown tables. The 28-block column scales the in-block time (median minus the time outside the blocks,
    the least of the variants' medians) by 28 / blocks; it is an estimate, not a measurement."""
    tokens = latent_hw[0] * latent_hw[1] // 4
    base = results[variants[0].label]
    outside = min(outside_blocks(r["parts"]) for r in results.values())  # the same work in every variant
    scale = 28 / blocks
    base_28 = outside + scale * (base["median"] - outside)
    print(f"\n### {size} (latent {latent_hw[0]}x{latent_hw[1]}, {tokens} tokens, batch {batch})\n")
    print("| variant | median s | merged/unmerged | min s | min/min | est. ratio at 28 blocks "
          "| peak MiB (+ during forward) | rel. error output | rel. error attn1 | runs s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for v in variants:
        r = results[v.label]
        runs = ", ".join(f"{t:.2f}" for t in r["times"])
        mem = f"{r['mem'].peak_mib:.0f} (+{r['mem'].extra_mib:.0f})"
        est = (outside + scale * (r["median"] - outside)) / base_28
        fastest = min(r["times"])
        print(f"| {v.label} | {r['median']:.3f} | {r['median'] / base['median']:.2f} | {fastest:.3f} "
              f"| {fastest / min(base['times']):.2f} | {est:.2f} | {mem} "
              f"| {r['error']:.4f} | {r['attn_error']:.3f} | {runs} |")
    print("\nwhere the time goes (medians of the timed runs on a CPU, one synchronised run on a GPU; seconds summed "
          "over blocks; glue = norms, modulation, gates and residual adds inside the blocks):\n")
    print("| variant | attn1 (incl. merge) | attn2 | ff (incl. merge) | glue | outside blocks | total |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        p = results[v.label]["parts"]
        glue = p["block"] - p["attn1"] - p["attn2"] - p["ff"]
        print(f"| {v.label} | {p['attn1']:.3f} | {p['attn2']:.3f} | {p['ff']:.3f} | {glue:.3f} "
              f"| {outside_blocks(p):.3f} | {p['total']:.3f} |")
    sys.stdout.flush()


def outside_blocks(parts: dict) -> float:
    """Patch, caption and timestep embedding, final layer, unpatchify: the whole forward minus the blocks."""
    return parts["total"] - parts["block"]


def plan_variants(variants: list[Variant], plan_every: list[int], blocks: int) -> list[Variant]:
    """Each merging variant again with one plan per K of the `blocks` blocks (K capped at `blocks`, repeats
    dropped; K = 1 is the variant itself)."""
    ks = sorted({min(k, blocks) for k in plan_every if k > 1})
    return [Variant(f"{v.label}, plan every {k}" + (" (one per step)" if k == blocks else ""),
                    replace(v.config, plan_every=k)) for v in variants for k in ks]


def main(argv=None) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # the "keep in float32" notice on .to(dtype) of a random model
    dtype = getattr(torch, args.dtype)
    if torch.device(args.device).type == "cpu":
        use_mmap_for_large_blocks()
    stride = tuple(args.stride)
    variants = [Variant("ratio 0", None)]
    variants += [Variant(f"ratio {r}", MergeConfig(ratio=r, stride=stride, seed=args.seed)) for r in args.ratios]
    variants += [
        Variant(f"ratio {r} + ff", MergeConfig(ratio=r, stride=stride, seed=args.seed, merge_ff=True))
        for r in args.ff_ratios
    ]
    variants += plan_variants(variants[1:], args.plan_every, args.blocks)
    print(f"# token merging benchmark\n\ndevice: {describe_device(args.device)}, dtype {args.dtype}")
    control = "no attention control" if args.no_control else f"attention control at step {args.step} of {NUM_STEPS}"
    print(f"PixArt-XL-2 architecture, random weights, {args.blocks} of 28 blocks (per-block ratios are what carry "
          f"over to 28), merge stride {stride}, self-attention (attn1) merged in every block with one plan from "
          f"the source's conditional row (per block and step, or per K blocks with 'plan every K'); the "
          f"{LAYOUT.rows}-row edit batch, {control}")
    print(f"command: {' '.join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}")
    models = {}
    for size in args.sizes:
        latent_hw = SIZES[size]
        sample_size = 64 if size == "512" else 128  # 512 model vs 1024-MS model
        if sample_size not in models:
            torch.manual_seed(args.seed)
            models = {sample_size: build_transformer(sample_size, args.blocks, args.device, dtype)}
        inputs = make_inputs(latent_hw, LAYOUT.rows, args.device, dtype, args.seed)
        repeats = {"512": args.repeats_small, "1024x2048": args.repeats_large}.get(size, args.repeats)
        grid = token_grid(latent_hw)
        controlled = contextlib.nullcontext()
        if not args.no_control:
            inputs["cross_attention_kwargs"] = {"step_index": args.step}
            controlled = install(models[sample_size], make_controller(args.blocks, latent_hw))
        with controlled:
            results = measure_size(models[sample_size], inputs, variants, grid, repeats, args.device)
        report(size, latent_hw, results, variants, LAYOUT.rows, args.blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
