"""The `dit4edit` command line: argparse -> `EditRequest` -> `request.run`; `main(argv)` returns the exit code.

Every problem with the user's input is one line on stderr and exit code 2, checked before the model loads; nothing
is written on failure. A bug is one "internal error" line (exit 1) unless `--debug` asks for the traceback. `batch`
and `pie-bench` finish every item they can and exit 3 when any item failed (`results.jsonl` says why).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

# Modules that import torch (the pipeline, pictures, PIE-Bench's metrics, the web app, loading) are imported inside
# the commands that need them: every flag and file is checked before torch loads.
from . import __version__, batch, checks
from . import images as imgs
from .defaults import DEFAULTS
from .editing_methods import EDIT_METHODS
from .errors import DiT4EditError
from .methods import EDIT_MODES, INVERSION_METHODS
from .loading import OFFLOAD, check_offload, cpu_only, device_for, device_name, load_pipeline
from .model_folder import ModelDefaults, check_folder, default_model, local_folder
from .request import MAX_PIXELS, OPTIONS, EditRequest, Settings, parse_range, prepare, resolve, run

EXIT_USAGE = 2
#: `batch` and `pie-bench`: the run finished, but at least one item failed (each failure is in results.jsonl).
EXIT_ITEMS_FAILED = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: keep them one line too
        self.exit(EXIT_USAGE, f"dit4edit: error: {checks.printable(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dit4edit", description="Training-free text-guided image editing with diffusion "
                     "transformers (DiT4Edit).")
    parser.add_argument("--version", action="version", version=f"dit4edit {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any failure")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    edit = commands.add_parser("edit", help="edit an image: invert with the source prompt, denoise with the target")
    edit.add_argument("input", help="input image, or an inversion saved with --save-inversion (.safetensors)")
    edit.add_argument("-s", "--source", help="prompt describing the input image (not needed for a saved inversion)")
    edit.add_argument("-t", "--target", required=True, help="prompt describing the edited image")
    edit.add_argument("-o", "--output", required=True, help="output image (.png, .jpg, .webp, ...)")
    edit.add_argument("--save-inversion", default=None,
                      help="also save the inversion (.safetensors) for reuse, once the edit has succeeded")
    edit_settings(edit)

    rec = commands.add_parser("reconstruct", help="invert and regenerate; print how close it came (JSON)")
    rec.add_argument("input", help="input image")
    rec.add_argument("-s", "--source", required=True, help="prompt describing the input image")
    rec.add_argument("-o", "--output", required=True, help="the regenerated image (.png, .jpg, .webp, ...)")
    common(rec)

    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("-p", "--prompt", required=True, help="what to draw")
    gen.add_argument("-o", "--output", required=True, help="output image (.png, .jpg, .webp, ...)")
    gen.add_argument("--width", type=int, default=None, help="width in pixels (default: the model's native size)")
    gen.add_argument("--height", type=int, default=None, help="height in pixels (default: the model's native size)")
    gen.add_argument("--save-inversion", default=None, help="save the trajectory (.safetensors) to edit it later")
    common(gen, image=False)
    gen.add_argument("--max-pixels", type=int, default=None,
                     help=f"largest image generated, in pixels (default {MAX_PIXELS})")

    att = commands.add_parser("attention", help="draw each word's cross-attention over the image, and the blend mask")
    att.add_argument("input", help="input image, or a saved inversion (.safetensors)")
    att.add_argument("-s", "--source", help="prompt describing the input image")
    att.add_argument("-t", "--target", default=None, help="target prompt (optional): its words are drawn too")
    att.add_argument("-o", "--output", required=True, help="folder for the PNG heat maps (emptied of earlier maps)")
    att.add_argument("--steps-window", default=None, metavar="START:END",
                     help="average the maps over these denoising steps (default: all)")
    control_options(att)
    common(att)

    batch = commands.add_parser("batch", help="edit many images from a JSONL spec (resumable; many processes "
                                "under accelerate launch / torchrun)")
    batch.add_argument("spec", help="JSONL, one item a line: image, source, targets, optional id and settings "
                                    "(any option of `edit` by name, e.g. \"steps\": 10, \"no_merge\": true)")
    batch.add_argument("-o", "--output", required=True, help="output folder (a rerun resumes it)")
    batch.add_argument("--retry-failed", action="store_true", help="redo the items recorded as failed")
    edit_settings(batch)

    serve = commands.add_parser("serve", help="start the web editor (needs the app extra: pip install 'dit4edit[app]')")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: the network)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    common(serve)  # --steps, --guidance, --inversion, --tol: the page's starting values

    pie = commands.add_parser("pie-bench", help="edit and score PIE-Bench with its published protocol (resumable; "
                              "many processes under accelerate launch / torchrun)")
    pie.add_argument("--data", required=True, help="PIE-Bench folder: mapping_file.json and annotation_images/")
    pie.add_argument("-o", "--output", required=True, help="output folder (a rerun resumes it)")
    pie.add_argument("--types", default=None, help="comma-separated editing type ids 0-9 (default: all)")
    pie.add_argument("--limit", type=int, default=None, help="at most N images (after --types)")
    pie.add_argument("--local-blend-from-bench", action="store_true",
                     help="local blend on each entry's blended_word (as the reference Prompt-to-Prompt runs)")
    pie.add_argument("--metrics", default=None, help="comma-separated subset of structure_distance, psnr, lpips, "
                     "mse, ssim, clip_whole, clip_edited (default: all)")
    pie.add_argument("--clip-model", default="openai/clip-vit-large-patch14", help="CLIP: hub id or local folder")
    pie.add_argument("--dino-model", default="facebook/dino-vitb8", help="DINO ViT: hub id or local folder")
    pie.add_argument("--retry-failed", action="store_true", help="redo the images recorded as failed")
    edit_settings(pie)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weight pipeline (for trying things)")
    tiny.add_argument("output", help="folder to create (must not exist, or be empty)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.add_argument("--family", choices=("pixart", "sigma", "sd3", "sd3.5", "flux", "flux-schnell"), default=None,
                      help="write the family's own diffusers pipeline (default: a dit4edit PixArt pipeline)")
    return parser


def common(sub: argparse.ArgumentParser, *, image: bool = True) -> None:
    """Model, steps, guidance, device options; with `image`, the inversion options too."""
    sub.add_argument("--model", default=None,
                     help="default: the embedded model; else a local folder in diffusers layout or a hub id. Its "
                          "dit4edit.json, if any, sets the defaults of --steps, --guidance, --inversion and the control")
    sub.add_argument("--steps", type=int, default=None,
                     help=f"denoising steps, 1-1000 (default: the model's, else {DEFAULTS.steps})")
    sub.add_argument("--guidance", type=float, default=None,
                     help=f"classifier-free guidance scale, finite and >= 0 (default: the model's, else {DEFAULTS.guidance:g})")
    sub.add_argument("--seed", type=int, default=None, help=f"random seed, 0 to 2**64-1 (default {DEFAULTS.seed})")
    sub.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="where to run (default auto: cuda when available, else cpu)")
    sub.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="model precision (default auto: bfloat16/float16 on GPUs, float32 on the CPU)")
    sub.add_argument("--quiet", action="store_true", help="no progress bars and no messages, only errors")
    sub.add_argument("--offload", default=None, choices=sorted(OFFLOAD),
                     help="keep the models in CPU memory and move them to the GPU when used: one model at a "
                          "time (model) or one layer at a time (sequential: least memory, slowest); needs a GPU")
    sub.add_argument("--compile", action="store_true",
                     help="compile the transformer blocks with torch.compile (the first edit compiles for a minute "
                          "or more; pays off over many edits of one size, e.g. with `batch`)")
    sub.add_argument("--vae-tiling", action="store_true",
                     help="encode and decode in overlapping tiles, one image at a time (less memory for large "
                          "images; the tiles blend, so results differ slightly)")
    if image:
        sub.add_argument("--inversion", default=None, choices=list(INVERSION_METHODS),
                         help=f"inversion method (default: the model's, else {DEFAULTS.inversion})")
        sub.add_argument("--tol", type=float, default=None,
                         help=f"exact inversion tolerance, in (0, 1] (default {DEFAULTS.tol:g})")
        sub.add_argument("--max-pixels", type=int, default=None,
                         help="largest input image (or saved inversion) accepted, in pixels at the size it is "
                              f"worked on (default {MAX_PIXELS}, i.e. 2048x2048)")


def edit_settings(sub: argparse.ArgumentParser) -> None:
    """The options of `dit4edit edit` that say how an edit runs (shared by `batch`, `pie-bench` and, by name, the
    settings of a batch spec line)."""
    sub.add_argument("--method", default=None, choices=tuple(EDIT_METHODS),
                     help="editing method: " + "; ".join(f"{name}: {m.summary}" for name, m in EDIT_METHODS.items())
                          + " (default: dit4edit)")
    sub.add_argument("--strength", type=float, default=None, metavar="F",
                     help="sdedit: how far to noise the input, a fraction of the schedule in (0, 1] (default 0.6)")
    sub.add_argument("--free-source", action="store_true", default=None,
                     help="let the source branch run free instead of pinning it to the inversion trajectory")
    sub.add_argument("--direct-inversion", action="store_true", default=None,
                     help="add the pinned source branch's error of each step to the target too (PnP Inversion's "
                          "direct inversion): what the target prompt does not change follows the input even "
                          "after an inexact inversion")
    sub.add_argument("--rows", type=int, default=None, choices=[3, 4],
                     help="rows of the edit batch under guidance: 4 (default), or 3 to leave out the source's "
                          "unconditional row (one forward row fewer; the target's unconditional row is then not "
                          "controlled)")
    control_options(sub)
    common(sub)


def control_options(sub: argparse.ArgumentParser) -> None:
    """Flags that map onto `AttentionControl` and `MergeConfig` fields (`request.CONTROL_OPTIONS`,
    `request.MERGE_OPTIONS`; defaults documented there)."""
    group = sub.add_argument_group("attention control (DiT4Edit)")
    group.add_argument("--no-attention-control", action="store_true", default=None,
                       help="plain inversion, then denoising")
    group.add_argument("--self-replace-steps", type=float, default=None, metavar="S",
                       help="fraction of steps where the edit takes the source's self-attention; mutual after")
    group.add_argument("--self-layers", default=None, metavar="START:END", help="blocks with self-attention control")
    group.add_argument("--cross-replace-steps", type=float, default=None, metavar="F",
                       help="fraction of steps with Prompt-to-Prompt cross-attention control")
    group.add_argument("--cross-replace-changed", type=float, default=None, metavar="F",
                       help="cross-attention window of the words that differ between the prompts (0: they attend "
                            "with their own maps; default: the model's setting, else the same as the other words)")
    group.add_argument("--edit-mode", default=None, choices=EDIT_MODES,
                       help="replace (same word count), refine (words inserted) or auto (default: auto)")
    group.add_argument("--reweight", action="append", default=None, metavar="WORD=VALUE",
                       help="scale a target word's cross-attention by a factor in (0, 1e6] (repeatable)")
    group.add_argument("--local-blend", default=None, metavar="WORDS",
                       help="edit only where these words attend (comma- or space-separated)")
    group.add_argument("--local-blend-changed", action=argparse.BooleanOptionalAction, default=None,
                       help="also edit only where the words that differ between the prompts attend (default: the "
                            "model's setting)")
    group.add_argument("--mask", default=None,
                       help="mask image of the input's size: nothing outside it changes (overrides --local-blend). "
                            "Editable where it is light; for a mask with transparency, where it is opaque (painted)")
    merging = sub.add_argument_group("patch merging (ToMe)")
    merging.add_argument("--no-merge", action="store_true", default=None, help="no patch merging")
    merging.add_argument("--merge-ratio", type=float, default=None, metavar="R",
                         help="fraction of tokens removed before self-attention (default 0.8)")
    merging.add_argument("--merge-stride", default=None, metavar="ROWSxCOLS",
                         help="cell giving one destination token (default 3x3; 0.8 needs 3x3)")
    merging.add_argument("--merge-ff", action="store_true", default=None,
                         help="also merge the feed-forward input (faster)")
    merging.add_argument("--merge-min-tokens", type=int, default=None, metavar="N",
                         help="merge only latent grids with at least N tokens (default 1024, i.e. 512² and up)")
    merging.add_argument("--merge-blocks", default=None, metavar="START:END",
                         help="merge only in transformer blocks [START, END) (default: all)")
    merging.add_argument("--merge-skip-steps", type=int, default=None, metavar="N",
                         help="leave self-attention unmerged in the first N denoising steps (default 0)")
    merging.add_argument("--merge-plan-every", type=int, default=None, metavar="N",
                         help="plan once per N merging blocks, reused by the blocks in between (default 1: a plan "
                              "per block)")


def settings_from_args(args) -> Settings:
    """The user's `Settings` from the flags they gave: each flag is the option of the same name
    (`--self-replace-steps` is `self_replace_steps`), parsed and checked by `Settings.with_options`."""
    given = {f"--{name.replace('_', '-')}": getattr(args, name) for name in OPTIONS
             if getattr(args, name, None) is not None}
    max_pixels = getattr(args, "max_pixels", None)
    if max_pixels is not None:
        checks.integer(max_pixels, "--max-pixels", 1)
    return Settings(max_pixels=max_pixels).with_options(given, "flag")


# --- running ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dit4edit: %(message)s")
    try:
        with _terminate_as_interrupt():
            return COMMANDS[args.command](args)
    except (KeyboardInterrupt, _Terminated) as interrupt:
        print(f"dit4edit: {'terminated' if isinstance(interrupt, _Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(interrupt, _Terminated) else 130
    except Exception as error:
        if args.debug:  # every failure, user errors and model loading included
            raise
        if isinstance(error, DiT4EditError):
            print(f"dit4edit: error: {checks.printable(str(error))}", file=sys.stderr)
            return EXIT_USAGE
        print(f"dit4edit: internal error: {type(error).__name__}: {checks.printable(_first_line(error))} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that partly written outputs are removed as for Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Model:
    """The model a command runs, read and checked before anything heavy loads."""

    name: str  # folder or hub id
    info: object  # model_folder.ModelInfo of a local folder, or None for a hub id
    defaults: object  # model_folder.ModelDefaults

    @property
    def num_blocks(self) -> int | None:
        return None if self.info is None else self.info.num_blocks


def _model(args) -> Model:
    """The --model folder (configs and dit4edit.json only) and the flags that concern loading, checked."""
    if getattr(args, "offload", None):
        check_offload(args.offload, device_for(args.device))
    if getattr(args, "compile", False) and getattr(args, "merge_ff", None):
        raise DiT4EditError("--compile does not work with --merge-ff (merged feed-forward layers need eager blocks)")
    name = args.model or default_model()
    folder = local_folder(name)
    info = check_folder(folder) if folder is not None else None
    return Model(name, info, info.defaults if info is not None else ModelDefaults())


def _resolved(args, model: Model, saved=None):
    """The command's settings resolved against the model: every flag checked before anything loads."""
    return resolve(settings_from_args(args), model.defaults, saved, model.num_blocks)


