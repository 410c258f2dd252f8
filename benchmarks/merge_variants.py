"""Where and when to merge, on the embedded model: the synthetic editing benchmark with the paper's merging forced
onto its small token grids, everywhere vs. after the first steps vs. in the deeper blocks only vs. at ratio 0.5 vs.
one plan per 2 blocks or per step (`plan_every`) instead of one per block.

Not a test. Uses the same pairs and results folder as `python -m dit4edit_research.bench_synthetic --methods dit4edit,dit4edit-merged`
(resumable; naive 2M inversion, as in the settings sweep).

    python benchmarks/merge_variants.py -o benchmarks/results/synthetic-merging --pairs 20

The plan_every run (`benchmarks/results/synthetic-merging-plan`) chose its variants with `--methods
dit4edit,dit4edit-merged,merged-plan-every-2,merged-plan-per-step`.
"""

from __future__ import annotations

import argparse
import sys

from dit4edit_research.bench_synthetic import Method, run_editing
from dit4edit.merging import MergeConfig
from dit4edit.pipeline import DiT4EditPipeline, default_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default="benchmarks/results/synthetic-merging")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--methods", default=None, help="comma-separated subset of the variants (default: all)")
    args = p.parse_args(argv)
    pipe = DiT4EditPipeline.from_pretrained(default_model())
    blocks = len(pipe.transformer.transformer_blocks)
    methods = [
        Method("dit4edit", inversion="dpm"),
        Method("dit4edit-merged", inversion="dpm", merge=MergeConfig(min_tokens=0)),
        Method("merged-skip10", inversion="dpm", merge=MergeConfig(min_tokens=0, skip_steps=10)),
        Method("merged-deeper-half", inversion="dpm", merge=MergeConfig(min_tokens=0, blocks=(blocks // 2, blocks))),
        Method("merged-0.5", inversion="dpm", merge=MergeConfig(ratio=0.5, min_tokens=0)),
        Method("merged-plan-every-2", inversion="dpm", merge=MergeConfig(min_tokens=0, plan_every=2)),
        Method("merged-plan-per-step", inversion="dpm", merge=MergeConfig(min_tokens=0, plan_every=blocks)),
    ]
    names = args.methods.split(",") if args.methods else [m.name for m in methods]
    summary = run_editing(pipe, args.output, args.pairs, names, available={m.name: m for m in methods})
    print("| variant | PSNR vs truth | SSIM | background PSNR | success |\n|---|---:|---:|---:|---:|")
    for name, rows in summary.items():
        row = rows["all"]
        print(f"| {name} | {row['psnr']:.2f} | {row['ssim']:.3f} | {row['background_psnr']:.2f} | "
              f"{100 * row['success']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
