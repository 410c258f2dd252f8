"""PIE-Bench (PnPInversion, ECCV 2024): edit every image of the benchmark and score it as the published evaluation
does, with per-type and overall tables.

The data set is read as distributed: `DIR/mapping_file.json` (keyed by a 12-digit id; `image_path`,
`original_prompt`, `editing_prompt` with the edited words in `[ ]`, `editing_instruction`, `editing_type_id`
"0".."9", `blended_word`, `mask` as run-length pairs) and the images under `DIR/annotation_images/`. Each edited image
is saved under the output folder at `annotation_images/<image_path>` (same name and format, as the reference runners
save them, so other tools can score the outputs: a `.jpg` name is JPEG at Pillow's default quality, as there), and
scored from the file as saved. It is a batch
(`dit4edit.batch`): resumable, and split across processes under `accelerate launch` / `torchrun`.
"""

from __future__ import annotations

import csv
import os
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import checks
from . import images as imgs
from . import metrics as m
from .batch import Job, make_job, write_atomic
from .request import EditRequest, Settings
from .errors import DiT4EditError

TYPE_NAMES = {
    "0": "random", "1": "change object", "2": "add object", "3": "delete object", "4": "change content",
    "5": "change pose", "6": "change color", "7": "change material", "8": "change background", "9": "change style",
}
METRICS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")
#: The papers' table scales: structure x10^3, LPIPS x10^3, MSE x10^4, SSIM x10^2.
SCALES = {"structure_distance": 1e3, "psnr": 1.0, "lpips": 1e3, "mse": 1e4, "ssim": 1e2, "clip_whole": 1.0,
          "clip_edited": 1.0}
HEADINGS = {"structure_distance": "structure x10^3", "psnr": "PSNR", "lpips": "LPIPS x10^3", "mse": "MSE x10^4",
            "ssim": "SSIM x10^2", "clip_whole": "CLIP whole", "clip_edited": "CLIP edited"}
#: The model each model-based metric needs.
METRIC_MODELS = {"structure_distance": "structure_distance", "lpips": "lpips", "clip_whole": "clip",
                 "clip_edited": "clip"}
MAPPING = "mapping_file.json"
IMAGES = "annotation_images"


def strip_brackets(prompt: str) -> str:
    """The prompt without the `[ ]` that mark the edited words."""
    return prompt.replace("[", "").replace("]", "")


def blend_words(blended_word: str) -> tuple[str, ...]:
    """Local-blend words from `blended_word` ("source_word target_word"); as the reference P2P runs, only an entry
    of exactly two words blends."""
    words = blended_word.split(" ") if blended_word else []
    return tuple(words) if len(words) == 2 and all(words) else ()


