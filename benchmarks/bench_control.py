"""Cost of attention control per denoising step: one transformer forward of an edit batch under each control
setting, side by side with diffusers' default processor, on the PixArt-XL-2 architecture with random weights.

    python benchmarks/bench_control.py                          # CPU: 4 of the 28 blocks, 512², 3 rounds
    python benchmarks/bench_control.py --blocks 28 --device cuda --dtype float16 --rounds 10

Settings are interleaved round by round (same model, same inputs, same process). Each reports the median and the
best time of one call (the best is what a shared machine disturbs least) and the peak memory the call adds on top
of what is resident before it (CUDA: `max_memory_allocated`; CPU on Linux: peak RSS after resetting the kernel's
high-water mark via /proc/self/clear_refs, with glibc's mmap threshold pinned so that freed tensors leave the RSS).
Two tables: one attention layer called directly (the control's own cost), and one whole forward. The batch is one
edit with classifier-free guidance, `[src_u, tgt_u, src_c, tgt_c]` (4 rows). Self-attention control covers the
default block range (the deeper half) unless a setting says otherwise; "early" runs at step 0 (source
self-attention + cross edit + map recording for local blend), "late" at the last step (mutual self-attention only;
the cross-attention window is over).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0

from dit4edit.control import (
    AttentionControl,
    AttentionController,
    ControlledAttnProcessor,
    TokenEdit,
    install,
    steps_before,
)
from dit4edit.layout import BatchLayout
from dit4edit.tiny import pixart_xl_transformer

L = 120
NUM_STEPS = 30


def build_model(blocks: int, device, dtype) -> PixArtTransformer2DModel:
    """PixArt-XL-2-512x512 architecture (16 heads x 72, caption_channels 4096, sample_size 64), `blocks` blocks."""
    torch.manual_seed(0)
    model = pixart_xl_transformer(blocks, sample_size=64)
    return model.to(device=device, dtype=dtype).eval()


def inputs(layout: BatchLayout, resolution: int, device, dtype):
    g = torch.Generator().manual_seed(1)
    side = resolution // 8
    latents = torch.randn(layout.rows, 4, side, side, generator=g)
    embeds = torch.randn(layout.rows, L, 4096, generator=g)
    mask = (torch.arange(L)[None] < torch.tensor([12, 14] * layout.branches)[: layout.rows, None]).float()
    return dict(
        hidden_states=latents.to(device, dtype),
        encoder_hidden_states=embeds.to(device, dtype),
        encoder_attention_mask=mask.to(device),
        timestep=torch.full((layout.rows,), 500, device=device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


def token_edit(refine: bool) -> TokenEdit:
    """A word swap (tokens 3-4 of the target take source token 3), optionally with refine columns and reweighting."""
    mapper = torch.eye(L)
    mapper[:, 4] = 0
    mapper[3, 4] = 1
    from_source = torch.ones(L)
    weights = torch.ones(L)
    if refine:
        from_source[5] = 0
        weights[[3, 4]] = 2.0
    return TokenEdit(mapper, from_source, torch.full((L,), steps_before(0.8, NUM_STEPS)), weights)


def variants(blocks: int):
    """(name, config, step, refine, record) for each measured setting; None config = diffusers' default processor."""
    blend = dict(local_blend_words=("cat", "dog"))
    late = NUM_STEPS - 1
    every = (0, blocks)
    return [
        ("default processor (AttnProcessor2_0)", None, 0, False, False),
        ("installed, control off", AttentionControl(enabled=False), 0, False, False),
        ("early: source self-attn (Eq. 11) + P2P replace + blend maps", AttentionControl(**blend), 0, False, True),
        ("early: P2P self-attn + refine/reweight + blend maps",
         AttentionControl(self_mode_early="p2p", **blend), 0, True, True),
        ("late: mutual self-attn (MasaCtrl)", AttentionControl(), late, False, False),
        ("late: mutual self-attn, union keys", AttentionControl(mutual="union"), late, False, False),
        (f"late: mutual self-attn, all {blocks} blocks", AttentionControl(self_layers=every), late, False, False),
        (f"late: union keys, all {blocks} blocks",
         AttentionControl(self_layers=every, mutual="union"), late, False, False),
    ]  # fmt: skip


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(fn, device) -> tuple[float, float]:
    """(seconds, peak MiB added) of one call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return seconds, (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, (_rss_kib("VmHWM") - base) / 1024


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} threads"


def table(title: str, settings: list, run, rounds: int, device, unit: str) -> list[str]:
    """Time and peak memory of `run(index)` for each setting, interleaved round by round; markdown rows. Ratios are
    against the nearest "default processor" row above."""
    times = [[] for _ in settings]
    peaks = [[] for _ in settings]
    for _ in range(rounds):
        for index in range(len(settings)):
            seconds, peak = measure(lambda: run(index), device)
            times[index].append(seconds)
            peaks[index].append(peak)
    lines = [
        title,
        "",
        f"| setting | {unit}, median | vs default | {unit}, best | vs default | peak MiB added | vs default |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    scale = 1000 if unit.startswith("ms") else 1
    for name, t, p in zip(settings, times, peaks):
        median, best, p = statistics.median(t), min(t), statistics.median(p)
        if "default processor" in name:
            base_median, base_best, base_peak = median, best, p
        lines.append(
            f"| {name} | {median * scale:.3f} | {median / base_median:.3f}x | {best * scale:.3f} "
            f"| {best / base_best:.3f}x | {p:.1f} | {p - base_peak:+.1f} |"
        )
    return lines + [""]


def forward_table(model, args, device, dtype) -> list[str]:
    layout = BatchLayout(1)
    kwargs = inputs(layout, args.resolution, device, dtype)
    grid = (args.resolution // 16, args.resolution // 16)
    settings = variants(args.blocks)
    controllers = [
        None
        if config is None
        else AttentionController(
            config, layout, num_steps=NUM_STEPS, num_blocks=args.blocks, grid=grid, token_edits=[token_edit(refine)],
            words=[{"cat": [3]}, {"dog": [3, 4]}] if record else (),
        )
        for _, config, _, refine, record in settings
    ]  # fmt: skip

    def run(index):
        _, config, step, _, _ = settings[index]
        with torch.no_grad():
            if config is None:
                return model(**kwargs)[0]
            with install(model, controllers[index]):
                out = model(**kwargs, cross_attention_kwargs={"step_index": step})[0]
            controllers[index].reset()
            return out

    for index in range(len(settings)):  # warm-up, and a check that source rows match the default
        out = run(index)
        if index == 0:
            reference = out
        source = ~layout.is_target(device)
        error = (out[source] - reference[source]).abs().max().item()
        assert error < (1e-3 if dtype == torch.float32 else 5e-2), (settings[index][0], error)
    title = (
        f"### One transformer forward (one denoising step)\n\n"
        f"PixArt-XL-2 architecture (16 heads x 72, caption_channels 4096, sample_size 64), random weights, "
        f"**{args.blocks} of 28 blocks**, {args.dtype}; {args.resolution}x{args.resolution} "
        f"({grid[0] * grid[1]} tokens); edit batch of {layout.rows} rows; {args.rounds} interleaved rounds. "
        f"Self-attention control on the default blocks {AttentionControl().self_blocks(args.blocks).start}:"
        f"{args.blocks} unless the setting says all."
    )
    return table(title, [s[0] for s in settings], run, args.rounds, device, "s / forward")


def layer_table(model, args, device, dtype) -> list[str]:
    """One attention layer (block `blocks // 2`) called directly: the control's own cost, free of the rest."""
    layout = BatchLayout(1)
    block_index = args.blocks // 2
    block = model.transformer_blocks[block_index]
    g = torch.Generator().manual_seed(2)
    n = (args.resolution // 16) ** 2
    hidden = torch.randn(layout.rows, n, 1152, generator=g).to(device, dtype)
    text = torch.randn(layout.rows, L, 1152, generator=g).to(device, dtype)
    lengths = torch.tensor([12, 14] * layout.branches)[: layout.rows]
    bias = ((torch.arange(L)[None] >= lengths[:, None]).to(dtype) * -10000.0)[:, None].to(device)  # (B, 1, L)
    grid = (args.resolution // 16, args.resolution // 16)

    def controlled(config, refine=False, record=False):
        return AttentionController(
            config, layout, num_steps=NUM_STEPS, num_blocks=args.blocks, grid=grid, token_edits=[token_edit(refine)],
            words=[{"cat": [3]}, {"dog": [3, 4]}] if record else (),
        )  # fmt: skip

    def processor(config, cross=False, **kw):
        return ControlledAttnProcessor(controlled(config, **kw), block_index, cross)

    self_ctrl = lambda **kw: processor(AttentionControl(**kw))  # noqa: E731
    settings = [
        ("self: default processor", AttnProcessor2_0(), None),
        ("self: installed, control off", processor(AttentionControl(enabled=False)), 0),
        ("self: source (Eq. 11)", self_ctrl(), 0),
        ("self: P2P (source map, target values)", self_ctrl(self_mode_early="p2p"), 0),
        ("self: mutual (MasaCtrl)", self_ctrl(), NUM_STEPS - 1),
        ("self: mutual, union keys", self_ctrl(mutual="union"), NUM_STEPS - 1),
        ("cross: default processor", AttnProcessor2_0(), None),
        ("cross: P2P replace", processor(AttentionControl(), cross=True), 0),
        ("cross: refine + reweight", processor(AttentionControl(), cross=True, refine=True), 0),
        ("cross: replace + blend-map recording", processor(AttentionControl(), cross=True, record=True), 0),
    ]  # fmt: skip

    def run(index):
        name, processor, step = settings[index]
        attn = block.attn2 if name.startswith("cross") else block.attn1
        extra = {} if step is None else {"step_index": step}
        with torch.no_grad():
            if name.startswith("cross"):
                out = processor(attn, hidden, encoder_hidden_states=text, attention_mask=bias, **extra)
            else:
                out = processor(attn, hidden, **extra)
        if isinstance(processor, ControlledAttnProcessor):
            processor.controller.reset()
        return out

    for index in range(len(settings)):
        run(index)
    rounds = max(5, 3 * args.rounds)
    title = (
        f"### One attention layer (block {block_index}), called directly\n\n"
        f"Same model and size; hidden states `({layout.rows}, {n}, 1152)`, text `({layout.rows}, {L}, 1152)` with "
        f"padding; {rounds} interleaved rounds. Timings include the layer's projections (`to_q/k/v`, `to_out`)."
    )
    return table(title, [s[0] for s in settings], run, rounds, device, "ms / call")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="transformer blocks (PixArt-XL-2 has 28)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--skip-forward", action="store_true", help="only the per-layer table")
    parser.add_argument("--out", help="also write the markdown tables to this file")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and argv is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc raises its mmap threshold after large frees and then keeps freed tensors resident, which hides
        # peaks from the RSS; a fixed threshold maps and unmaps every large tensor. Restart with it set.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

    model = build_model(args.blocks, device, dtype)
    _, calibration = measure(lambda: torch.ones(25 * 2**20, device=device).sum(), device)  # 100 MiB
    lines = [
        f"Machine: {machine(device)}.",
        f"Memory check: a 100 MiB tensor made and freed inside a measured call reads as {calibration:.1f} MiB.",
        "",
    ]
    lines += layer_table(model, args, device, dtype)
    if not args.skip_forward:
        lines += forward_table(model, args, device, dtype)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
