"""Batch editing: many images, each inverted once and edited towards one or more targets, resumable and split
across processes.

A batch is a list of `Job`s, each an `EditRequest` (read from a JSONL spec by `read_spec`, or built by another
harness such as PIE-Bench). `run_jobs` runs them with `request.run`, the one function every surface uses, and
records one row per output in `results.jsonl`:

- **resumable**: every finished output is recorded at once in the process's results shard
  (`shards/results-RANK.jsonl`), rewritten atomically (temporary file, fsync, rename), so a kill at any point
  (`kill -9` included) leaves neither a cut line nor a partial image. A rerun skips an output only when its row's
  key matches (a digest of the model, the input image's and mask's bytes, the prompts and the resolved settings)
  and, for a success, its file is still there; everything else is redone. Failed outputs are not retried unless
  asked (`retry_failed`).
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
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from tqdm.auto import tqdm

from . import checks
from . import images as imgs
from .errors import DiT4EditError
from .request import EditRequest, Settings, resolve
from .request import run as run_request

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SHARDS = "shards"
#: Item fields of a spec line that are not edit settings.
ITEM_FIELDS = ("id", "image", "source", "targets")
_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


@dataclass(frozen=True)
class Job:
    """One item: its edit `request`, where each target's output goes (relative to the output folder) and each
    output's resume `keys`; `error` says why the item cannot run (it is then recorded as failed)."""

    item: str
    line: int
    request: EditRequest | None = None
    outputs: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    error: str | None = None
    fields: dict = field(default_factory=dict)  # copied into every row (e.g. a benchmark's category)

    @property
    def targets(self) -> tuple[str, ...]:
        return self.request.targets if self.request is not None else ("",)


#: (job, target index, edited image) -> extra row fields, e.g. metrics. Runs after the image is saved.
Scorer = Callable[[Job, int, object], dict]


def make_job(item: str, line: int, request: EditRequest, outputs: Sequence[str], defaults=None,
             num_blocks: int | None = None, protect: Sequence = (), fields: dict | None = None) -> Job:
    """A job for `request`, checked as far as no model is needed (prompts, settings, named words); a problem
    makes a failed job. An output that would replace one of its inputs (the image, the mask, `protect`) is refused.
    Each output's key digests what decides it (see `output_key`)."""
    fields = fields or {}
    try:
        request.check(targets=False)  # each target is checked when it runs: one bad target fails only itself
        resolved = resolve(request.settings, defaults, None, num_blocks)
        request.check_words(resolved.control, request.source)
        inputs = [request.image, resolved.mask, *protect]
        for output in outputs:
            imgs.check_output_path(output, *[p for p in inputs if isinstance(p, (str, os.PathLike))])
        keys = tuple(output_key(request, resolved, k) for k in range(len(request.targets)))
    except DiT4EditError as error:
        return Job(item=item, line=line, request=request, error=str(error), fields=fields)
    return Job(item=item, line=line, request=request, outputs=tuple(outputs), keys=keys, fields=fields)


def output_key(request: EditRequest, resolved, k: int) -> str:
    """A digest of what decides output `k` of `request`: the input image's and mask's bytes, the prompts and every
    resolved setting (the model's share comes from `run_key`)."""
    mask = resolved.mask
    parts = [_file_digest(request.image), _file_digest(mask) if mask is not None else None, request.source,
             request.targets[k], repr(replace(resolved, mask=None))]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _file_digest(path) -> str | None:
    if not isinstance(path, (str, os.PathLike)):
        return None if path is None else hashlib.sha256(path.tobytes()).hexdigest()
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return f"unreadable:{path}"  # the item will fail and say why; its key still differs from a readable one


