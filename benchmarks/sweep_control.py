"""Sweep the attention-control settings on the synthetic editing benchmark: S (`self_replace_steps`), the
self-attention block range and the cross-attention window, one at a time around the defaults; then Prompt-to-Prompt's
self-attention window and a local blend on the changed words, and how tight its mask is.

Not a test. Every variant edits the same held-out pairs from the same inversion (one inversion per pair, shared),
through `dit4edit_research.bench_synthetic.run_editing`, so the results folder resumes after an interruption and has the
usual summary.md / summary.json / grid.png; this script adds `sweep.md`, one row per variant over all pairs.

    python benchmarks/sweep_control.py -o benchmarks/results/sweep-control --pairs 40 --inversion ddim-exact
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dit4edit_research.bench_synthetic import Method, run_editing
from dit4edit.control import AttentionControl
from dit4edit.pipeline import DiT4EditPipeline, default_model


def variants(blocks: int, inversion: str) -> dict[str, tuple[str, Method]]:
    """{name: (what changes, method)}; names are file-name safe (the picture grid uses them)."""
    half = blocks // 2
    settings = {
        "default": ("S 0.4, blocks [%d, %d), cross 0.8" % (half, blocks), AttentionControl()),
        "S0.0": ("S 0 (mutual self-attention from the start)", AttentionControl(self_replace_steps=0.0)),
        "S0.2": ("S 0.2", AttentionControl(self_replace_steps=0.2)),
        "S0.6": ("S 0.6", AttentionControl(self_replace_steps=0.6)),
        "S0.8": ("S 0.8", AttentionControl(self_replace_steps=0.8)),
        "S1.0": ("S 1.0 (source self-attention throughout)", AttentionControl(self_replace_steps=1.0)),
        "self-all": (f"self control in all blocks [0, {blocks})", AttentionControl(self_layers=(0, blocks))),
        "self-shallow": (f"self control in blocks [0, {half})", AttentionControl(self_layers=(0, half))),
        "early-p2p": ("before S: P2P self-attention (source map, target values)",
                      AttentionControl(self_mode_early="p2p")),
        "mutual-union": ("from S: target attends to [K_src; K_tgt]", AttentionControl(mutual="union")),
        "self-all-S1.0": ("source self-attention in all blocks, all steps",
                          AttentionControl(self_layers=(0, blocks), self_replace_steps=1.0)),
        "self-top2": (f"self control in blocks [{blocks - 2}, {blocks})",
                      AttentionControl(self_layers=(blocks - 2, blocks))),
        "union-top2": (f"from S: union keys, blocks [{blocks - 2}, {blocks})",
                       AttentionControl(mutual="union", self_layers=(blocks - 2, blocks))),
        "p2p-S1.0": ("P2P self-attention (source map, target values) throughout, no mutual",
                     AttentionControl(self_mode_early="p2p", self_replace_steps=1.0)),
        "p2p-S1.0-all": (f"P2P self-attention throughout, all blocks [0, {blocks})",
                         AttentionControl(self_mode_early="p2p", self_replace_steps=1.0, self_layers=(0, blocks))),
        "p2p-S0.6-all": (f"P2P self-attention before S 0.6, then mutual, all blocks [0, {blocks})",
                         AttentionControl(self_mode_early="p2p", self_replace_steps=0.6, self_layers=(0, blocks))),
        "self-off": ("no self control (cross only)",
                     AttentionControl(self_mode_early="target", self_replace_steps=1.0)),
        "cross0.0": ("cross window 0 (self only)", AttentionControl(cross_replace_steps=0.0)),
        "cross0.4": ("cross window 0.4", AttentionControl(cross_replace_steps=0.4)),
        "cross1.0": ("cross window 1.0", AttentionControl(cross_replace_steps=1.0)),
        "no-control": ("no attention control", None),
    }
    # Prompt-to-Prompt self-attention for the first S of the steps, nothing after (its own window), with and
    # without a local blend on the words that change, its word maps min-max normalised (see AttentionControl).
    p2p = dict(self_mode_early="p2p", mutual="none")
    blend = dict(local_blend_changed=True, local_blend_normalize="minmax")
    settings["p2p-S1.0-blend"] = ("P2P self-attention throughout, local blend on the changed words",
                                  AttentionControl(**p2p, self_replace_steps=1.0, **blend))
    for s in (0.7, 0.8, 0.9):
        settings[f"p2p-S{s}-window"] = (f"P2P self-attention before S {s}, none after",
                                        AttentionControl(**p2p, self_replace_steps=s))
        settings[f"p2p-S{s}-blend"] = (f"P2P self-attention before S {s}, none after, local blend on the changed "
                                       "words", AttentionControl(**p2p, self_replace_steps=s, **blend))
    # A tighter blend mask: no dilation on the token grid, and/or a higher threshold on the normalised map.
    for s in (0.7, 0.9):
        for threshold, dilate in ((0.3, 0), (0.5, 1), (0.5, 0)):
            settings[f"p2p-S{s}-blend-t{threshold}-d{dilate}"] = (
                f"P2P self-attention before S {s}, none after, local blend on the changed words, threshold "
                f"{threshold}, dilation {dilate}",
                AttentionControl(**p2p, self_replace_steps=s, **blend, local_blend_threshold=threshold,
                                 local_blend_dilate=dilate))
    # The changed words attend with their own maps from the first step (no Prompt-to-Prompt map for them).
    for s in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 1.0):
        settings[f"p2p-S{s}-window-own"] = (
            f"P2P self-attention before S {s}, none after, the changed words attend with their own maps",
            AttentionControl(**p2p, self_replace_steps=s, cross_replace_changed=0.0))
        settings[f"p2p-S{s}-blend-own"] = (
            f"P2P self-attention before S {s}, none after, local blend on the changed words, which attend with "
            "their own maps", AttentionControl(**p2p, self_replace_steps=s, **blend, cross_replace_changed=0.0))
        settings[f"p2p-S{s}-blend-own-d0"] = (
            f"P2P self-attention before S {s}, none after, local blend on the changed words (no dilation), which "
            "attend with their own maps",
            AttentionControl(**p2p, self_replace_steps=s, **blend, cross_replace_changed=0.0, local_blend_dilate=0))
        settings[f"p2p-S{s}-blend-own-d2"] = (
            f"P2P self-attention before S {s}, none after, local blend on the changed words (dilation 2), which "
            "attend with their own maps",
            AttentionControl(**p2p, self_replace_steps=s, **blend, cross_replace_changed=0.0, local_blend_dilate=2))
        settings[f"p2p-S{s}-blend-own-t0.2"] = (
            f"P2P self-attention before S {s}, none after, local blend on the changed words (threshold 0.2), which "
            "attend with their own maps",
            AttentionControl(**p2p, self_replace_steps=s, **blend, cross_replace_changed=0.0,
                             local_blend_threshold=0.2))
        settings[f"p2p-S{s}-blend-own-t0.4"] = (
            f"P2P self-attention before S {s}, none after, local blend on the changed words (threshold 0.4), which "
            "attend with their own maps",
            AttentionControl(**p2p, self_replace_steps=s, **blend, cross_replace_changed=0.0,
                             local_blend_threshold=0.4))
    # The paper's schedule with own maps for the changed words: Prompt-to-Prompt self-attention before S, then mutual
    # self-attention (the target's queries on the source's keys and values, or on both), which lets the layout move.
    for s in (0.4, 0.6):
        for mutual, name, what in (("source", "mutual", "mutual"), ("union", "union", "union-key")):
            settings[f"p2p-S{s}-{name}-own"] = (
                f"P2P self-attention before S {s}, then {what} self-attention, the changed words attend with their "
                "own maps",
                AttentionControl(self_mode_early="p2p", self_replace_steps=s, mutual=mutual, cross_replace_changed=0.0))
    # Around the shipped control (own maps, S 0.85, blend): which blocks hold the self-attention, and how long the
    # unchanged words keep the source's cross-attention maps.
    own = dict(**p2p, self_replace_steps=0.85, **blend, cross_replace_changed=0.0)
    settings["own-S0.85-all-blocks"] = (f"the shipped control with self-attention control in all blocks [0, {blocks})",
                                        AttentionControl(**own, self_layers=(0, blocks)))
    settings["own-S0.85-top4"] = (f"the shipped control with self-attention control in blocks [{max(blocks - 4, 0)}, "
                                  f"{blocks})", AttentionControl(**own, self_layers=(max(blocks - 4, 0), blocks)))
    for cross in (0.6, 1.0):
        settings[f"own-S0.85-cross{cross}"] = (f"the shipped control with the unchanged words' cross window {cross}",
                                              AttentionControl(**own, cross_replace_steps=cross))
    table = {name: (what, Method(name, inversion=inversion, control=control))
             for name, (what, control) in settings.items()}
    # Direct inversion (PnP Inversion): the target branches also take the pinned source branch's error of each step.
    for name in ("no-control", *(f"p2p-S{s}-blend-own" for s in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 1.0)),
                 *(f"p2p-S{s}-window-own" for s in (0.5, 0.7, 0.85))):
        what, method = table[name]
        table[f"{name}-direct"] = (f"{what}, direct inversion",
                                   Method(f"{name}-direct", inversion=inversion, control=method.control,
                                          direct_inversion=True))
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--model", default=None, help="model folder or hub id (default: the embedded model)")
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--inversion", default="dpm-exact")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--only", default=None, help="comma-separated subset of the variants")
    args = p.parse_args(argv)
    pipe = DiT4EditPipeline.from_pretrained(args.model or default_model())
    pipe.set_progress_bar_config(disable=True)
    table = variants(len(pipe.transformer.transformer_blocks), args.inversion)
    names = args.only.split(",") if args.only else list(table)
    summary = run_editing(pipe, args.output, args.pairs, names, args.steps, args.guidance, grid_pairs=4,
                          available={n: m for n, (_, m) in table.items()}, keep_earlier=True)
    names = list(summary)  # with the variants earlier calls ran into the same folder
    lines = [f"# Attention-control sweep: {args.pairs} held-out pairs, inversion {args.inversion}, "
             f"{args.steps} steps, guidance {args.guidance}, model {args.model or 'embedded'}\n",
             "| variant | setting | PSNR vs truth | SSIM | background PSNR | success |",
             "|---|---|---:|---:|---:|---:|"]
    for name in names:
        row = summary[name]["all"]
        what = table[name][0] if name in table else "(a variant this script no longer defines)"
        lines.append(f"| {name} | {what} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                     f"{row['background_psnr']:.2f} | {100 * row['success']:.0f}% |")
    text = "\n".join(lines) + "\n"
    (args.output / "sweep.md").write_text(text)
    (args.output / "sweep.json").write_text(json.dumps({n: summary[n] for n in names}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
