"""Editing check for a shapes model: "generate, then edit" on held-out captions, scored by the oracle.

For each held-out scene (seeds from 1.5 * 10**9 on, never used in training or by the editing benchmark) the model
generates the source caption (DPM-Solver++(2M), its trajectory kept), then DiT4Edit edits that trajectory towards
the caption with one attribute changed (colour, shape, size or background, in turn). No inversion is involved, so
this measures what the model and the attention control can do, apart from inversion error.

- `source_ok`: the oracle reads the generated source as its caption (count, colours, shapes, background).
- `success`: the edited attribute is read back on the edited object (the detected object nearest to where the
  source's object was; for background edits, the background).
- `background_psnr`: PSNR between the generated source and the edit outside the edited object (the union of the
  object's pixels in both images, grown by 3 px); for background edits, on the objects' inner pixels.

Weights are selected with this check (a model that generates better can still edit worse).

    python training/eval_editing.py --model src/dit4edit/models/shapes --n 100 --json out.json --grid grid.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import setup
from dit4edit_research import synthetic as world
from dit4edit.pipeline import DiT4EditPipeline
from dit4edit_research.bench_synthetic import make_pairs

EDIT_CHECK_SEED = 1_500_000_000
GROW = 3


def edit_pairs(n: int, seed: int = EDIT_CHECK_SEED) -> list:
    """`n` held-out 128x128 (scene, edit) pairs cycling through the edit kinds."""
    return make_pairs(n, ((128, 128),), seed)


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(pixels):
        padded = np.pad(out, 1)
        out = out | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return out


def _shrink(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~_grow(~mask, pixels)


def _foreground(image: np.ndarray, background: str) -> np.ndarray:
    bg = np.array(world.BACKGROUNDS[background], dtype=np.float32)
    return np.sqrt(((image.astype(np.float32) - bg) ** 2).sum(-1)) > world.FOREGROUND_DISTANCE


def _component_near(fg: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """The 4-connected foreground component whose centre is nearest to (cx, cy) (all False if none)."""
    best, best_d = np.zeros_like(fg), np.inf
    for comp in world._components(fg):
        if len(comp) < world.MIN_OBJECT_AREA:
            continue
        d = (comp[:, 1].mean() - cx) ** 2 + (comp[:, 0].mean() - cy) ** 2
        if d < best_d:
            best_d, best = d, np.zeros_like(fg)
            best[comp[:, 0], comp[:, 1]] = True
    return best


def score_edit(source: np.ndarray, output: np.ndarray, pair) -> dict:
    """Oracle scores of one generated source and its edit (see the module docstring)."""
    src_report, out_report = world.oracle(source), world.oracle(output)
    hits = world.caption_hits(src_report, pair.source)
    source_ok = bool(hits["background"] and hits["count"] and all(hits["colour"]) and all(hits["shape"]))
    edit = pair.edit
    src_fg = _foreground(source, src_report.background)
    if edit.kind == "background":
        success = out_report.background == edit.value
        keep = _shrink(src_fg, 2)
    else:
        objects = src_report.objects
        if len(objects) == len(pair.source.objects):
            anchor = objects[edit.index]
            where = (anchor.cx, anchor.cy)
        elif objects:
            anchor = max(objects, key=lambda o: o.area)
            where = (anchor.cx, anchor.cy)
        else:
            where = (pair.source.objects[edit.index].cx, pair.source.objects[edit.index].cy)
        wanted = getattr(pair.target.objects[edit.index], edit.kind)  # attribute edits keep the left-right order
        seen = (min(out_report.objects, key=lambda o: (o.cx - where[0]) ** 2 + (o.cy - where[1]) ** 2)
                if out_report.objects else None)
        success = seen is not None and getattr(seen, edit.kind) == wanted
        region = _component_near(src_fg, *where)
        region |= _component_near(_foreground(output, src_report.background), *where)
        keep = ~_grow(region, GROW)
    diff = (source.astype(np.float64) - output.astype(np.float64))[keep]
    mse = float(np.mean(diff**2)) if diff.size else float("nan")
    bg_psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse) if diff.size else float("nan")
    return {"kind": edit.kind, "source_ok": source_ok, "success": bool(success), "background_psnr": bg_psnr}


def run(pipe, n: int, steps: int, guidance: float, seed: int = EDIT_CHECK_SEED,
        grid: Path | None = None) -> dict:
    rows, tiles = [], []
    t0 = time.time()
    for k, pair in enumerate(edit_pairs(n, seed)):
        generator = torch.Generator().manual_seed(seed + k)
        source, inversion = pipe.generate(pair.source_caption, height=pair.source.height, width=pair.source.width,
                                          num_inference_steps=steps, guidance_scale=guidance,
                                          generator=generator, disable_progress=True)
        result = pipe.edit(inversion, pair.target_caption, disable_progress=True)
        src, out = np.asarray(source.convert("RGB")), np.asarray(result.images[0].convert("RGB"))
        row = score_edit(src, out, pair)
        row.update(index=k, source_caption=pair.source_caption, target_caption=pair.target_caption)
        rows.append(row)
        if grid is not None and len(tiles) < 24:
            tiles.append((src, out))
    summary = summarise(rows)
    summary["seconds_per_pair"] = (time.time() - t0) / max(n, 1)
    if grid is not None and tiles:
        save_grid(tiles, grid)
    return {"summary": summary, "rows": rows}


def summarise(rows: list[dict]) -> dict:
    def stats(sub):
        finite = [r["background_psnr"] for r in sub if np.isfinite(r["background_psnr"])]
        capped = [min(v, 60.0) for v in finite] + [60.0 for r in sub if r["background_psnr"] == float("inf")]
        return {"n": len(sub), "success": float(np.mean([r["success"] for r in sub])) if sub else None,
                "source_ok": float(np.mean([r["source_ok"] for r in sub])) if sub else None,
                "background_psnr": float(np.mean(capped)) if capped else None}

    out = {"all": stats(rows)}
    for kind in world.EDIT_KINDS:
        out[kind] = stats([r for r in rows if r["kind"] == kind])
    return out


def save_grid(tiles, path: Path, size: int = 96) -> None:
    """Source above edit, 12 pairs a row."""
    per_row = 12
    rows = (len(tiles) + per_row - 1) // per_row
    canvas = Image.new("RGB", (per_row * size, rows * 2 * size), (255, 255, 255))
    for i, (src, out) in enumerate(tiles):
        x, y = (i % per_row) * size, (i // per_row) * 2 * size
        canvas.paste(Image.fromarray(src).resize((size, size)), (x, y))
        canvas.paste(Image.fromarray(out).resize((size, size)), (x, y + size))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("src/dit4edit/models/shapes"))
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--grid", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    setup(args.threads)
    pipe = DiT4EditPipeline.from_pretrained(str(args.model))
    result = run(pipe, args.n, args.steps, args.guidance, grid=args.grid)
    s = result["summary"]
    for key, v in s.items():
        if isinstance(v, dict):
            print(f"{key:<11} n={v['n']:<4} success {100 * (v['success'] or 0):5.1f}%  source ok "
                  f"{100 * (v['source_ok'] or 0):5.1f}%  background {v['background_psnr'] or float('nan'):6.2f} dB")
    print(f"{s['seconds_per_pair']:.2f} s per pair")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "steps": args.steps, "guidance": args.guidance,
                                         **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
