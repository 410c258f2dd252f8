"""Batch editing: many images, each inverted once and edited towards one or more targets, resumable and split
across processes.

A batch is a list of `Job`s (read from a JSONL spec by `read_spec`, or built by another harness). `run_jobs` edits
them and records one row per output in `results.jsonl`:

- **resumable**: every finished item is recorded in the process's results shard (`shards/results-RANK.jsonl`),
  rewritten atomically (temporary file, fsync, rename), so a kill at any point (`kill -9` included) leaves neither
  a cut line nor a partial image (images are written atomically too); a rerun skips what is recorded and redoes the
  rest. Failed items are recorded and not retried unless asked (`retry_failed`).
- **many processes**: under `accelerate launch` or `torchrun`, `accelerate.PartialState` gives each process its
  share of the pending items (`split_between_processes`) and its own device; each writes only its own shard; the
  main process merges the shards into `results.jsonl` at the end.
- **robust**: an item that cannot run (missing image, empty prompt, bad setting) is recorded as failed with a
  one-line reason and the batch goes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from tqdm.auto import tqdm

from . import images as imgs
from .defaults import DEFAULTS
from .errors import DiT4EditError

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SHARDS = "shards"
#: Item fields of a spec line that are not edit settings.
ITEM_FIELDS = ("id", "image", "source", "targets")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class EditSettings:
    """Everything one edit runs with (the `dit4edit edit` options); `control` / `merge` None = off."""

    steps: int = DEFAULTS.steps
    guidance: float = DEFAULTS.guidance
    inversion: str = DEFAULTS.inversion
    tol: float = DEFAULTS.tol
    max_pixels: int = imgs.MAX_PIXELS
    pin_source: bool = True
    direct_inversion: bool = False  # the target takes the pinned source's error of each step
    control: object | None = None  # AttentionControl
    merge: object | None = None  # MergeConfig
    mask: str | None = None  # mask image, white = editable


@dataclass(frozen=True)
class Job:
    """One item: an image, its source prompt and targets, where each target's output goes (relative to the output
    folder), and the settings; `error` says why the item cannot run (it is then recorded as failed)."""

    item: str
    line: int
    image: Path | None = None
    source: str = ""
    targets: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    settings: EditSettings | None = None
    error: str | None = None
    fields: dict = field(default_factory=dict)  # copied into every row (e.g. a benchmark's category)


#: (job, target index, edited image) -> extra row fields, e.g. metrics. Runs after the image is saved.
Scorer = Callable[[Job, int, object], dict]


# --- the spec --------------------------------------------------------------------------------------------------


def read_spec(path: str | os.PathLike, resolve: Callable[[dict], EditSettings], suffix: str = ".png") -> list[Job]:
    """Jobs from a JSONL spec, one JSON object a line: `image`, `source`, `targets` (a list, or one string),
    optional `id` (default: the line number), and any edit setting by its option name (`steps`, `guidance`,
    `mask`, `local_blend`, `self_replace_steps`, `no_merge`, ...), which `resolve` turns into `EditSettings`.
    Relative paths are relative to the spec's folder. Outputs are `ID-K.png` for target K (from 0). A line that
    is not a valid item becomes a job with its `error` set; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DiT4EditError(f"batch spec not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DiT4EditError(f"cannot read batch spec {path}: {type(error).__name__}") from None
    jobs, seen = [], set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        job = _job_from_line(text, number, path.parent, resolve, suffix)
        if job.item in seen:
            job = Job(item=f"{job.item}@line{number}", line=number, targets=job.targets,
                      error=f"duplicate item id {job.item!r} (line {number})")
        seen.add(job.item)
        jobs.append(job)
    if not jobs:
        raise DiT4EditError(f"batch spec {path} has no items")
    return jobs


def _job_from_line(text: str, number: int, base: Path, resolve, suffix: str) -> Job:
    default_id = f"{number:05d}"
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        return Job(item=default_id, line=number, error=f"line {number} is not JSON ({error.msg})")
    if not isinstance(entry, dict):
        return Job(item=default_id, line=number, error=f"line {number} is not a JSON object")
    item = str(entry.get("id", default_id))
    targets = entry.get("targets", ())
    targets = (targets,) if isinstance(targets, str) else tuple(targets) if isinstance(targets, list) else ()
    job = Job(item=item if _ID.match(item) else default_id, line=number, targets=targets)
    try:
        if not _ID.match(item):
            raise DiT4EditError(f"id {item!r} may hold only letters, digits, '.', '_' and '-'")
        if not targets or not all(isinstance(t, str) for t in targets):
            raise DiT4EditError("'targets' must be a prompt or a non-empty list of prompts")
        for name in ("image", "source"):
            if not isinstance(entry.get(name), str):
                raise DiT4EditError(f"'{name}' is missing or not a string")
        overrides = {key: value for key, value in entry.items() if key not in ITEM_FIELDS}
        if isinstance(overrides.get("mask"), str):
            overrides["mask"] = str(base / overrides["mask"])
        settings = resolve(overrides)
    except DiT4EditError as error:
        return Job(item=job.item, line=number, targets=targets or ("",), error=str(error))
    return Job(item=item, line=number, image=base / entry["image"], source=entry["source"], targets=targets,
               outputs=tuple(f"{item}-{k}{suffix}" for k in range(len(targets))), settings=settings)


# --- results ---------------------------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (`images.atomic_path`), flushed to disk before it replaces the old one."""
    path = Path(path)
    with imgs.atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file (none if it is missing); lines that are not JSON objects are skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "item" in row:
            rows.append(row)
    return rows


def row_key(row: dict) -> tuple:
    return (row["item"], row.get("target"))


def recorded(out: Path) -> dict[tuple, dict]:
    """Every row recorded under `out` (merged results and all shards), by (item, target); an ok row wins."""
    done: dict[tuple, dict] = {}
    for path in [out / RESULTS, *sorted((out / SHARDS).glob("results-*.jsonl"))]:
        for row in read_rows(path):
            key = row_key(row)
            if key not in done or row.get("status") == "ok":
                done[key] = row
    return done


class Shard:
    """One process's results file, rewritten atomically after each item: never a cut line."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = read_rows(path)

    def add(self, rows: Iterable[dict]) -> None:
        self.rows.extend(rows)
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))


def merge_results(out: Path, jobs: Sequence[Job]) -> list[dict]:
    """Write `results.jsonl`: one row per output of `jobs`, in spec order, from everything recorded."""
    done = recorded(out)
    rows = [done[key] for job in jobs for key in _keys(job) if key in done]
    write_atomic(out / RESULTS, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _keys(job: Job) -> list[tuple]:
    return [(job.item, k) for k in range(max(1, len(job.targets)))]


# --- running ---------------------------------------------------------------------------------------------------


class Processes:
    """The processes of this run as `accelerate` sees them (one, or those of `accelerate launch` / `torchrun`)."""

    def __init__(self, cpu: bool):
        from accelerate import PartialState

        # A long timeout: processes wait for each other at the end while the slowest finishes its last items.
        self.state = PartialState(cpu=cpu, timeout=timedelta(hours=24))

    @property
    def index(self) -> int:
        return self.state.process_index

    @property
    def count(self) -> int:
        return self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def device(self):
        """This process's device when several run, else None (the caller's choice stands)."""
        return self.state.device if self.count > 1 else None

    def wait(self) -> None:
        self.state.wait_for_everyone()

    def share(self, items: list) -> list:
        with self.state.split_between_processes(items) as mine:
            return list(mine)


def run_jobs(jobs: Sequence[Job], out: str | os.PathLike, load_pipe: Callable[[], object], processes: Processes,
             scorer: Scorer | None = None, retry_failed: bool = False, disable_progress: bool = False) -> list[dict]:
    """Edit the jobs not yet recorded under `out`, this process's share of them; returns the merged rows (main
    process) or this process's new rows. `load_pipe` is called once, only when there is work."""
    out = Path(out)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.rglob(".*.tmp"):  # left by a killed run; never a file a reader looks for
            stale.unlink(missing_ok=True)
    processes.wait()
    done = {key: row for key, row in recorded(out).items() if not (retry_failed and row.get("status") != "ok")}
    processes.wait()  # everyone has read what was done before anyone records more
    pending = [job for job in jobs if any(key not in done for key in _keys(job))]
    mine = processes.share(pending)
    shard = Shard(out / SHARDS / f"results-{processes.index:05d}.jsonl")
    pipe, new_rows = None, []
    bar = tqdm(mine, desc=f"items (process {processes.index})" if processes.count > 1 else "items",
               disable=disable_progress or not processes.is_main)
    for job in bar:
        if pipe is None and job.error is None:
            pipe = load_pipe()
        rows = run_job(pipe, job, out, done, scorer)
        shard.add(rows)
        new_rows.extend(rows)
    processes.wait()
    return merge_results(out, jobs) if processes.is_main else new_rows