def _edit_request(args, model: Model, target: str | None):
    """`edit` / `attention`: the request from INPUT, -s, -t and the flags, its files read and checked (input, saved
    inversion, mask), and its resolved settings."""
    is_inversion = str(args.input).endswith(".safetensors")
    checks.existing_file(args.input, "inversion file" if is_inversion else "input image")
    if args.mask is not None:
        checks.existing_file(args.mask, "mask")
    request = EditRequest(targets=(target,) if target is not None else (), source=args.source,
                          image=None if is_inversion else args.input, inversion=args.input if is_inversion else None,
                          settings=settings_from_args(args))
    return prepare(request, model.defaults, model.num_blocks, allow_no_target=target is None)


def _say_saved(args, request) -> None:
    inversion = request.inversion
    if inversion is None:
        return
    if args.guidance is None:
        _say(args, f"using the saved inversion's settings: {inversion.settings()}")
    else:
        _say(args, f"using the saved inversion's {inversion.num_inference_steps} steps and {inversion.method}, at "
                   f"guidance {args.guidance:g} (it was made at {inversion.guidance_scale:g})")


def _edit(args) -> int:
    model = _model(args)
    output = _check_output(args.output, args.input, args.mask)
    _check_inversion_path(args.save_inversion, args.input, args.output, args.mask)
    request, resolved = _edit_request(args, model, args.target)
    if args.save_inversion and not EDIT_METHODS[resolved.method].inverts:
        raise DiT4EditError(f"--save-inversion: the {resolved.method} method does not invert the image")
    _say_saved(args, request)
    pipe = load_pipeline(args, model=model)
    result, inversion = run(pipe, request)
    imgs.save_image(result.images[0], output)
    if args.save_inversion:
        inversion.save(args.save_inversion)
    _say(args, f"wrote {output}")
    return 0


