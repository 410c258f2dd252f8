"""Which guidance and inversion edit best with a model: the settings its `dit4edit.json` should carry.

For each guidance scale (and each inversion method) it runs DiT4Edit with the default attention control on
(a) held-out rendered scenes, inverted then edited (the synthetic editing benchmark's pairs and scoring), and
(b) "generate, then edit" pairs (`eval_editing.py`), and prints one row per setting. Resumable per setting (the
benchmark part keeps its JSONL); the generate-then-edit part is recomputed.

    python training/sweep_settings.py --model src/dit4edit/models/shapes --out benchmarks/results/settings-v2 \
        --guidance 2,3,4.5 --inversion dpm --pairs 12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import setup
from dit4edit.pipeline import DiT4EditPipeline
from dit4edit_research.bench_synthetic import run_editing
from eval_editing import run as generate_then_edit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("src/dit4edit/models/shapes"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--guidance", default="2,3,4.5")
    p.add_argument("--inversion", default="dpm")
    p.add_argument("--pairs", type=int, default=12, help="pairs per setting, for each of the two checks")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    setup(args.threads)
    pipe = DiT4EditPipeline.from_pretrained(str(args.model))
    rows = []
    for method in args.inversion.split(","):
        for guidance in (float(g) for g in args.guidance.split(",")):
            name = f"g{guidance:g}-{method}"
            bench = run_editing(pipe, args.out / name, args.pairs, ["dit4edit"], args.steps, guidance,
                                disable_progress=True, inversion=method)["dit4edit"]["all"]
            gen = generate_then_edit(pipe, args.pairs, args.steps, guidance)["summary"]["all"]
            row = {"guidance": guidance, "inversion": method,
                   "inverted": {k: bench.get(k) for k in ("psnr", "background_psnr", "success", "seconds")},
                   "generated": gen}
            rows.append(row)
            print(f"{name:<14} inverted: {bench['psnr']:6.2f} dB vs truth, background {bench['background_psnr']:6.2f} dB, "
                  f"success {100 * bench['success']:5.1f}% | generated: success {100 * gen['success']:5.1f}%, "
                  f"background {gen['background_psnr']:6.2f} dB", flush=True)
    (args.out / "sweep.json").write_text(json.dumps({"model": str(args.model), "pairs": args.pairs, "rows": rows},
                                                    indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