def read_mapping(data: str | os.PathLike) -> dict:
    data = Path(data)
    path = data / MAPPING
    if not data.is_dir():
        raise DiT4EditError(f"PIE-Bench folder not found: {data}")
    if not path.is_file():
        raise DiT4EditError(f"{data} has no {MAPPING}: not PIE-Bench as distributed")
    try:
        mapping = checks.load_json(path.read_text(encoding="utf-8-sig"), str(path))
    except (OSError, UnicodeDecodeError) as error:
        raise DiT4EditError(f"cannot read {path} ({type(error).__name__})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise DiT4EditError(f"{path} holds no entries (expected an object keyed by image id)")
    return mapping


def read_benchmark(data: str | os.PathLike, settings: Settings = Settings(), types: Sequence[str] | None = None,
                   limit: int | None = None, local_blend: bool = False, out: str | os.PathLike | None = None,
                   defaults=None, num_blocks: int | None = None) -> list[Job]:
    """One job per benchmark entry (in id order), of the `types` asked for, at most `limit`, each an
    `EditRequest` with `settings`. With `local_blend` each entry's `blended_word` becomes the local-blend words of
    its edit. An entry that cannot run (missing or mistyped fields, a mask that does not decode, an image path
    another entry already writes) becomes a job with its `error` set, before any edit runs."""
    data = Path(data)
    mapping = read_mapping(data)
    jobs, claimed = [], set()
    for line, key in enumerate(sorted(mapping), start=1):
        entry = mapping[key] if isinstance(mapping[key], dict) else {}
        type_id = str(entry.get("editing_type_id"))
        if types is not None and type_id not in types:
            continue
        job = _job(data, key, line, entry, type_id, settings, local_blend, out, defaults, num_blocks)
        if job.error is None and job.outputs[0] in claimed:
            job = replace(job, error=f"entry {key} writes {job.outputs[0]}, as an earlier entry does")
        claimed.update(job.outputs)
        jobs.append(job)
        if limit is not None and len(jobs) >= limit:
            break
    return jobs


def _job(data: Path, key: str, line: int, entry: dict, type_id: str, settings: Settings, local_blend: bool,
         out, defaults, num_blocks) -> Job:
    fields = {"id": key, "editing_type_id": type_id}
    wrong = [name for name in ("image_path", "original_prompt", "editing_prompt") if not isinstance(entry.get(name), str)]
    image_path = entry.get("image_path") if isinstance(entry.get("image_path"), str) else ""
    try:
        if wrong:
            raise DiT4EditError(f"entry {key}: {', '.join(wrong)} missing or not text")
        if ".." in Path(image_path).parts or Path(image_path).is_absolute() or not image_path:
            raise DiT4EditError(f"entry {key} has a bad image_path")
        with Image.open(data / IMAGES / image_path) as image:  # the header only: the mask is decoded at its size
            size = image.size
        m.decode_mask(entry.get("mask"), (size[1], size[0]))  # scored after the edit: a bad mask fails it now
        if Path(image_path).suffix.lower() not in imgs.OUTPUT_FORMATS:
            raise DiT4EditError(f"entry {key}: cannot write an image named {Path(image_path).name}")
        words = blend_words(entry.get("blended_word") if isinstance(entry.get("blended_word"), str) else "")
        if local_blend and words and settings.control is not None:
            settings = settings.with_options({"local_blend": words})
    except (DiT4EditError, ValueError, TypeError, OSError) as error:
        return Job(item=key, line=line, error=f"entry {key}: {error}" if not isinstance(error, DiT4EditError)
                   else str(error), fields=fields)
    request = EditRequest(targets=(strip_brackets(entry["editing_prompt"]),),
                          source=strip_brackets(entry["original_prompt"]), image=str(data / IMAGES / image_path),
                          settings=settings)
    output = f"{IMAGES}/{image_path}"
    job = make_job(key, line, request, [str(Path(out) / output) if out is not None else output], defaults,
                   num_blocks, fields=fields)
    return replace(job, outputs=(output,)) if job.error is None else job


def describe(model: str, settings, local_blend: bool) -> list[str]:
    """What a benchmark run ran with (the summary's header): the model and the resolved settings of its rows."""
    control = settings.control
    return [f"model: {model}",
            f"settings: steps {settings.steps}, guidance {settings.guidance:g}, inversion {settings.inversion}, "
            f"attention control {'off' if control is None else control}, "
            f"merging {'off' if settings.merge is None else settings.merge}"
            f"{', local blend from blended_word' if local_blend else ''}"]


# --- scoring ---------------------------------------------------------------------------------------------------


class Scorer:
    """Scores each edited image as the benchmark's evaluation does; models load on first use (`load`)."""

    def __init__(self, data: str | os.PathLike, out: str | os.PathLike, names: Sequence[str] = METRICS,
                 clip_model: str = m.CLIP_MODEL, dino_model: str = m.DINO_MODEL, device="cpu", device_name: str = "",
                 say: Callable[[str], None] = lambda line: None):
        self.mapping = read_mapping(data)
        self.out, self.names, self.device = Path(out), tuple(names), device
        self.clip_model, self.dino_model, self.device_name, self.say = clip_model, dino_model, device_name, say
        self.models: dict | None = None
        self.skipped: dict[str, str] = {}

    def load(self) -> None:
        """Load the metric models asked for; a model that cannot load is skipped with one line said.

        Whether the hub can serve the models named by hub id is decided once, before any loads (`m.hub_offline`);
        without it they load from the local cache only, so a missing model costs its one line, not minutes of
        retries."""
        if self.models is not None:
            return
        wanted = tuple(dict.fromkeys(METRIC_MODELS[name] for name in self.names if name in METRIC_MODELS))
        hub_names = {"structure_distance": self.dino_model, "clip": self.clip_model}
        from_hub = [hub_names[model] for model in wanted if model in hub_names and not Path(hub_names[model]).is_dir()]
        offline = m.hub_offline() if from_hub else None
        local = {"local_files_only": offline is not None}
        loaders = {"structure_distance": (m.StructureDistance.from_pretrained, (self.dino_model, self.device), local),
                   "lpips": (m.Lpips, (self.device,), {}),
                   "clip": (m.ClipScore.from_pretrained, (self.clip_model, self.device), local)}
        self.models = {}
        for model in wanted:
            loader, args, kwargs = loaders[model]
            loaded, reason = m.load_metric(loader, *args, **kwargs)
            if loaded is None:
                if offline is not None and model in hub_names:
                    reason = f"{reason} [hub not used: {offline}]"
                self.skipped[model] = reason
                self.say(f"{model} metric skipped (model not available: {reason})")
            self.models[model] = loaded

    def __call__(self, job: Job, k: int, edited: Image.Image) -> dict:
        self.load()
        start = time.perf_counter()
        source = imgs.load_image(job.request.image)
        edited = Image.open(self.out / job.outputs[k]).convert("RGB")  # as saved: what other tools will score
        mask = m.decode_mask(self.mapping[job.item]["mask"], (source.size[1], source.size[0]))
        scores = self.score(source, edited, mask, job.targets[k])
        return {**scores, "metric_seconds": round(time.perf_counter() - start, 4), "device": self.device_name}

    def score(self, source: Image.Image, edited: Image.Image, mask: np.ndarray, prompt: str) -> dict:
        """The metrics asked for (and available) of one edit; NaN (stored as null) where the protocol has none:
        the unedited-part metrics when the mask covers everything, `clip_edited` when it covers nothing."""
        if edited.size != source.size:
            raise DiT4EditError(f"edited image is {edited.size}, the source {source.size}")
        src, tgt = m.to_unit(source), m.to_unit(edited)
        keep_none, edit_none = (1 - mask).sum() == 0, mask.sum() == 0
        src_kept, tgt_kept = m.unedited(src, mask), m.unedited(tgt, mask)
        models = self.models or {}
        compute = {
            "structure_distance": lambda: models["structure_distance"](source, edited),
            "psnr": lambda: math.nan if keep_none else m.psnr(tgt_kept, src_kept),
            "lpips": lambda: math.nan if keep_none else models["lpips"](tgt_kept, src_kept),
            "mse": lambda: math.nan if keep_none else m.mse(tgt_kept, src_kept),
            "ssim": lambda: math.nan if keep_none else m.ssim(tgt_kept, src_kept),
            "clip_whole": lambda: models["clip"](edited, prompt),
            "clip_edited": lambda: math.nan if edit_none else models["clip"](m.masked_uint8(edited, mask), prompt),
        }
        row = {}
        for name in self.names:
            if name in METRIC_MODELS and models.get(METRIC_MODELS[name]) is None:
                continue
            value = float(compute[name]())
            row[name] = None if math.isnan(value) else value
        return row


# --- tables ----------------------------------------------------------------------------------------------------


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Per-type rows then "all": images scored, failures, per metric the mean at the papers' scale over the rows
    that have a value (NaN rows excluded and counted), and mean seconds per image (edit, metrics)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get("editing_type_id")), []).append(row)
    ordered = sorted(groups, key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))
    return [_summary(t, groups[t]) for t in ordered] + [_summary("all", list(rows))]