def _attention(args) -> int:
    from . import pictures  # imports torch

    model = _model(args)
    out = _output_folder(args.output)
    window = _window(args.steps_window)
    request, resolved = _edit_request(args, model, args.target)
    if window is not None and not 0 <= window[0] < window[1] <= resolved.steps:
        raise DiT4EditError(f"--steps-window {args.steps_window} is outside 0:{resolved.steps}")
    _say_saved(args, request)
    pipe = load_pipeline(args, model=model)
    if not request.targets:  # no target: the source's own maps, edited towards itself
        source = request.source if request.inversion is None else request.inversion.source_prompt
        request = replace(request, targets=(source,))
    result, inversion = run(pipe, request, record_words=True)
    base = pipe.prepare_input(request.image) if request.image is not None else result.reconstruction
    written = pictures.write_attention(out, result, base, with_target=args.target is not None,
                                       steps=range(*window) if window else None,
                                       num_steps=inversion.num_inference_steps, protect=(args.input, args.mask))
    _say(args, f"wrote {written} pictures to {out} (overview.png shows them all)")
    return 0


def _window(text: str | None) -> tuple[int, int] | None:
    return None if text is None else parse_range(text, "--steps-window")


def _reconstruct(args) -> int:
    model = _model(args)
    output = _check_output(args.output, args.input)
    checks.prompt(args.source, "source prompt")
    settings = _resolved(args, model)
    image = imgs.load_image(args.input, settings.max_pixels)
    pipe = load_pipeline(args, model=model)
    image, stats = pipe.reconstruct(image, args.source, settings.steps, settings.guidance, settings.inversion,
                                    settings.tol, settings.max_pixels)
    imgs.save_image(image, output)
    print(json.dumps({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in stats.items()}))
    return 0


