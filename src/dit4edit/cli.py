"""The `dit4edit` command line: argparse -> pipeline; `main(argv)` returns the exit code.

Every problem with the user's input is one line on stderr and exit code 2; nothing is written on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from . import checks
from .defaults import DEFAULTS
from .errors import DiT4EditError
from .methods import EDIT_MODES, INVERSION_METHODS

EXIT_USAGE = 2
#: --offload choices -> the diffusers pipeline method that installs the offload hooks.
OFFLOAD = {"model": "enable_model_cpu_offload", "sequential": "enable_sequential_cpu_offload"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: keep them one line too
        self.exit(EXIT_USAGE, f"dit4edit: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="dit4edit", description="Training-free text-guided image editing with PixArt-alpha.")
    parser.add_argument("--version", action="version", version=f"dit4edit {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    edit = commands.add_parser("edit", help="edit an image: invert with the source prompt, denoise with the target")
    edit.add_argument("input", help="input image, or an inversion saved with --save-inversion (.safetensors)")
    edit.add_argument("-s", "--source", required=False,
                      help="prompt describing the input image (not needed for a saved inversion)")
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

    att = commands.add_parser("attention", help="draw each word's cross-attention over the image, and the blend mask")
    att.add_argument("input", help="input image, or a saved inversion (.safetensors)")
    att.add_argument("-s", "--source", required=False, help="prompt describing the input image")
    att.add_argument("-t", "--target", default=None, help="target prompt (optional): its words are drawn too")
    att.add_argument("-o", "--output", required=True, help="folder for the PNG heat maps")
    att.add_argument("--steps-window", default=None, metavar="START:END",
                     help="average the maps over these denoising steps (default: all)")
    control_options(att)
    common(att)


    batch = commands.add_parser("batch", help="edit many images from a JSONL spec (resumable; many processes "
                                "under accelerate launch / torchrun)")
    batch.add_argument("spec", help="JSONL, one item a line: image, source, targets, optional id and settings")
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

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weight PixArt pipeline (for trying things)")
    tiny.add_argument("output", help="folder to create (must not exist, or be empty)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    return parser


def common(sub: argparse.ArgumentParser, *, image: bool = True) -> None:
    """Model, steps, guidance, device options; with `image`, the inversion options too."""
    sub.add_argument("--model", default=None,
                     help="local folder in diffusers layout or PixArt-alpha hub id (default: the embedded model); "
                          "its dit4edit.json, if any, sets the defaults of --steps, --guidance and --inversion")
    sub.add_argument("--steps", type=int, default=None,
                     help=f"denoising steps, 1-1000 (default: the model's, else {DEFAULTS.steps})")
    sub.add_argument("--guidance", type=float, default=None,
                     help=f"classifier-free guidance scale, finite and >= 0 (default: the model's, else {DEFAULTS.guidance:g})")
    sub.add_argument("--seed", type=int, default=DEFAULTS.seed,
                     help=f"random seed, 0 to 2**64-1 (default {DEFAULTS.seed})")
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
                         help="largest input image (or saved inversion) accepted, in pixels (default 2048x2048)")


def edit_settings(sub: argparse.ArgumentParser) -> None:
    """The options of `dit4edit edit` that say how an edit runs (shared by `batch`, `pie-bench` and the per-item
    settings of a batch spec)."""
    sub.add_argument("--free-source", action="store_true",
                     help="let the source branch run free instead of pinning it to the inversion trajectory")
    sub.add_argument("--direct-inversion", action="store_true",
                     help="add the pinned source branch's error of each step to the target too (PnP Inversion's "
                          "direct inversion): what the target prompt does not change follows the input even "
                          "after an inexact inversion")
    control_options(sub)
    common(sub)


def control_options(sub: argparse.ArgumentParser) -> None:
    """Flags that map onto `AttentionControl` fields (defaults documented there)."""
    group = sub.add_argument_group("attention control (DiT4Edit)")
    group.add_argument("--no-attention-control", action="store_true", help="plain inversion, then denoising")
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
    group.add_argument("--reweight", action="append", default=[], metavar="WORD=VALUE",
                       help="scale a target word's cross-attention (repeatable)")
    group.add_argument("--local-blend", default=None, metavar="WORDS",
                       help="edit only where these words attend (comma- or space-separated)")
    group.add_argument("--local-blend-changed", action=argparse.BooleanOptionalAction, default=None,
                       help="also edit only where the words that differ between the prompts attend (default: the "
                            "model's setting; off for PixArt)")
    group.add_argument("--mask", default=None,
                       help="mask image of the input's size, white = editable: nothing outside it changes "
                            "(overrides --local-blend)")
    merging = sub.add_argument_group("patch merging (ToMe)")
    merging.add_argument("--no-merge", action="store_true", help="no patch merging")
    merging.add_argument("--merge-ratio", type=float, default=None, metavar="R",
                         help="fraction of tokens removed before self-attention (default 0.8)")
    merging.add_argument("--merge-stride", default=None, metavar="ROWSxCOLS",
                         help="cell giving one destination token (default 3x3; 0.8 needs 3x3)")
    merging.add_argument("--merge-ff", action="store_true", help="also merge the feed-forward input (faster)")
    merging.add_argument("--merge-min-tokens", type=int, default=None, metavar="N",
                         help="merge only latent grids with at least N tokens (default 1024, i.e. 512² and up)")
    merging.add_argument("--merge-blocks", default=None, metavar="START:END",
                         help="merge only in transformer blocks [START, END) (default: all)")
    merging.add_argument("--merge-skip-steps", type=int, default=None, metavar="N",
                         help="leave self-attention unmerged in the first N denoising steps (default 0)")
    merging.add_argument("--merge-plan-every", type=int, default=None, metavar="N",
                         help="plan once per N merging blocks, reused by the blocks in between (default 1: a plan "
                              "per block)")


class _SettingsParser(_Parser):
    """Parses one batch item's settings: an error is a `DiT4EditError` for that item, not an exit."""

    def error(self, message):
        raise DiT4EditError(message)