def run_key(model: str, local: bool = False) -> str:
    """What identifies the model of a run for resuming: its name, and for a `local` folder the size and time of each
    weights and settings file in it (retrained or re-exported weights redo every output)."""
    parts = [str(model)]
    if local:
        folder = Path(model)
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in (".safetensors", ".json"):
                stat = path.stat()
                parts.append(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- the spec --------------------------------------------------------------------------------------------------


def read_spec(path: str | os.PathLike, settings: Settings = Settings(), out: str | os.PathLike | None = None,
              defaults=None, num_blocks: int | None = None, suffix: str = ".png") -> list[Job]:
    """Jobs from a JSONL spec, one JSON object a line: `image`, `source`, `targets` (a list, or one string),
    optional `id` (default: the line number), and any edit option by name (`steps`, `guidance`, `mask`,
    `local_blend`, `self_replace_steps`, `no_merge`, ...: `request.OPTIONS`) on top of `settings` (the command's).
    Relative paths are relative to the spec's folder. Outputs are `ID-K.png` for target K (from 0). A line that
    is not a valid item becomes a job with its `error` set; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DiT4EditError(f"batch spec not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DiT4EditError(f"cannot read batch spec {path}: {type(error).__name__}") from None
    if out is not None and (path.resolve() == (Path(out) / RESULTS).resolve()
                            or path.resolve().parent == (Path(out) / SHARDS).resolve()):
        raise DiT4EditError(f"the batch spec {checks.printable(str(path))} is where this batch records its results: "
                            "copy it elsewhere or choose another output folder")
    protect = [path, *((Path(out) / RESULTS,) if out is not None else ())]
    jobs, seen = [], set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        job = _job_from_line(text, number, path.parent, settings, suffix, out, defaults, num_blocks, protect)
        if job.item in seen:
            job = Job(item=f"{job.item}@line{number}", line=number, request=job.request,
                      error=f"duplicate item id {job.item!r} (line {number})")
        seen.add(job.item)
        jobs.append(job)
    if not jobs:
        raise DiT4EditError(f"batch spec {path} has no items")
    return jobs


def _job_from_line(text: str, number: int, base: Path, settings: Settings, suffix: str, out, defaults, num_blocks,
                   protect) -> Job:
    default_id = f"{number:05d}"
    try:
        entry = checks.load_json(text, f"line {number}")
    except DiT4EditError as error:
        return Job(item=default_id, line=number, error=str(error))
    if not isinstance(entry, dict):
        return Job(item=default_id, line=number, error=f"line {number} is not a JSON object")
    item = entry.get("id", default_id)
    try:
        if not isinstance(item, str) or not _ID.match(item):
            raise DiT4EditError(f"id {checks.printable(str(item))[:120]!r} must be 1-100 letters, digits, '.', '_' "
                                "or '-', starting with a letter or digit")
        targets = entry.get("targets")
        targets = (targets,) if isinstance(targets, str) else targets
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
            raise DiT4EditError("'targets' must be a prompt or a non-empty list of prompts")
        for name in ("image", "source"):
            if not isinstance(entry.get(name), str):
                raise DiT4EditError(f"'{name}' is missing or not a string")
        options = {key: value for key, value in entry.items() if key not in ITEM_FIELDS}
        if isinstance(options.get("mask"), str):
            options["mask"] = str(base / options["mask"])
        item_settings = settings.with_options(options, "setting")
    except DiT4EditError as error:
        return Job(item=item if isinstance(item, str) and _ID.match(item) else default_id, line=number,
                   error=str(error))
    request = EditRequest(targets=tuple(targets), source=entry["source"], image=str(base / entry["image"]),
                          settings=item_settings)
    outputs = [f"{item}-{k}{suffix}" for k in range(len(targets))]
    located = [str(Path(out) / o) for o in outputs] if out is not None else outputs
    job = make_job(item, number, request, located, defaults, num_blocks, protect)
    return replace(job, outputs=tuple(outputs)) if job.error is None else job


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
    """The rows of a JSONL file (none if it is missing); lines that are not rows of ours (a JSON object with a
    text `item` and an integer `target`) are skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = checks.load_json(line, "row")
        except DiT4EditError:
            continue
        if isinstance(row, dict) and isinstance(row.get("item"), str) and type(row.get("target")) is int:
            rows.append(row)
    return rows


def row_key(row: dict) -> tuple:
    return (row["item"], row["target"])


def recorded(out: Path) -> dict[tuple, dict]:
    """Every row recorded under `out` (merged results and all shards), by (item, target); an ok row wins."""
    done: dict[tuple, dict] = {}
    for path in [out / RESULTS, *sorted((out / SHARDS).glob("results-*.jsonl"))]:
        for row in read_rows(path):
            key = row_key(row)
            if key not in done or row.get("status") == "ok":
                done[key] = row
    return done


def still_done(row: dict | None, job: Job, k: int, out: Path, run: str) -> bool:
    """Whether a recorded row still stands for output `k` of `job`: made by this run's model (`run`) with the same
    key, and, for a success, its file still there."""
    if row is None or row.get("key") != _full_key(job, k, run):
        return False
    return row.get("status") != "ok" or (out / job.outputs[k]).is_file()


def _full_key(job: Job, k: int, run: str) -> str | None:
    return f"{run}:{job.keys[k]}" if job.keys else None


class Shard:
    """One process's results file, rewritten atomically after each output: never a cut line."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = read_rows(path)

    def add(self, rows: Iterable[dict]) -> None:
        self.rows.extend(rows)
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))


def merge_results(out: Path, jobs: Sequence[Job], run: str = "") -> list[dict]:
    """Write `results.jsonl`: one row per output of `jobs`, in spec order, from what still stands."""
    done = recorded(out)
    rows = []
    for job in jobs:
        for k in range(len(job.targets)):
            row = done.get((job.item, k))
            if row is not None and (job.error is not None or still_done(row, job, k, out, run)):
                rows.append(row)
    write_atomic(out / RESULTS, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


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
             scorer: Scorer | None = None, retry_failed: bool = False, disable_progress: bool = False,
             key: str = "") -> list[dict]:
    """Edit the outputs of `jobs` not yet done under `out` (see `still_done`; `key` identifies the model, see
    `run_key`), this process's share of them; returns the merged rows (main process) or this process's new rows.
    `load_pipe` is called once, only when there is work."""
    out = Path(out)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out, jobs)
    processes.wait()
    done = {k: row for k, row in recorded(out).items() if not (retry_failed and row.get("status") != "ok")}
    processes.wait()  # everyone has read what was done before anyone records more
    pending = [job for job in jobs if _todo(job, done, out, key)]
    mine = processes.share(pending)
    shard = Shard(out / SHARDS / f"results-{processes.index:05d}.jsonl")
    pipe, new_rows = None, []
    bar = tqdm(mine, desc=f"items (process {processes.index})" if processes.count > 1 else "items",
               disable=disable_progress or not processes.is_main)
    for job in bar:
        if pipe is None and job.error is None:
            pipe = load_pipe()
        for row in run_job(pipe, job, out, _todo(job, done, out, key), scorer, key):
            shard.add([row])  # each output recorded as soon as it is done
            new_rows.append(row)
    processes.wait()
    return merge_results(out, jobs, key) if processes.is_main else new_rows


def _todo(job: Job, done: dict, out: Path, run: str) -> list[int]:
    return [k for k in range(len(job.targets)) if not still_done(done.get((job.item, k)), job, k, out, run)]


def _remove_stale_temporaries(out: Path, jobs: Sequence[Job]) -> None:
    """Temporary files a killed run left in the folders this run writes to (named as `images.atomic_path` names
    them: `images.is_temp_file`); nothing else under `out`, and nothing in folders of no output of this run."""
    folders = {out, out / SHARDS, *((out / o).parent for job in jobs for o in job.outputs)}
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and imgs.is_temp_file(path):
                    path.unlink(missing_ok=True)


def run_job(pipe, job: Job, out: Path, todo: Sequence[int] | None = None, scorer: Scorer | None = None,
            run: str = "") -> Iterator[dict]:
    """Edit the job's image towards each target in `todo` (default all), inverting it once; save each output, score
    it, and yield its row as soon as it is done. Problems become failed rows, never exceptions."""
    todo = range(len(job.targets)) if todo is None else todo
    inversion = None
    for k in todo:
        if job.error is not None:
            yield _row(job, k, run, error=job.error)
            continue
        start = time.perf_counter()
        saved = None
        try:
            result, inversion = run_request(pipe, job.request, inversion=inversion, targets=[k], disable_progress=True)
            saved = imgs.save_image(result.images[0], out / job.outputs[k])
            seconds = time.perf_counter() - start
            scores = scorer(job, k, result.images[0]) if scorer else {}
        except Exception as error:  # noqa: BLE001 - any failure of one output is recorded and the batch goes on
            if saved is not None:  # a failed row leaves no image that looks like a result
                Path(saved).unlink(missing_ok=True)
            yield _row(job, k, run, error=_reason(error, job))
            continue
        yield _row(job, k, run, seconds=seconds, **scores)


def _row(job: Job, k: int, run: str = "", seconds: float | None = None, error: str | None = None, **extra) -> dict:
    row = dict(item=job.item, line=job.line, target=k, key=_full_key(job, k, run),
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