def run_job(pipe, job: Job, out: Path, done: dict | None = None, scorer: Scorer | None = None) -> list[dict]:
    """Invert the job's image once, edit it towards each target not yet done, save each output, score it.
    Returns one row per target; problems with the item become failed rows, never exceptions."""
    done = done or {}
    todo = [k for k in range(max(1, len(job.targets))) if (job.item, k) not in done]
    if job.error is not None:
        return [_row(job, k, error=job.error) for k in todo]
    settings, rows, reasons = job.settings, {}, {}
    for k in todo:
        try:
            pipe.check_prompt(job.targets[k], "target prompt")
        except DiT4EditError as error:
            reasons[k] = str(error)
    runnable = [k for k in todo if k not in reasons]
    start = time.perf_counter()
    try:
        inversion = pipe.invert(job.image, job.source, settings.steps, settings.guidance, settings.inversion,
                                settings.tol, settings.max_pixels, disable_progress=True) if runnable else None
    except Exception as error:  # noqa: BLE001 - any failure of one item is recorded and the batch goes on
        reasons.update({k: _reason(error, job) for k in runnable})
        runnable = []
    share = (time.perf_counter() - start) / max(1, len(runnable))
    for k in runnable:
        start = time.perf_counter()
        try:
            result = pipe.edit(inversion, job.targets[k], guidance_scale=settings.guidance,
                               pin_source=settings.pin_source, control=settings.control, mask=settings.mask,
                               merge=settings.merge, direct_inversion=settings.direct_inversion,
                               disable_progress=True)
            imgs.save_image(result.images[0], out / job.outputs[k])
            seconds = share + time.perf_counter() - start
            scores = scorer(job, k, result.images[0]) if scorer else {}
        except Exception as error:  # noqa: BLE001
            reasons[k] = _reason(error, job)
            continue
        rows[k] = _row(job, k, seconds=seconds, **scores)
    for k, reason in reasons.items():
        rows[k] = _row(job, k, error=reason)
    return [rows[k] for k in todo]


def _row(job: Job, k: int, seconds: float | None = None, error: str | None = None, **extra) -> dict:
    row = dict(item=job.item, line=job.line, target=k,
               prompt=job.targets[k] if k < len(job.targets) else None,
               output=job.outputs[k] if error is None else None,
               status="failed" if error else "ok", error=error,
               seconds=None if seconds is None else round(seconds, 4))
    return {**row, **job.fields, **extra}


def _reason(error: BaseException, job: Job) -> str:
    if isinstance(error, DiT4EditError):
        return str(error)
    logger.warning("item %s failed: %s: %s", job.item, type(error).__name__, error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def summary_line(rows: Sequence[dict]) -> str:
    failed = sum(row.get("status") != "ok" for row in rows)
    return f"{len(rows)} outputs: {len(rows) - failed} ok, {failed} failed"