def _generate(args) -> int:
    model = _model(args)
    output = _check_output(args.output)
    _check_inversion_path(args.save_inversion, args.output)
    checks.prompt(args.prompt, "prompt")
    settings = _resolved(args, model)
    native = model.info.native_size if model.info is not None else None
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None:
            checks.integer(value, flag, 1)
    if native is not None or (args.width and args.height):
        imgs.check_size((args.width or native, args.height or native), settings.max_pixels)
    pipe = load_pipeline(args, model=model)
    import torch

    generator = torch.Generator().manual_seed(settings.seed)
    image, inversion = pipe.generate(args.prompt, args.height, args.width, settings.steps, settings.guidance,
                                     generator, max_pixels=settings.max_pixels)
    imgs.save_image(image, output)
    if args.save_inversion:
        inversion.save(args.save_inversion)
    _say(args, f"wrote {output}")
    return 0


def _make_tiny_model(args) -> int:
    folder = Path(args.output)
    checks.seed(args.seed, "--seed")
    if folder.exists() and not folder.is_dir():
        raise DiT4EditError(f"{folder} is a file; make-tiny-model writes a folder")
    if folder.exists() and any(folder.iterdir()):
        raise DiT4EditError(f"{folder} exists and is not empty")
    checks.writable_folder(folder, "tiny model")
    from .backbones.tiny import tiny_pipeline
    from .pipeline import DiT4EditPipeline
    from .tiny import tiny_components

    family = getattr(args, "family", None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name[:32]}.", dir=folder.parent))
    try:  # written whole beside the target, then renamed into place: a kill leaves no partial model
        if family is None:
            DiT4EditPipeline(**tiny_components(args.seed)).save_pretrained(staging)
        else:
            tiny_pipeline(family, args.seed).save_pretrained(staging, safe_serialization=True)
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote a tiny random-weight {family or 'PixArt'} pipeline to {folder} (random weights: its images are "
          "noise)")
    return 0


