"""Editing benchmark on the synthetic world, where the exact edited image is known (issue 6).

For held-out (scene, edit) pairs (seeds >= 10**9, never used in training) it runs each method and measures, per
edit category: PSNR and SSIM against the ground-truth edited scene, background PSNR outside the edited region
(source vs output: what the edit should keep), edit success read back by the oracle, and seconds per edit.
Results go to `results.jsonl` one line per (pair, method) as they are made, so a crashed run resumes where it
stopped without repeating or losing work; `summary.json`, `summary.md` and `grid.png` are rebuilt from it.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import images as imgs
from . import synthetic as world
from .control import AttentionControl
from .errors import DiT4EditError

HELD_OUT_SEED = 10**9
SIZES = ((128, 128), (256, 128))  # (width, height): the square base and the 2:1 multi-aspect bucket


@dataclass(frozen=True)
class Method:
    """One way of editing: inversion, attention control (None = none), or SDEdit at a strength."""

    name: str
    inversion: str = "dpm-exact"
    control: AttentionControl | None = field(default_factory=AttentionControl)
    sdedit_strength: float | None = None


def default_methods() -> dict[str, Method]:
    methods = [
        Method("dit4edit"),
        Method("ddim-inversion", inversion="ddim"),
        Method("no-control", control=None),
        # "target" early mode for the whole schedule = the edit branch keeps its own self-attention: no self control
        Method("cross-only", control=AttentionControl(self_mode_early="target", self_replace_steps=1.0)),
        Method("self-only", control=AttentionControl(cross_replace_steps=0.0)),
        Method("sdedit-0.6", control=None, sdedit_strength=0.6),
    ]
    return {m.name: m for m in methods}


def make_pairs(count: int, sizes: Sequence[tuple[int, int]] = SIZES, seed: int = HELD_OUT_SEED) -> list:
    """`count` held-out edit pairs cycling through the edit kinds and canvas sizes, deterministic."""
    pairs = []
    for k in range(count):
        width, height = sizes[k % len(sizes)]
        kind = world.EDIT_KINDS[k % len(world.EDIT_KINDS)]
        scene = world.generate_scene(seed + k, width=width, height=height)
        try:
            edit = world.random_edit(scene, seed + k, kind)
        except ValueError:
            edit = world.random_edit(scene, seed + k)
        pairs.append(world.apply_edit(scene, edit))
    return pairs


# --- metrics ---------------------------------------------------------------------------------------------------


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean SSIM of two RGB uint8 images on luma, with a `window` x `window` uniform window (Wang et al. 2004)."""
    x, y = (np.asarray(im, dtype=np.float64) @ [0.299, 0.587, 0.114] for im in (a, b))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mean = lambda z: _box(z, window)  # noqa: E731
    mx, my = mean(x), mean(y)
    vx, vy, cov = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _box(z: np.ndarray, k: int) -> np.ndarray:
    """Means over every k x k window ('valid' positions), by an integral image."""
    c = np.pad(z, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def masked_psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    """PSNR over the pixels where `keep` is True."""
    if not keep.any():
        return float("nan")
    diff = (a.astype(np.float64) - b.astype(np.float64))[keep]
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def edit_succeeded(output: np.ndarray, pair) -> bool:
    """Did the oracle read the edited attribute back from the output?"""
    report = world.oracle(output)
    edit = pair.edit
    if edit.kind == "background":
        return report.background == edit.value
    wanted = pair.target.objects[edit.index]
    if not report.objects:
        return False
    seen = min(report.objects, key=lambda o: (o.cx - wanted.cx) ** 2 + (o.cy - wanted.cy) ** 2)
    attribute = {"colour": "colour", "shape": "shape", "pattern": "pattern", "size": "size"}[edit.kind]
    return getattr(seen, attribute) == getattr(wanted, attribute)


def score(output: Image.Image, pair, seconds: float) -> dict:
    out = np.asarray(output.convert("RGB"))
    truth, source = pair.target.image, pair.source.image
    return dict(
        psnr=imgs.psnr(output, Image.fromarray(truth)),
        ssim=ssim(out, truth),
        background_psnr=masked_psnr(out, source, ~pair.region),
        success=bool(edit_succeeded(out, pair)),
        seconds=seconds,
    )


# --- running ---------------------------------------------------------------------------------------------------


def run_editing(pipe, out_dir: str | os.PathLike, count: int = 200, methods: Sequence[str] | None = None,
                steps: int = 30, guidance: float = 4.5, grid_pairs: int = 8, disable_progress: bool = False,
                inversion: str | None = None) -> dict:
    """Run (or resume) the editing benchmark; returns the summary. `inversion` replaces the methods' default
    inversion (dpm-exact) except where a method is defined by its inversion (ddim-inversion)."""
    import torch

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    available = default_methods()
    if inversion is not None:
        available = {n: m if m.inversion != "dpm-exact" else Method(m.name, inversion, m.control, m.sdedit_strength)
                     for n, m in available.items()}
    names = list(methods or available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DiT4EditError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    results_path = out / "results.jsonl"
    done = _load_results(results_path)
    pairs = make_pairs(count)
    todo = [(k, n) for k in range(count) for n in names if (k, n) not in done]
    bar = tqdm(total=len(todo), desc="editing benchmark", disable=disable_progress)
    with results_path.open("a") as log:
        if results_path.stat().st_size and not results_path.read_bytes().endswith(b"\n"):
            log.write("\n")  # a line cut by a crash: start the next result on a line of its own
        for k, pair in enumerate(pairs):
            wanted = [n for n in names if (k, n) not in done]
            if not wanted:
                continue
            inversions = {}
            for name in wanted:
                method = available[name]
                start = time.perf_counter()
                if method.sdedit_strength is not None:
                    output = pipe.sdedit(pair.source.pil(), pair.target_caption, method.sdedit_strength, steps,
                                         guidance, generator=torch.Generator().manual_seed(k),
                                         disable_progress=True)
                else:
                    if method.inversion not in inversions:
                        inversions[method.inversion] = pipe.invert(pair.source.pil(), pair.source_caption, steps,
                                                                   guidance, method.inversion,
                                                                   disable_progress=True)
                    output = pipe.edit(inversions[method.inversion], pair.target_caption, guidance,
                                       control=method.control, disable_progress=True).images[0]
                seconds = time.perf_counter() - start
                if k < grid_pairs:
                    output.save(out / "images" / f"{k:04d}-{name}.png")
                row = dict(pair=k, method=name, kind=pair.edit.kind, size=f"{pair.source.width}x{pair.source.height}",
                           source=pair.source_caption, target=pair.target_caption, **score(output, pair, seconds))
                log.write(json.dumps(row) + "\n")
                log.flush()
                os.fsync(log.fileno())
                done[(k, name)] = row
                bar.update()
    bar.close()
    rows = [done[(k, n)] for k in range(count) for n in names if (k, n) in done]
    summary = summarise(rows, names)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_table(summary, names))
    make_grid(pairs[:grid_pairs], names, out)
    return summary


def _load_results(path: Path) -> dict:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[(row["pair"], row["method"])] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a crash: that edit is simply redone
    return done


def summarise(rows: list[dict], names: Sequence[str]) -> dict:
    """{method: {category or "all": {metric: mean}}}."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["kind"])].append(row)
        groups[(row["method"], "all")].append(row)
    summary = {}
    for (method, kind), group in groups.items():
        finite = lambda key: [r[key] for r in group if np.isfinite(r[key])]  # noqa: E731
        summary.setdefault(method, {})[kind] = dict(
            n=len(group),
            psnr=float(np.mean(finite("psnr"))) if finite("psnr") else float("nan"),
            ssim=float(np.mean([r["ssim"] for r in group])),
            background_psnr=float(np.mean(finite("background_psnr"))) if finite("background_psnr") else float("nan"),
            success=float(np.mean([r["success"] for r in group])),
            seconds=float(np.mean([r["seconds"] for r in group])),
        )
    return {name: summary[name] for name in names if name in summary}


def summary_table(summary: dict, names: Sequence[str]) -> str:
    kinds = ["all", *world.EDIT_KINDS]
    lines = ["| method | category | n | PSNR vs truth | SSIM | background PSNR | success | s / edit |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names:
        for kind in kinds:
            m = summary.get(name, {}).get(kind)
            if m:
                lines.append(f"| {name} | {kind} | {m['n']} | {m['psnr']:.2f} | {m['ssim']:.3f} | "
                             f"{m['background_psnr']:.2f} | {100 * m['success']:.0f}% | {m['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def make_grid(pairs, names: Sequence[str], out: Path) -> None:
    """input | ground truth | each method, one row per pair, from the saved outputs."""
    from .pictures import grid

    tiles = []
    for k, pair in enumerate(pairs):
        row = [("input", pair.source.pil()), ("truth", pair.target.pil())]
        for name in names:
            path = out / "images" / f"{k:04d}-{name}.png"
            row.append((name, Image.open(path).convert("RGB") if path.exists() else Image.new("RGB", (8, 8))))
        tiles.extend(row)
    if tiles:
        imgs.save_image(grid(tiles, columns=2 + len(names)), out / "grid.png")