#: Options of an edit that a batch item may set for itself (the rest hold for the whole run: model, device, ...).
ITEM_OPTIONS = ("steps", "guidance", "inversion", "tol", "max_pixels", "free_source", "direct_inversion")


def settings_parser() -> argparse.ArgumentParser:
    parser = _SettingsParser(prog="dit4edit", add_help=False)
    edit_settings(parser)
    return parser


def item_settings(parser: argparse.ArgumentParser, args, overrides: dict, defaults=None):
    """`EditSettings` for one batch item: the command's options with the item's settings (keyed by option name,
    `self_replace_steps` or `self-replace-steps`; true/false for on/off flags) parsed by the same option
    definitions; what neither sets comes from `defaults` (the model's `ModelDefaults`)."""
    controls = argparse.ArgumentParser(add_help=False)
    control_options(controls)
    allowed = {*ITEM_OPTIONS, *(action.dest for action in controls._actions)}
    actions = {action.dest: action for action in parser._actions if action.dest in allowed}
    namespace, tokens = argparse.Namespace(**vars(args)), []
    for key, value in overrides.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            raise DiT4EditError(f"unknown setting {key!r}")
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise DiT4EditError(f"setting {key!r} takes true or false, got {value!r}")
            setattr(namespace, action.dest, value)
        elif value is None:
            setattr(namespace, action.dest, action.default)
        elif isinstance(action, argparse._AppendAction):
            pairs = value.items() if isinstance(value, dict) else None
            for item in ([f"{word}={factor}" for word, factor in pairs] if pairs is not None else value):
                tokens += [flag, str(item)]
        else:
            tokens += [flag, str(value)]
    return settings_from_args(parser.parse_args(tokens, namespace=namespace), defaults)