def _batch(args) -> int:
    model = _model(args)
    checks.existing_file(args.spec, "batch spec")
    out = _output_folder(args.output)
    settings = settings_from_args(args)
    resolve(settings, model.defaults, None, model.num_blocks)  # the command's own options, before any item
    jobs = batch.read_spec(args.spec, settings, out, model.defaults, model.num_blocks)
    return _run_batch(args, model, jobs, out)


def _run_batch(args, model: Model, jobs, out: Path, scorer=None, about=()) -> int:
    """Edit `jobs` (resumable, this process's share of them), then report; exit 3 when any item failed."""
    processes = batch.Processes(cpu=cpu_only(args.device))

    def load():
        pipe = load_pipeline(args, processes.device, model)
        if scorer is not None:
            scorer.load()
        return pipe

    key = batch.run_key(model.name, local=model.info is not None)
    rows = batch.run_jobs(jobs, out, load, processes, scorer=scorer, retry_failed=args.retry_failed,
                          disable_progress=args.quiet, key=key)
    if not processes.is_main:
        return 0
    if scorer is not None:
        from . import piebench

        print(piebench.write_tables(out, rows, [*about, f"processes: {processes.count}"]), end="")
    failed = sum(row.get("status") != "ok" for row in rows)
    print(f"{len(rows) - failed} done, {failed} failed (see {out / batch.RESULTS})")
    return EXIT_ITEMS_FAILED if failed else 0