def _summary(type_id: str, rows: list[dict]) -> dict:
    ok = [row for row in rows if row.get("status") == "ok"]
    entry = {"type": type_id, "name": TYPE_NAMES.get(type_id, "all" if type_id == "all" else "?"),
             "images": len(ok), "failed": len(rows) - len(ok)}
    for name in METRICS:
        present = [row[name] for row in ok if name in row]
        values = [value for value in present if value is not None]
        entry[name] = float(np.mean(values)) * SCALES[name] if values else None
        entry[f"{name}_nan"] = len(present) - len(values)
    for name in ("seconds", "metric_seconds"):
        values = [row[name] for row in ok if row.get(name) is not None]
        entry[name] = float(np.mean(values)) if values else None
    return entry


def _cell(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(summary: Sequence[dict]) -> str:
    shown = [name for name in METRICS if any(entry[name] is not None for entry in summary)]
    head = ["type", "name", "images", "failed", *[HEADINGS[name] for name in shown], "NaN excluded",
            "s / image (edit)", "s / image (metrics)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary:
        nan = ", ".join(f"{name} {entry[name + '_nan']}" for name in shown if entry[name + "_nan"]) or "0"
        cells = [entry["type"], entry["name"], str(entry["images"]), str(entry["failed"]),
                 *[_cell(entry[name]) for name in shown], nan, _cell(entry["seconds"]),
                 _cell(entry["metric_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(summary: Sequence[dict]) -> str:
    columns = ["type", "name", "images", "failed", *[c for n in METRICS for c in (n, f"{n}_nan")], "seconds",
               "metric_seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for entry in summary:
        writer.writerow({c: "" if entry[c] is None else entry[c] for c in columns})
    return buffer.getvalue()


def write_tables(out: str | os.PathLike, rows: Sequence[dict], about: Sequence[str] = ()) -> str:
    """`summary.md` (what ran, then the table) and `summary.csv` in `out`; returns the markdown."""
    out = Path(out)
    summary = summarise(rows)
    evaluated = [entry["type"] for entry in summary[:-1] if entry["images"]]
    devices = sorted({row["device"] for row in rows if row.get("device")})
    missing = [HEADINGS[name] for name in METRICS if summary[-1][name] is None]
    header = [
        "# PIE-Bench results",
        "",
        *[f"- {line}" for line in about],
        f"- types evaluated: {len(evaluated)} of 10 ({', '.join(evaluated) or 'none'})",
        f"- device: {', '.join(devices) or 'unknown'}",
        "- metrics on the unedited part (PSNR, LPIPS, MSE, SSIM) use both images multiplied by (1 - mask); "
        "scales: structure x10^3, LPIPS x10^3, MSE x10^4, SSIM x10^2; NaN rows are excluded per metric and counted",
        f"- not computed: {', '.join(missing)}" if missing else "- every metric computed",
        "",
        "",
    ]
    text = "\n".join(header) + markdown_table(summary) + "\n"
    write_atomic(out / "summary.md", text)
    write_atomic(out / "summary.csv", csv_table(summary))
    return text