def settings_from_args(args, defaults=None):
    """`EditSettings` from the edit options (validated: bad values are a `DiT4EditError`); steps, guidance and
    inversion the options leave unset come from `defaults` (the model's `ModelDefaults`; default the library's)."""
    from . import images as imgs
    from .batch import EditSettings
    from .model_folder import ModelDefaults

    defaults = defaults or ModelDefaults()
    steps = defaults.num_inference_steps if args.steps is None else checks.steps(args.steps, "--steps")
    guidance = defaults.guidance_scale if args.guidance is None else checks.guidance(args.guidance, "--guidance")
    tol = DEFAULTS.tol if args.tol is None else checks.tolerance(args.tol, "--tol")
    if args.max_pixels is not None:
        checks.integer(args.max_pixels, "--max-pixels", 1)
    _check_source_flags(args)
    return EditSettings(steps=steps, guidance=guidance, inversion=args.inversion or defaults.inversion, tol=tol,
                        max_pixels=args.max_pixels or imgs.MAX_PIXELS, pin_source=not args.free_source,
                        direct_inversion=args.direct_inversion, control=control_from_args(args, defaults),
                        merge=merge_from_args(args), mask=args.mask)


def _given(args, *names: str, prefix: str = "") -> dict:
    """The flags among `names` that the user gave (not None), keyed by their names without `prefix`."""
    return {name.removeprefix(prefix): getattr(args, name) for name in names if getattr(args, name) is not None}


def control_from_args(args, defaults=None):
    """An `AttentionControl` from the CLI flags on top of the model's (`defaults`, a `ModelDefaults`: its
    `dit4edit.json`'s control settings; None = the library's), or None for --no-attention-control."""
    from .model_folder import ModelDefaults

    if args.no_attention_control:
        return None
    fields = _given(args, "self_replace_steps", "cross_replace_steps", "cross_replace_changed", "edit_mode",
                    "local_blend_changed")
    if args.self_layers is not None:
        fields["self_layers"] = _range(args.self_layers, "--self-layers")
    if args.reweight:
        fields["reweight"] = dict(_word_value(item) for item in args.reweight)
    if args.local_blend is not None:
        fields["local_blend_words"] = _blend_words(args.local_blend)
    return (defaults or ModelDefaults()).attention_control(**fields)


def merge_from_args(args):
    """A `MergeConfig` from the CLI flags, or None for --no-merge."""
    from .merging import MergeConfig

    if args.no_merge:
        return None
    fields = {"merge_ff": args.merge_ff, **_given(args, "merge_ratio", "merge_skip_steps", "merge_plan_every",
                                                     prefix="merge_")}
    if args.merge_stride is not None:
        try:
            fields["stride"] = tuple(int(part) for part in args.merge_stride.lower().split("x"))
        except ValueError:
            raise DiT4EditError(f"--merge-stride takes ROWSxCOLS, got {args.merge_stride!r}") from None
    if args.merge_min_tokens is not None:
        fields["min_tokens"] = checks.integer(args.merge_min_tokens, "--merge-min-tokens", 0)
    if args.merge_blocks is not None:
        fields["blocks"] = _range(args.merge_blocks, "--merge-blocks")
    try:
        return MergeConfig(**fields)
    except (TypeError, ValueError) as error:
        raise DiT4EditError(str(error)) from None


