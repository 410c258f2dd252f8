"""Editing benchmark on the synthetic world, where the exact edited image is known.

For held-out (scene, edit) pairs (seeds >= 10**9, never used in training) it runs each method and measures, per
edit category: PSNR and SSIM against the ground-truth edited scene, background PSNR outside the edited region
(source vs output: what the edit should keep), edit success read back by the oracle, and seconds per edit.
Results go to `results.jsonl` one line per (pair, method) as they are made, so a crashed run resumes where it
stopped without repeating or losing work; `summary.json`, `summary.md` and `grid.png` are rebuilt from it.

Two more sections run on request, on held-out scenes (`held_out_scenes`), each resumable the same way:

- generation: images generated for held-out captions, read back by the oracle (`synthetic.caption_hits`): accuracy
  of background, count, and each caption object's colour, shape, pattern and size (`generation.jsonl` ->
  `generation.json`, `generation.png`);
- reconstruction: invert then regenerate (`pipe.reconstruct`) with each inversion method: latent NMSE, PSNR vs the
  input, the VAE round trip's PSNR (the floor), NFE and seconds (`reconstruction.jsonl` -> `reconstruction.json`).

`summary.md` has one section per part whose results are in the folder.

Run it with `python -m dit4edit_research.bench_synthetic [-o DIR] [--pairs 200] ...` (or the `dit4edit-bench`
command of this package); `--help` lists the flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dit4edit import images as imgs
from dit4edit.control import AttentionControl
from dit4edit.errors import DiT4EditError
from dit4edit.merging import MergeConfig
from dit4edit.methods import INVERSION_METHODS
from dit4edit.request import UNCHANGED

from . import synthetic as world

HELD_OUT_SEED = 10**9
#: The editing methods the paper compares, as `--method` names them (`dit4edit.editing_methods.EDIT_METHODS`).
PAPER_METHODS = ("dit4edit", "p2p", "masactrl", "pnp-inversion", "infedit", "pix2pix-zero", "sdedit")
SIZES = ((128, 128), (256, 128))  # (width, height): the square base and the 2:1 multi-aspect bucket
SECTIONS = ("editing", "generation", "reconstruction")
GENERATION_STEPS = 20
#: What the generation check asks of a model: oracle accuracy on held-out captions, per attribute.
GENERATION_TARGETS = {"background": 0.95, "colour": 0.90, "shape": 0.80}
RECONSTRUCTION_METHODS = tuple(INVERSION_METHODS)
#: What the reconstruction check asks: dpm-exact within this many dB of the VAE round trip.
RECONSTRUCTION_GAP_DB = 1.0


@dataclass(frozen=True)
class Method:
    """One way of editing: inversion, attention control (None = none; by default the model's own, as `edit` runs
    it when given none: its dit4edit.json's control settings, else the paper's), token merging (the pipeline's
    default merges only grids of >= 1024 tokens, i.e. never on this benchmark's images), or SDEdit at a strength."""

    name: str
    inversion: str = "dpm-exact"
    # changes to the model's control (none: the model's own), an AttentionControl, or None
    control: object = field(default_factory=lambda: UNCHANGED)
    sdedit_strength: float | None = None
    merge: MergeConfig | None = field(default_factory=MergeConfig)
    rows: int = 4  # the edit's batch layout under guidance: 3 leaves out the source's unconditional row
    direct_inversion: bool = False  # the target branches take the pinned source branch's error of each step
    # an editing method by name (`dit4edit.editing_methods`), run through `request.run` with this inversion; the
    # fields above other than `inversion` are then the method's
    edit_method: str | None = None


def default_methods() -> dict[str, Method]:
    methods = [
        Method("dit4edit"),
        Method("ddim-inversion", inversion="ddim"),
        Method("no-control", control=None),
        # "target" early mode for the whole schedule = the edit branch keeps its own self-attention: no self control
        Method("cross-only", control=AttentionControl(self_mode_early="target", self_replace_steps=1.0)),
        Method("self-only", control=AttentionControl(cross_replace_steps=0.0)),
        Method("sdedit-0.6", control=None, sdedit_strength=0.6),
        # The paper's merging (ratio 0.8, 3x3 cells) forced onto these small grids (64-128 tokens).
        Method("dit4edit-merged", merge=MergeConfig(min_tokens=0)),
        Method("dit4edit-3rows", rows=3),
    ]
    # The paper's baselines on the same model, inversion and pairs, each as `--method` runs it ("dit4edit" above
    # is the first of them).
    methods += [Method(name, edit_method=name) for name in PAPER_METHODS if name != "dit4edit"]
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


def held_out_scenes(count: int, seed: int = HELD_OUT_SEED) -> list:
    """`count` held-out scenes, deterministic: 80% 128x128, 10% 256x128, 10% 128x256 (width x height), the same as
    training/eval_generation.py's."""
    sizes = [(128, 128)] * 8 + [(256, 128), (128, 256)]
    return [world.generate_scene(seed + k, *sizes[k % 10]) for k in range(count)]


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


class ResultLog:
    """An append-only JSONL file of results, one line per item, keyed by the row fields `key`: `done` maps each
    key already there to its row. A line cut by a crash is dropped on loading (that item is simply redone), and the
    next result starts on a line of its own; every result is flushed to disk as it is written.

    `settings` (e.g. steps, guidance, model) are written into every row, and only rows made with the same settings
    count as done: a rerun with other settings computes its own rows and summarises only those."""

    def __init__(self, path: Path, key: Sequence[str], settings: dict | None = None):
        self.path, self.key = Path(path), tuple(key)
        self.settings = dict(settings or {})
        self.done: dict[tuple, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    if all(row.get(name) == value for name, value in self.settings.items()):
                        self.done[self.key_of(row)] = row
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue

    def key_of(self, row: dict) -> tuple:
        return tuple(row[name] for name in self.key)

    def __enter__(self) -> ResultLog:
        self._file = self.path.open("a")
        if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self._file.write("\n")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def write(self, row: dict) -> None:
        row = {**row, **self.settings}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[self.key_of(row)] = row

    def rows(self, keys) -> list[dict]:
        """The rows done, in the order of `keys`."""
        return [self.done[key] for key in keys if key in self.done]


def run_editing(pipe, out_dir: str | os.PathLike, count: int = 200, methods: Sequence[str] | None = None,
                steps: int = 30, guidance: float = 4.5, grid_pairs: int = 8, disable_progress: bool = False,
                inversion: str | None = None, available: dict[str, Method] | None = None,
                keep_earlier: bool = False) -> dict:
    """Run (or resume) the editing benchmark; returns the summary. `inversion` replaces the methods' default
    inversion (dpm-exact) except where a method is defined by its inversion (ddim-inversion). `available`: the
    methods to choose from (default `default_methods()`; a settings sweep passes its own). `keep_earlier`: the
    summary (and summary.md, the grid) also keeps the methods an earlier call ran in `out_dir` on all `count` pairs
    with the same settings, after this call's (a sweep run in several calls)."""
    import torch

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    available = available or default_methods()
    if inversion is not None:
        available = {n: m if m.inversion != "dpm-exact" else replace(m, inversion=inversion)
                     for n, m in available.items()}
    names = list(methods or available)
    check_known(names, available, "method")
    pairs = make_pairs(count)
    # The model's own attention control (its dit4edit.json) decides what `dit4edit` runs: rows made under another
    # one are not this run's, even from the same model folder.
    model_control = getattr(getattr(pipe, "defaults", None), "control", None)
    settings = run_settings(pipe, steps, guidance, inversion=inversion,
                            model_control=dict(model_control) if model_control else None)
    with ResultLog(out / "results.jsonl", ("pair", "method"), settings) as log:
        todo = [(k, n) for k in range(count) for n in names if (k, n) not in log.done]
        bar = tqdm(total=len(todo), desc="editing benchmark", disable=disable_progress)
        for k, pair in enumerate(pairs):
            wanted = [n for n in names if (k, n) not in log.done]
            if not wanted:
                continue
            inversions, inversion_seconds = {}, {}
            for name in wanted:
                method = available[name]
                if _inverts(method) and method.inversion not in inversions:  # shared by the pair's methods: timed
                    start = time.perf_counter()  # apart, so no method's seconds carry it
                    inversions[method.inversion] = pipe.invert(pair.source.pil(), pair.source_caption, steps,
                                                               guidance, method.inversion, disable_progress=True)
                    inversion_seconds[method.inversion] = time.perf_counter() - start
                start = time.perf_counter()
                if method.edit_method is not None:
                    output, nfe = _run_method(pipe, method, pair, k, steps, guidance, inversions)
                elif method.sdedit_strength is not None:
                    nfe = steps - min(steps - 1, round(steps * (1.0 - method.sdedit_strength)))
                    output = pipe.sdedit(pair.source.pil(), pair.target_caption, method.sdedit_strength, steps,
                                         guidance, generator=torch.Generator().manual_seed(k),
                                         disable_progress=True)
                else:
                    output = pipe.edit(inversions[method.inversion], pair.target_caption, guidance,
                                       control=method.control, merge=method.merge, rows=method.rows,
                                       direct_inversion=method.direct_inversion, disable_progress=True).images[0]
                    nfe = inversions[method.inversion].nfe + steps
                seconds = time.perf_counter() - start
                if k < grid_pairs:
                    output.save(out / "images" / f"{k:04d}-{name}.png")
                log.write(dict(pair=k, method=name, kind=pair.edit.kind, size=_size(pair.source),
                               source=pair.source_caption, target=pair.target_caption,
                               nfe=nfe, inversion_seconds=inversion_seconds.get(method.inversion)
                               if _inverts(method) else None, **score(output, pair, seconds)))
                bar.update()
        bar.close()
    if keep_earlier:
        earlier = dict.fromkeys(row["method"] for row in log.done.values())
        names += [n for n in earlier if n not in names and all((k, n) in log.done for k in range(count))]
    summary = summarise(log.rows((k, n) for k in range(count) for n in names), names)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_summary(out)
    make_grid(pairs[:grid_pairs], names, out)
    return summary


def _inverts(method: Method) -> bool:
    """Whether `method` edits from an inversion of the input (SDEdit and InfEdit do not)."""
    if method.edit_method is not None:
        from dit4edit.editing_methods import EDIT_METHODS

        return EDIT_METHODS[method.edit_method].inverts
    return method.sdedit_strength is None


def _run_method(pipe, method: Method, pair, k: int, steps: int, guidance: float, inversions: dict):
    """One pair edited by a named editing method through `request.run`, the inversion shared with the other methods
    of the pair; returns (output, NFE: denoiser evaluations of the inversion, if any, and of the edit, a guidance
    gradient step counted as one more)."""
    from dit4edit.editing_methods import EDIT_METHODS
    from dit4edit.request import EditRequest, Settings, run

    chosen = EDIT_METHODS[method.edit_method]
    settings = Settings(steps=steps, guidance=guidance, inversion=method.inversion, seed=k, method=method.edit_method)
    request = EditRequest(targets=(pair.target_caption,), source=pair.source_caption, image=pair.source.pil(),
                          settings=settings)
    result, inversion = run(pipe, request, inversions.get(method.inversion) if chosen.inverts else None,
                            disable_progress=True)
    if chosen.inverts:
        inversions[method.inversion] = inversion
        nfe = inversion.nfe + steps * (2 if method.edit_method == "pix2pix-zero" else 1)
    elif method.edit_method == "sdedit":
        from dit4edit.editing_methods import SDEDIT_STRENGTH

        nfe = steps - min(steps - 1, round(steps * (1.0 - SDEDIT_STRENGTH)))
    else:
        nfe = steps
    return result.images[0], nfe


def run_generation(pipe, out_dir: str | os.PathLike, count: int = 200, steps: int = GENERATION_STEPS,
                   guidance: float = 4.5, grid_items: int = 8, disable_progress: bool = False) -> dict:
    """Run (or resume) the generation check: generate an image for each of `count` held-out captions (seed = its
    index) and read it back with the oracle; returns the summary (also in generation.json)."""
    import torch

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = held_out_scenes(count)
    with ResultLog(out / "generation.jsonl", ("scene",), run_settings(pipe, steps, guidance)) as log:
        for k in tqdm([k for k in range(count) if (k,) not in log.done], desc="generation check",
                      disable=disable_progress):
            scene = scenes[k]
            start = time.perf_counter()
            image, _ = pipe.generate(scene.caption, scene.height, scene.width, steps, guidance,
                                     generator=torch.Generator().manual_seed(k), disable_progress=True)
            seconds = time.perf_counter() - start
            if k < grid_items:
                image.save(out / "images" / f"generated-{k:04d}.png")
            report = world.oracle(image)
            log.write(dict(scene=k, size=_size(scene), caption=scene.caption, seen=_seen(report), seconds=seconds,
                           hits=world.caption_hits(report, scene)))
    summary = dict(steps=steps, guidance=guidance, **summarise_generation(log.rows((k,) for k in range(count))))
    (out / "generation.json").write_text(json.dumps(summary, indent=1))
    write_summary(out)
    make_generation_grid(scenes[:grid_items], out)
    return summary


def run_reconstruction(pipe, out_dir: str | os.PathLike, count: int = 20,
                       methods: Sequence[str] = RECONSTRUCTION_METHODS, steps: int = 30, guidance: float = 4.5,
                       disable_progress: bool = False) -> dict:
    """Run (or resume) the reconstruction check: invert each of `count` held-out scenes under its caption with each
    inversion method and regenerate it; returns the summary (also in reconstruction.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(methods)
    check_known(methods, RECONSTRUCTION_METHODS, "inversion method")
    scenes = held_out_scenes(count)
    with ResultLog(out / "reconstruction.jsonl", ("scene", "method"), run_settings(pipe, steps, guidance)) as log:
        todo = [(k, m) for k in range(count) for m in methods if (k, m) not in log.done]
        for k, method in tqdm(todo, desc="reconstruction", disable=disable_progress):
            scene = scenes[k]
            start = time.perf_counter()
            _, stats = pipe.reconstruct(scene.pil(), scene.caption, steps, guidance, method, disable_progress=True)
            log.write(dict(scene=k, size=_size(scene), caption=scene.caption, **stats,
                           seconds=time.perf_counter() - start))
    rows = log.rows((k, m) for k in range(count) for m in methods)
    summary = dict(steps=steps, guidance=guidance, **summarise_reconstruction(rows, methods))
    (out / "reconstruction.json").write_text(json.dumps(summary, indent=1))
    write_summary(out)
    return summary


def run_settings(pipe, steps: int, guidance: float, **extra) -> dict:
    """What a result depends on besides its item: steps, guidance, the model (its folder or hub id, and a probe of
    its weights, so new weights saved into the same folder do not resume old rows) and `extra`."""
    model = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    record = pipe.model_record() if hasattr(pipe, "model_record") else {}
    return dict(steps=steps, guidance=guidance, model=str(model or ""), weights=record.get("probe"), **extra)


def check_known(names: Sequence[str], available, what: str) -> None:
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DiT4EditError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(available)}")


def _size(scene) -> str:
    return f"{scene.width}x{scene.height}"


def _seen(report) -> str:
    """The oracle's reading in caption words, e.g. "small red striped circle and large blue star on white"."""
    objects = " and ".join(" ".join(w for w in (o.size, o.colour, o.pattern, o.shape) if w) for o in report.objects)
    return f"{objects or 'nothing'} on {report.background}"


# --- summaries -------------------------------------------------------------------------------------------------


def _mean(values) -> float:
    """Mean of the finite values (nan if none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(rows: list[dict], names: Sequence[str]) -> dict:
    """{method: {category or "all": {metric: mean}}}."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["kind"])].append(row)
        groups[(row["method"], "all")].append(row)
    summary = {}
    for (method, kind), group in groups.items():
        summary.setdefault(method, {})[kind] = dict(
            n=len(group), **{key: _mean(r[key] for r in group)
                             for key in ("psnr", "ssim", "background_psnr", "success", "seconds")},
            nfe=_mean(r["nfe"] for r in group if r.get("nfe") is not None),
            inversion_seconds=_mean(r["inversion_seconds"] for r in group if r.get("inversion_seconds") is not None))
    return {name: summary[name] for name in names if name in summary}


def summarise_generation(rows: list[dict]) -> dict:
    """Accuracy of each `synthetic.HIT_KEYS` entry over all its items (a caption's background and count, each caption
    object's attributes), overall and per canvas; None where there was nothing to score (no sizes named)."""
    hits = {key: [] for key in world.HIT_KEYS}
    by_canvas = defaultdict(lambda: {key: [] for key in world.HIT_KEYS})
    for row in rows:
        for key, value in row["hits"].items():
            values = value if isinstance(value, list) else [value]
            hits[key] += values
            by_canvas[row["size"]][key] += values
    rate = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    return dict(n=len(rows), accuracy={key: rate(v) for key, v in hits.items()},
                items={key: len(v) for key, v in hits.items()},
                accuracy_by_canvas={size: {key: rate(v) for key, v in by_canvas[size].items()}
                                    for size in sorted(by_canvas)},
                targets=GENERATION_TARGETS, seconds=_mean(r["seconds"] for r in rows))


def summarise_reconstruction(rows: list[dict], methods: Sequence[str]) -> dict:
    """{"methods": {method: means of latent NMSE, PSNR, VAE PSNR, their gap, NFE, seconds}, "target": ...}: the target
    is met when dpm-exact's PSNR is within RECONSTRUCTION_GAP_DB of the VAE round trip's."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["method"]].append(row)
    summary = {}
    for method in methods:
        group = groups.get(method)
        if group:
            summary[method] = dict(n=len(group), **{key: _mean(r[key] for r in group)
                                                    for key in ("latent_nmse", "psnr", "vae_psnr", "nfe", "seconds")})
            summary[method]["gap"] = _mean(r["vae_psnr"] - r["psnr"] for r in group)
    exact = summary.get("dpm-exact")
    target = dict(method="dpm-exact", max_gap_db=RECONSTRUCTION_GAP_DB,
                  met=None if exact is None else bool(exact["gap"] <= RECONSTRUCTION_GAP_DB))
    return dict(methods=summary, target=target)


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


def generation_table(summary: dict) -> str:
    canvases = list(summary["accuracy_by_canvas"])
    percent = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"{summary['n']} held-out captions, {summary['steps']} steps, guidance {summary['guidance']}, "
             f"{summary['seconds']:.2f} s / image. Oracle accuracy; colour, shape, pattern and size per caption "
             "object (objects matched left to right), `*_any`: found on any detected object.", "",
             "| attribute | accuracy | items | target | " + " | ".join(canvases) + " |",
             "|---|---|---|---|" + "---|" * len(canvases)]
    for key, value in summary["accuracy"].items():
        target = summary["targets"].get(key)
        verdict = "" if target is None or value is None else f"{100 * target:.0f}% " + ("met" if value >= target
                                                                                      else "missed")
        by_canvas = " | ".join(percent(summary["accuracy_by_canvas"][c].get(key)) for c in canvases)
        lines.append(f"| {key} | {percent(value)} | {summary['items'][key]} | {verdict} | {by_canvas} |")
    return "\n".join(lines) + "\n"


def reconstruction_table(summary: dict) -> str:
    lines = [f"Held-out scenes, {summary['steps']} steps, guidance {summary['guidance']}: invert, then regenerate "
             "with the matching sampler. Gap = VAE-only PSNR minus PSNR.", "",
             "| inversion | n | latent NMSE | PSNR vs input | VAE-only PSNR | gap | NFE | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for method, m in summary["methods"].items():
        lines.append(f"| {method} | {m['n']} | {m['latent_nmse']:.2e} | {m['psnr']:.2f} | {m['vae_psnr']:.2f} | "
                     f"{m['gap']:.2f} | {m['nfe']:.0f} | {m['seconds']:.2f} |")
    target = summary["target"]
    if target["met"] is not None:
        lines += ["", f"Target ({target['method']} within {target['max_gap_db']:g} dB of the VAE round trip): "
                      + ("met." if target["met"] else "missed.")]
    return "\n".join(lines) + "\n"


#: What each part writes in the results folder (all of them also write their section of summary.md).
SECTION_FILES = {
    "editing": ("results.jsonl", "summary.json", "grid.png"),
    "generation": ("generation.jsonl", "generation.json", "generation.png"),
    "reconstruction": ("reconstruction.jsonl", "reconstruction.json"),
}
#: summary.md's sections: (heading, the section's summary file, its markdown).
MARKDOWN_SECTIONS = {
    "editing": ("Editing", "summary.json", lambda summary: summary_table(summary, list(summary))),
    "generation": ("Generation check", "generation.json", generation_table),
    "reconstruction": ("Reconstruction", "reconstruction.json", reconstruction_table),
}


def section_markdown(out: str | os.PathLike, section: str) -> str:
    """One section of summary.md from its summary file in `out` ("" when that part has not run there)."""
    heading, filename, table = MARKDOWN_SECTIONS[section]
    path = Path(out) / filename
    return f"## {heading}\n\n{table(json.loads(path.read_text()))}" if path.exists() else ""


def write_summary(out: Path) -> None:
    """summary.md: a section for each part whose results are in `out`."""
    sections = [section_markdown(out, section) for section in SECTIONS]
    (out / "summary.md").write_text("\n".join(s for s in sections if s))


def make_grid(pairs, names: Sequence[str], out: Path) -> None:
    """input | ground truth | each method, one row per pair, from the saved outputs."""
    from dit4edit.pictures import grid

    tiles = []
    for k, pair in enumerate(pairs):
        row = [("input", pair.source.pil()), ("truth", pair.target.pil())]
        for name in names:
            path = out / "images" / f"{k:04d}-{name}.png"
            row.append((name, Image.open(path).convert("RGB") if path.exists() else Image.new("RGB", (8, 8))))
        tiles.extend(row)
    if tiles:
        imgs.save_image(grid(tiles, columns=2 + len(names)), out / "grid.png")


def make_generation_grid(scenes, out: Path) -> None:
    """Each caption's ground-truth scene next to the image generated for it, from the saved outputs."""
    from dit4edit.pictures import grid

    tiles = []
    for k, scene in enumerate(scenes):
        path = out / "images" / f"generated-{k:04d}.png"
        if path.exists():
            tiles += [(scene.caption, scene.pil()), ("generated", Image.open(path).convert("RGB"))]
    if tiles:
        imgs.save_image(grid(tiles, columns=8), out / "generation.png")


# --- command line ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from dit4edit.cli import common

    parser = argparse.ArgumentParser(prog="dit4edit-bench", description=__doc__.split("\n", 1)[0])
    parser.add_argument("-o", "--output", default="bench-synthetic", help="results folder (resumes if it exists)")
    parser.add_argument("--sections", default="editing",
                        help="comma-separated: editing, generation, reconstruction (default: editing)")
    parser.add_argument("--pairs", type=int, default=200, help="editing: held-out (scene, edit) pairs (default 200)")
    parser.add_argument("--methods", default=None,
                        help="editing: comma-separated subset of the methods (default: all)")
    parser.add_argument("--inversion", default=None, choices=list(INVERSION_METHODS),
                        help="editing: inversion for the methods that default to dpm-exact")
    parser.add_argument("--generation-n", type=int, default=200, help="generation: held-out captions (default 200)")
    parser.add_argument("--generation-steps", type=int, default=GENERATION_STEPS,
                        help=f"generation: sampling steps (default {GENERATION_STEPS})")
    parser.add_argument("--reconstruction-n", type=int, default=20,
                        help="reconstruction: held-out scenes (default 20)")
    parser.add_argument("--reconstruction-methods", default=None,
                        help="reconstruction: comma-separated inversion methods (default: all)")
    common(parser, image=False)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the sections `args` asks for; every flag is checked before the model loads."""
    from dit4edit.cli import _model
    from dit4edit.loading import load_pipeline

    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown or not sections:
        raise DiT4EditError(f"--sections takes a comma-separated subset of {', '.join(SECTIONS)}, "
                            f"got {args.sections!r}")
    for flag, value in (("--pairs", args.pairs), ("--generation-n", args.generation_n),
                        ("--generation-steps", args.generation_steps), ("--reconstruction-n", args.reconstruction_n)):
        if value < 1:
            raise DiT4EditError(f"{flag} must be >= 1, got {value}")
    methods = args.reconstruction_methods.split(",") if args.reconstruction_methods else RECONSTRUCTION_METHODS
    check_known(methods, RECONSTRUCTION_METHODS, "inversion method")
    if args.methods:
        check_known(args.methods.split(","), default_methods(), "method")
    pipe = load_pipeline(args, model=_model(args))  # the --model folder, checked, as every command loads it
    # --steps / --guidance default to the model's settings (its dit4edit.json), else the library's
    steps = args.steps or pipe.defaults.num_inference_steps
    guidance = pipe.defaults.guidance_scale if args.guidance is None else args.guidance
    if "editing" in sections:
        run_editing(pipe, args.output, args.pairs, args.methods.split(",") if args.methods else None,
                    steps, guidance, disable_progress=args.quiet, inversion=args.inversion)
    if "generation" in sections:
        run_generation(pipe, args.output, args.generation_n, args.generation_steps, guidance,
                       disable_progress=args.quiet)
    if "reconstruction" in sections:
        run_reconstruction(pipe, args.output, args.reconstruction_n, methods, steps, guidance,
                           disable_progress=args.quiet)
    print("\n".join(section_markdown(args.output, name) for name in SECTIONS if name in sections), end="")
    files = [name for section in sections for name in SECTION_FILES[section]]
    if not args.quiet:
        print(f"results in {args.output}/ ({', '.join(['summary.md', *files])})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dit4edit-bench` / `python -m dit4edit_research.bench_synthetic`: a bad flag is one line on stderr, exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dit4edit-bench: %(message)s")
    try:
        return run(args)
    except DiT4EditError as error:
        print(f"dit4edit-bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