def _pie_bench(args) -> int:
    from . import piebench

    model = _model(args)
    out = _output_folder(args.output, args.data)
    settings = settings_from_args(args)
    resolved = resolve(settings, model.defaults, None, model.num_blocks)
    types = _pie_types(args.types)
    names = [name.strip() for name in (args.metrics or ",".join(piebench.METRICS)).split(",") if name.strip()]
    if not names or any(name not in piebench.METRICS for name in names):
        raise DiT4EditError(f"--metrics takes a comma-separated subset of {', '.join(piebench.METRICS)}, "
                            f"got {checks.printable(args.metrics)!r}")
    if args.limit is not None:
        checks.integer(args.limit, "--limit", 1)
    if settings.mask is not None:
        raise DiT4EditError("--mask does not apply to pie-bench: one mask cannot fit every image of the benchmark")
    if args.local_blend_from_bench and resolved.control is None:
        raise DiT4EditError("--local-blend-from-bench needs attention control (drop --no-attention-control)")
    jobs = piebench.read_benchmark(args.data, settings, types, args.limit, args.local_blend_from_bench)
    if not jobs:
        raise DiT4EditError(f"no PIE-Bench entries of types {args.types} in {args.data}")
    device = device_for(args.device)
    say = lambda line: print(f"dit4edit: {line}", file=sys.stderr)  # noqa: E731
    scorer = piebench.Scorer(args.data, out, names, args.clip_model, args.dino_model, device, device_name(device),
                             say)
    return _run_batch(args, model, jobs, out, scorer, piebench.describe(model.name, resolved,
                                                                        args.local_blend_from_bench))


def _pie_types(text: str | None) -> list[str] | None:
    if text is None:
        return None
    types = [part.strip() for part in text.split(",") if part.strip()]
    if not types or any(part not in [str(k) for k in range(10)] for part in types):
        raise DiT4EditError(f"--types takes comma-separated editing type ids 0-9, got {checks.printable(text)!r}")
    return types


def _serve(args) -> int:
    if importlib.util.find_spec("gradio") is None:  # a missing extra, told before anything loads
        raise DiT4EditError("the web app needs gradio: pip install 'dit4edit[app]'")
    from . import app as web

    model = _model(args)
    settings = settings_from_args(args)
    resolve(settings, model.defaults, None, model.num_blocks)
    web.check_port(args.host, args.port)
    if not web.is_loopback(args.host):
        print(f"dit4edit: warning: serving on {args.host}: anyone who can reach this machine can use the editor",
              file=sys.stderr)
    editor = web.Editor(load_pipeline(args, model=model), settings=settings)
    app = web.serve(editor, args.host, args.port)
    print(f"dit4edit: the editor is at {app.local_url} (Ctrl-C stops it)", file=sys.stderr)
    app.block_thread()
    return 0


COMMANDS = {"edit": _edit, "attention": _attention, "reconstruct": _reconstruct, "generate": _generate,
            "batch": _batch, "pie-bench": _pie_bench, "serve": _serve, "make-tiny-model": _make_tiny_model}


# --- helpers ---------------------------------------------------------------------------------------------------


def _check_output(output, *inputs) -> Path:
    output = imgs.check_output_path(output, *[i for i in inputs if i is not None])
    checks.writable_file(output, "output")
    return output


def _check_inversion_path(path, *others) -> None:
    if path is None:
        return
    if not str(path).endswith(".safetensors"):
        raise DiT4EditError(f"inversion files end in .safetensors: {checks.printable(str(path))}")
    if Path(path).is_dir():
        raise DiT4EditError(f"inversion path is a directory: {checks.printable(str(path))}")
    if any(other is not None and Path(path).resolve() == Path(other).resolve() for other in others):
        raise DiT4EditError(f"inversion path {checks.printable(str(path))} would overwrite another file of this "
                            "command")
    checks.writable_file(path, "inversion")


def _output_folder(path, data=None) -> Path:
    """An output folder: not a file, writable, and not the folder `data` whose files it would replace."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DiT4EditError(f"output must be a folder: {checks.printable(str(out))} is a file")
    if data is not None and Path(data).is_dir() and out.resolve() == Path(data).resolve():
        raise DiT4EditError(f"the output folder is the input folder {checks.printable(str(data))}: its files "
                            "would be replaced; choose another folder")
    checks.writable_folder(out, "output")
    return out


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