def _range(text: str, flag: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise DiT4EditError(f"{flag} takes START:END (two integers), got {text!r}") from None
    return start, end


def _blend_words(text: str) -> tuple[str, ...]:
    words = tuple(text.replace(",", " ").split())
    if not words:
        raise DiT4EditError(f"--local-blend names no words (got {text!r}); give words of the prompts, or drop it")
    return words


def _word_value(item: str) -> tuple[str, float]:
    word, sep, value = item.partition("=")
    try:
        if not sep or not word.strip():
            raise ValueError
        return word.strip(), float(value)
    except ValueError:
        raise DiT4EditError(f"--reweight takes WORD=VALUE, got {item!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dit4edit: %(message)s")
    try:
        with _terminate_as_interrupt():
            return COMMANDS[args.command](args)
    except DiT4EditError as error:
        print(f"dit4edit: error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, _Terminated) as interrupt:
        print(f"dit4edit: {'terminated' if isinstance(interrupt, _Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(interrupt, _Terminated) else 130
    except Exception as error:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(f"dit4edit: internal error: {type(error).__name__}: {_one_line(str(error))} "
              "(rerun with --debug for details)", file=sys.stderr)
        return 1


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


def _one_line(message: str) -> str:
    """Control characters (a file name with a newline) shown escaped, so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


# --- commands --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """What a command settled before loading anything heavy: the model and the settings to run with."""

    model: str  # folder or hub id
    info: object  # model_folder.ModelInfo of a local folder, or None for a hub id
    defaults: object  # model_folder.ModelDefaults
    steps: int
    guidance: float
    inversion: str
    tol: float
    max_pixels: int


def _check_source_flags(args) -> None:
    """The source-branch flags of an edit (`edit_settings`) agree with each other."""
    if args.direct_inversion and args.free_source:
        raise DiT4EditError("--direct-inversion corrects the target by the pinned source's error: it cannot run "
                            "with --free-source")


def _prepare(args, *, inputs=()) -> _Run:
    """Inputs that must exist, every numeric flag, then the model folder (configs and dit4edit.json only): all
    checked before torch is imported."""
    for path, what in inputs:
        if path is not None:
            checks.existing_file(path, what)
    from .model_folder import ModelDefaults, check_folder, default_model, local_folder

    if getattr(args, "offload", None):
        _check_offload(args.offload, _device(args.device))
    if getattr(args, "compile", False) and getattr(args, "merge_ff", False):
        raise DiT4EditError("--compile does not work with --merge-ff (merged feed-forward layers need eager blocks)")
    if getattr(args, "seed", None) is not None:
        checks.seed(args.seed, "--seed")
    steps = None if args.steps is None else checks.steps(args.steps, "--steps")
    guidance = None if args.guidance is None else checks.guidance(args.guidance, "--guidance")
    tol = checks.tolerance(args.tol, "--tol") if getattr(args, "tol", None) is not None else DEFAULTS.tol
    max_pixels = getattr(args, "max_pixels", None)
    if max_pixels is not None:
        checks.integer(max_pixels, "--max-pixels", 1)
    model = args.model or default_model()
    folder = local_folder(model)
    info = check_folder(folder) if folder is not None else None
    defaults = info.defaults if info is not None else ModelDefaults()
    inversion = getattr(args, "inversion", None) or defaults.inversion
    from .images import MAX_PIXELS

    return _Run(model=model, info=info, defaults=defaults,
                steps=defaults.num_inference_steps if steps is None else steps,
                guidance=defaults.guidance_scale if guidance is None else guidance,
                inversion=inversion, tol=tol, max_pixels=max_pixels or MAX_PIXELS)


def _check_output(output, *inputs) -> Path:
    from . import images as imgs

    output = imgs.check_output_path(output, *inputs)
    checks.writable_file(output, "output")
    return output


def _check_controls(args, run: _Run, source: str | None, target: str | None):
    """The attention-control and merging flags as configs, checked against the prompts' words and, for a local
    folder, the model's blocks."""
    control, merge = control_from_args(args, run.defaults), merge_from_args(args)
    if control is not None:
        if control.local_blend_words:
            checks.words_in_prompts(control.local_blend_words, [source, target], "--local-blend word(s)")
        if control.reweight and target is not None:
            words = [w for key in control.reweight for w in key.split()]
            checks.words_in_prompts(words, [target], "--reweight word(s)")
    if run.info is not None:
        _check_blocks(control, merge, run.info.num_blocks)
    return control, merge


def _check_blocks(control, merge, num_blocks: int) -> None:
    if control is not None:
        control.self_blocks(num_blocks)
        control.blend_blocks(num_blocks)
    if merge is not None:
        merge.block_indices(num_blocks)


def _saved_settings(args, run: _Run, inversion) -> float:
    """Editing a saved inversion: its steps and method are fixed (a different --steps or --inversion is an error);
    guidance defaults to its own. Returns the guidance to edit with, and says what is used."""
    if args.steps is not None and args.steps != inversion.num_inference_steps:
        raise DiT4EditError(f"--steps {args.steps} conflicts with the saved inversion, made with "
                            f"{inversion.num_inference_steps} steps; drop --steps or invert the image again")
    if args.inversion is not None and args.inversion != inversion.method:
        raise DiT4EditError(f"--inversion {args.inversion} conflicts with the saved inversion, made with "
                            f"{inversion.method}; drop --inversion or invert the image again")
    if args.guidance is None:
        _say(args, f"using the saved inversion's settings: {inversion.settings()}")
        return inversion.guidance_scale
    _say(args, f"using the saved inversion's {inversion.num_inference_steps} steps and {inversion.method}, at "
               f"guidance {args.guidance:g} (it was made at {inversion.guidance_scale:g})")
    return run.guidance


def _load_mask(args, size: tuple[int, int]):
    """The --mask image, the input's size; None without --mask."""
    from . import images as imgs

    if args.mask is None:
        return None
    mask = imgs.load_image(args.mask, what="mask")
    if mask.size != tuple(size):
        raise DiT4EditError(f"mask is {mask.size[0]}x{mask.size[1]}, the image is {size[0]}x{size[1]}; "
                            "they must match")
    return mask


def _load_input(args, run: _Run, is_inversion: bool):
    """(inversion or None, image or None): the saved inversion, validated, or the input image."""
    from . import images as imgs

    if is_inversion:
        from .inversion_file import Inversion

        inversion = Inversion.load(args.input, run.max_pixels)
        if args.source and args.source != inversion.source_prompt:
            raise DiT4EditError(f"the inversion was made with the source prompt {inversion.source_prompt!r}")
        return inversion, None
    _check_nonempty(args.source, "source prompt")
    return None, imgs.load_image(args.input, run.max_pixels)


def _edit(args) -> int:
    from . import images as imgs

    is_inversion = _is_inversion(args.input)
    run = _prepare(args, inputs=[(args.input, "inversion file" if is_inversion else "input image"),
                                 (args.mask, "mask")])
    _check_source_flags(args)  # batch and pie-bench check it with the rest of their settings (settings_from_args)
    output = _check_output(args.output, args.input)
    _check_inversion_path(args.save_inversion, args.input, args.output)
    _check_nonempty(args.target, "target prompt")
    if not is_inversion:
        _check_nonempty(args.source, "source prompt")
        control, merge = _check_controls(args, run, args.source, args.target)
    inversion, image = _load_input(args, run, is_inversion)
    if is_inversion:
        control, merge = _check_controls(args, run, inversion.source_prompt, args.target)
        guidance = _saved_settings(args, run, inversion)
    mask = _load_mask(args, inversion.original_size if is_inversion else image.size)
    # Everything that can be checked without the model is checked before loading it.
    pipe = load_pipeline(args, run=run)
    _check_blocks(control, merge, len(pipe.transformer.transformer_blocks))
    pipe.check_prompt(args.target, "target prompt")
    if is_inversion:
        pipe.check_inversion(inversion)
    else:
        pipe.check_prompt(args.source, "source prompt")
        inversion = pipe.invert(image, args.source, run.steps, run.guidance, run.inversion, run.tol, run.max_pixels)
        guidance = run.guidance
    result = pipe.edit(inversion, args.target, guidance_scale=guidance, pin_source=not args.free_source,
                       control=control, mask=mask, merge=merge, source_image=image,
                       direct_inversion=args.direct_inversion)
    imgs.save_image(result.images[0], output)
    if args.save_inversion:
        inversion.save(args.save_inversion)
    _say(args, f"wrote {output}")
    return 0


def _reconstruct(args) -> int:
    from . import images as imgs

    run = _prepare(args, inputs=[(args.input, "input image")])
    output = _check_output(args.output, args.input)
    _check_nonempty(args.source, "source prompt")
    image = imgs.load_image(args.input, run.max_pixels)
    pipe = load_pipeline(args, run=run)
    image, stats = pipe.reconstruct(image, args.source, run.steps, run.guidance, run.inversion, run.tol,
                                    run.max_pixels)
    imgs.save_image(image, output)
    print(json.dumps({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in stats.items()}))
    return 0


def _generate(args) -> int:
    from . import images as imgs

    run = _prepare(args)
    output = _check_output(args.output)
    _check_inversion_path(args.save_inversion, None, args.output)
    _check_nonempty(args.prompt, "prompt")
    native = run.info.native_size if run.info is not None else None
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if value is not None:
            checks.integer(value, flag, 1)
    if native is not None or (args.width and args.height):
        imgs.check_size((args.width or native, args.height or native))
    pipe = load_pipeline(args, run=run)
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    image, inversion = pipe.generate(args.prompt, args.height, args.width, run.steps, run.guidance, generator)
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
    from .pipeline import DiT4EditPipeline
    from .tiny import tiny_components

    DiT4EditPipeline(**tiny_components(args.seed)).save_pretrained(folder)
    print(f"wrote a tiny random-weight PixArt pipeline to {folder} (random weights: its images are noise)")
    return 0


def _attention(args) -> int:
    from . import images as imgs
    from . import pictures

    is_inversion = _is_inversion(args.input)
    run = _prepare(args, inputs=[(args.input, "inversion file" if is_inversion else "input image"),
                                 (args.mask, "mask")])
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise DiT4EditError(f"output must be a folder: {out} is a file")
    checks.writable_folder(out, "attention maps")
    window = _range(args.steps_window, "--steps-window") if args.steps_window else None
    if not is_inversion:
        _check_nonempty(args.source, "source prompt")
        _check_window(window, args.steps_window, run.steps)
        control, merge = _check_controls(args, run, args.source, args.target)
    inversion, image = _load_input(args, run, is_inversion)
    guidance = run.guidance
    if is_inversion:
        control, merge = _check_controls(args, run, inversion.source_prompt, args.target)
        _check_window(window, args.steps_window, inversion.num_inference_steps)
        guidance = _saved_settings(args, run, inversion)
    mask = _load_mask(args, inversion.original_size if is_inversion else image.size)
    pipe = load_pipeline(args, run=run)
    _check_blocks(control, merge, len(pipe.transformer.transformer_blocks))
    if args.target:
        pipe.check_prompt(args.target, "target prompt")
    if is_inversion:
        pipe.check_inversion(inversion)
    else:
        inversion = pipe.invert(image, args.source, run.steps, run.guidance, run.inversion, run.tol, run.max_pixels)
    target = args.target or inversion.source_prompt
    result = pipe.edit(inversion, target, guidance_scale=guidance, control=control, mask=mask,
                       merge=merge, record_words=True, source_image=image)
    controller = result.controller
    steps = range(*window) if window else None
    base = image or result.reconstruction
    out.mkdir(parents=True, exist_ok=True)
    tiles, written = [], []
    branches = [("source", 0)] + ([("target", 1)] if args.target else [])
    for name, branch in branches:
        picture_base = base if branch == 0 else result.images[0]
        for k, (word, picture) in enumerate(pictures.word_pictures(controller, branch, picture_base, steps)):
            written.append(imgs.save_image(picture, out / f"{name}-{k:02d}-{pictures.slug(word)}.png"))
            tiles.append((f"{name[0]}:{word}", picture))
    mask = controller.blend_mask(inversion.num_inference_steps - 1)
    if mask is not None:
        picture = pictures.mask_picture(mask, base)
        written.append(imgs.save_image(picture, out / "mask.png"))
        tiles.append(("mask", picture))
    if args.target:
        written.append(imgs.save_image(result.images[0], out / "edited.png"))
        tiles.append(("edited", result.images[0]))
    written.append(imgs.save_image(pictures.grid([("input", base), *tiles]), out / "overview.png"))
    _say(args, f"wrote {len(written)} pictures to {out} (overview.png shows them all)")
    return 0


def _check_window(window, text: str | None, num_steps: int) -> None:
    if window is not None and not 0 <= window[0] < window[1] <= num_steps:
        raise DiT4EditError(f"--steps-window {text} is outside 0:{num_steps}")


def _batch(args) -> int:
    from . import batch

    run = _prepare(args, inputs=[(args.spec, "batch spec")])
    out = _output_folder(args.output)
    settings_from_args(args, run.defaults)  # the command's own options are checked before anything else
    parser = settings_parser()
    jobs = batch.read_spec(args.spec, lambda overrides: item_settings(parser, args, overrides, run.defaults))
    processes = batch.Processes(cpu=_cpu_only(args.device))
    rows = batch.run_jobs(jobs, out, lambda: load_pipeline(args, processes.device, run), processes,
                          retry_failed=args.retry_failed, disable_progress=args.quiet)
    if processes.is_main:
        print(f"{batch.summary_line(rows)}; results in {out / batch.RESULTS}")
    return 0


def _pie_bench(args) -> int:
    from . import batch, piebench

    run = _prepare(args)
    out = _output_folder(args.output)
    settings = settings_from_args(args, run.defaults)
    types = _pie_types(args.types)
    names = [name.strip() for name in (args.metrics or ",".join(piebench.METRICS)).split(",") if name.strip()]
    if not names or any(name not in piebench.METRICS for name in names):
        raise DiT4EditError(f"--metrics takes a comma-separated subset of {', '.join(piebench.METRICS)}, "
                            f"got {args.metrics!r}")
    if args.limit is not None and args.limit < 1:
        raise DiT4EditError(f"--limit must be >= 1, got {args.limit}")
    if args.mask is not None:
        raise DiT4EditError("--mask does not apply to pie-bench: one mask cannot fit every image of the benchmark")
    if args.local_blend_from_bench and settings.control is None:
        raise DiT4EditError("--local-blend-from-bench needs attention control (drop --no-attention-control)")
    jobs = piebench.read_benchmark(args.data, settings, types, args.limit, args.local_blend_from_bench)
    if not jobs:
        raise DiT4EditError(f"no PIE-Bench entries of types {args.types} in {args.data}")
    processes = batch.Processes(cpu=_cpu_only(args.device))
    device = processes.device or _device(args.device)
    say = (lambda line: print(f"dit4edit: {line}", file=sys.stderr)) if processes.is_main else (lambda line: None)
    scorer = piebench.Scorer(args.data, out, names, args.clip_model, args.dino_model, device, _device_name(device),
                             say)

    def load():
        pipe = load_pipeline(args, device, run)
        scorer.load()
        return pipe

    rows = batch.run_jobs(jobs, out, load, processes, scorer=scorer, retry_failed=args.retry_failed,
                          disable_progress=args.quiet)
    if processes.is_main:
        about = [f"model: {run.model}",
                 f"settings: steps {settings.steps}, guidance {settings.guidance}, inversion {settings.inversion}, "
                 f"attention control {'on' if settings.control else 'off'}, merging {'on' if settings.merge else 'off'}"
                 f"{', local blend from blended_word' if args.local_blend_from_bench else ''}",
                 f"processes: {processes.count}"]
        print(piebench.write_tables(out, rows, about), end="")
        print(f"{batch.summary_line(rows)}; per-image results in {out / batch.RESULTS}, tables in "
              f"{out / 'summary.md'} and {out / 'summary.csv'}")
    return 0


def _pie_types(text: str | None) -> list[str] | None:
    if text is None:
        return None
    types = [part.strip() for part in text.split(",") if part.strip()]
    if not types or any(part not in [str(k) for k in range(10)] for part in types):
        raise DiT4EditError(f"--types takes comma-separated editing type ids 0-9, got {text!r}")
    return types


def _device_name(device) -> str:
    import os
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


COMMANDS = {"batch": _batch, "pie-bench": _pie_bench, "edit": _edit, "attention": _attention, "reconstruct": _reconstruct, "generate": _generate, "make-tiny-model": _make_tiny_model}


def _serve(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DiT4EditError("the web app needs gradio: pip install 'dit4edit[app]'") from None
    from . import app as web
    from .defaults import RunSettings

    run = _prepare(args)
    web.check_port(args.host, args.port)
    if not web.is_loopback(args.host):
        print(f"dit4edit: warning: serving on {args.host}: anyone who can reach this machine can use the editor",
              file=sys.stderr)
    editor = web.Editor(load_pipeline(args, run=run), max_pixels=run.max_pixels)
    settings = web.PageSettings.starting_from(RunSettings(run.steps, run.guidance, run.inversion, run.tol),
                                             run.defaults)
    app = web.serve(editor, args.host, args.port, settings)
    print(f"dit4edit: the editor is at {app.local_url} (Ctrl-C stops it)", file=sys.stderr)
    app.block_thread()
    return 0


COMMANDS["serve"] = _serve


# --- helpers ---------------------------------------------------------------------------------------------------


def _is_inversion(path) -> bool:
    return str(path).endswith(".safetensors")


def _check_nonempty(prompt: str | None, what: str) -> None:
    if prompt is None or not prompt.strip():
        raise DiT4EditError(f"the {what} is empty" if prompt is not None else f"a {what} is needed")


def _check_inversion_path(path, *others) -> None:
    if path is None:
        return
    if not str(path).endswith(".safetensors"):
        raise DiT4EditError(f"inversion files end in .safetensors: {path}")
    if Path(path).is_dir():
        raise DiT4EditError(f"inversion path is a directory: {path}")
    if any(other is not None and Path(path).resolve() == Path(other).resolve() for other in others):
        raise DiT4EditError(f"inversion path {path} would overwrite another file of this command")
    checks.writable_file(path, "inversion")


def _output_folder(path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DiT4EditError(f"output must be a folder: {out} is a file")
    return out


def _cpu_only(name: str) -> bool:
    """Whether the processes of a distributed run work on the CPU (gloo) rather than one accelerator each."""
    import torch

    return name == "cpu" or (name == "auto" and not torch.cuda.is_available())


def load_pipeline(args, device=None, run: _Run | None = None):
    """The pipeline on `device` (default: the one --device names), from the model `run` settled (default: the
    one --model names, checked now)."""
    import torch

    from .pipeline import DiT4EditPipeline

    run = run or _prepare(args)

    if args.quiet:
        _silence_loading_bars()
    device = device or _device(args.device)
    dtype = _dtype(args.dtype, torch.device(device).type)
    _check_offload(args.offload, torch.device(device).type)
    pipe = DiT4EditPipeline.from_pretrained(run.model, torch_dtype=dtype)
    if args.offload:
        getattr(pipe, OFFLOAD[args.offload])(device=device)
    else:
        pipe.to(device)
    if args.compile:
        pipe.compile_blocks()
    if args.vae_tiling:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=args.quiet)
    torch.manual_seed(args.seed)
    return pipe


def _silence_loading_bars() -> None:
    """--quiet: the loaders' own progress bars too (the process is ours; the CLI may set library-wide options)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DiT4EditError("--device cuda asked for, but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DiT4EditError("--device mps asked for, but MPS is not available")
    return name


def _check_offload(offload: str | None, device: str) -> None:
    if offload and device == "cpu":
        raise DiT4EditError(f"--offload {offload} needs a GPU (--device cuda or mps); on the CPU the models already "
                            "sit in CPU memory")


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    return getattr(torch, name)


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
