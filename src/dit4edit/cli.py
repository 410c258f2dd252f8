"""The `dit4edit` command line: argparse -> pipeline; `main(argv)` returns the exit code.

Every problem with the user's input is one line on stderr and exit code 2; nothing is written on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .defaults import DEFAULTS
from .errors import DiT4EditError

EXIT_USAGE = 2
#: --offload choices -> the diffusers pipeline method that installs the offload hooks.
OFFLOAD = {"model": "enable_model_cpu_offload", "sequential": "enable_sequential_cpu_offload"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: keep them one line too
        self.exit(EXIT_USAGE, f"dit4edit: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dit4edit", description="Training-free text-guided image editing with PixArt-alpha.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    edit = commands.add_parser("edit", help="edit an image: invert with the source prompt, denoise with the target")
    edit.add_argument("input", help="input image, or an inversion saved with --save-inversion")
    edit.add_argument("-s", "--source", required=False, help="prompt describing the input image")
    edit.add_argument("-t", "--target", required=True, help="prompt describing the edited image")
    edit.add_argument("-o", "--output", required=True, help="output image (.png, .jpg, .webp)")
    edit.add_argument("--save-inversion", default=None, help="also save the inversion (.safetensors) for reuse")
    edit_settings(edit)

    rec = commands.add_parser("reconstruct", help="invert and regenerate; print how close it came (JSON)")
    rec.add_argument("input")
    rec.add_argument("-s", "--source", required=True)
    rec.add_argument("-o", "--output", required=True)
    common(rec)

    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("-p", "--prompt", required=True)
    gen.add_argument("-o", "--output", required=True)
    gen.add_argument("--width", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--save-inversion", default=None, help="save the trajectory (.safetensors) to edit it later")
    common(gen, image=False)

    att = commands.add_parser("attention", help="draw each word's cross-attention over the image, and the blend mask")
    att.add_argument("input", help="input image, or a saved inversion")
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

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weight PixArt pipeline (for trying things)")
    tiny.add_argument("output", help="folder to create")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def common(sub: argparse.ArgumentParser, *, image: bool = True) -> None:
    """Model, steps, guidance, device options; with `image`, the inversion options too."""
    sub.add_argument("--model", default=None, help="PixArt-alpha hub id or local folder in diffusers layout")
    sub.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"denoising steps (default {DEFAULTS.steps})")
    sub.add_argument("--guidance", type=float, default=DEFAULTS.guidance,
                     help=f"classifier-free guidance scale (default {DEFAULTS.guidance})")
    sub.add_argument("--seed", type=int, default=DEFAULTS.seed, help=f"random seed (default {DEFAULTS.seed})")
    sub.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    sub.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_argument("--offload", default=None, choices=sorted(OFFLOAD),
                     help="keep the models in CPU memory and move them to the GPU when used: one model at a "
                          "time (model) or one layer at a time (sequential: least memory, slowest); needs a GPU")
    sub.add_argument("--vae-tiling", action="store_true",
                     help="encode and decode in overlapping tiles, one image at a time (less memory for large "
                          "images; the tiles blend, so results differ slightly)")
    if image:
        sub.add_argument("--inversion", default=DEFAULTS.inversion, choices=["dpm-exact", "dpm", "ddim-exact", "ddim"],
                         help=f"inversion method (default {DEFAULTS.inversion})")
        sub.add_argument("--tol", type=float, default=DEFAULTS.tol,
                         help=f"exact inversion tolerance (default {DEFAULTS.tol:g})")
        sub.add_argument("--max-pixels", type=int, default=None, help="largest input accepted (default 2048x2048)")


def edit_settings(sub: argparse.ArgumentParser) -> None:
    """The options of `dit4edit edit` that say how an edit runs (shared by `batch`, `pie-bench` and the per-item
    settings of a batch spec)."""
    sub.add_argument("--free-source", action="store_true",
                     help="let the source branch run free instead of pinning it to the inversion trajectory")
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
    group.add_argument("--edit-mode", default=None, choices=["auto", "replace", "refine"])
    group.add_argument("--reweight", action="append", default=[], metavar="WORD=VALUE",
                       help="scale a target word's cross-attention (repeatable)")
    group.add_argument("--local-blend", default=None, metavar="WORDS",
                       help="edit only where these words attend (comma- or space-separated)")
    group.add_argument("--mask", default=None, help="mask image, white = editable (overrides --local-blend)")
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


class _SettingsParser(_Parser):
    """Parses one batch item's settings: an error is a `DiT4EditError` for that item, not an exit."""

    def error(self, message):
        raise DiT4EditError(message)


#: Options that hold for the whole run, not one item.
RUN_OPTIONS = ("model", "device", "dtype", "quiet", "seed", "help")


def settings_parser() -> argparse.ArgumentParser:
    parser = _SettingsParser(prog="dit4edit", add_help=False)
    edit_settings(parser)
    return parser


def item_settings(parser: argparse.ArgumentParser, args, overrides: dict):
    """`EditSettings` for one batch item: the command's options with the item's settings (keyed by option name,
    `self_replace_steps` or `self-replace-steps`; true/false for on/off flags) parsed by the same option
    definitions."""
    actions = {action.dest: action for action in parser._actions if action.dest not in RUN_OPTIONS}
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
    return settings_from_args(parser.parse_args(tokens, namespace=namespace))


def settings_from_args(args):
    """`EditSettings` from the edit options (validated: bad values are a `DiT4EditError`)."""
    from . import images as imgs
    from .batch import EditSettings

    if args.steps < 1:
        raise DiT4EditError(f"--steps must be >= 1, got {args.steps}")
    return EditSettings(steps=args.steps, guidance=args.guidance, inversion=args.inversion, tol=args.tol,
                        max_pixels=args.max_pixels or imgs.MAX_PIXELS, pin_source=not args.free_source,
                        control=control_from_args(args), merge=merge_from_args(args), mask=args.mask)


def control_from_args(args):
    """An `AttentionControl` from the CLI flags, or None for --no-attention-control."""
    from .control import AttentionControl

    if args.no_attention_control:
        return None
    fields = {}
    if args.self_replace_steps is not None:
        fields["self_replace_steps"] = args.self_replace_steps
    if args.self_layers is not None:
        fields["self_layers"] = _range(args.self_layers, "--self-layers")
    if args.cross_replace_steps is not None:
        fields["cross_replace_steps"] = args.cross_replace_steps
    if args.edit_mode is not None:
        fields["edit_mode"] = args.edit_mode
    if args.reweight:
        fields["reweight"] = dict(_word_value(item) for item in args.reweight)
    if args.local_blend:
        fields["local_blend_words"] = tuple(args.local_blend.replace(",", " ").split())
    try:
        return AttentionControl(**fields)
    except (TypeError, ValueError) as error:
        raise DiT4EditError(str(error)) from None


def merge_from_args(args):
    """A `MergeConfig` from the CLI flags, or None for --no-merge."""
    from .merging import MergeConfig

    if args.no_merge:
        return None
    fields = {"merge_ff": args.merge_ff}
    if args.merge_ratio is not None:
        fields["ratio"] = args.merge_ratio
    if args.merge_stride is not None:
        try:
            fields["stride"] = tuple(int(part) for part in args.merge_stride.lower().split("x"))
        except ValueError:
            raise DiT4EditError(f"--merge-stride takes ROWSxCOLS, got {args.merge_stride!r}") from None
    if args.merge_min_tokens is not None:
        fields["min_tokens"] = args.merge_min_tokens
    if args.merge_blocks is not None:
        fields["blocks"] = _range(args.merge_blocks, "--merge-blocks")
    if args.merge_skip_steps is not None:
        fields["skip_steps"] = args.merge_skip_steps
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
        return COMMANDS[args.command](args)
    except DiT4EditError as error:
        print(f"dit4edit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dit4edit: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(f"dit4edit: internal error: {type(error).__name__}: {error} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


# --- commands --------------------------------------------------------------------------------------------------


def _edit(args) -> int:
    from . import images as imgs
    from .pipeline import Inversion

    output = imgs.check_output_path(args.output, args.input)
    _check_inversion_path(args.save_inversion, args.input, args.output)
    is_inversion = str(args.input).endswith(".safetensors")
    _check_nonempty(args.target, "target prompt")
    control, merge = control_from_args(args), merge_from_args(args)
    if args.mask is not None:
        imgs.load_image(args.mask)  # readable before any work
    # Everything that can be checked without the model is checked before loading it.
    if is_inversion:
        inversion = Inversion.load(args.input)
        if args.source and args.source != inversion.source_prompt:
            raise DiT4EditError(f"the inversion was made with the source prompt {inversion.source_prompt!r}")
    else:
        _check_nonempty(args.source, "source prompt")
        image = imgs.load_image(args.input, args.max_pixels or imgs.MAX_PIXELS)
    pipe = load_pipeline(args)
    pipe.check_prompt(args.target, "target prompt")
    if not is_inversion:
        inversion = pipe.invert(image, args.source, args.steps, args.guidance, args.inversion, args.tol,
                                args.max_pixels or imgs.MAX_PIXELS)
    if args.save_inversion:
        inversion.save(args.save_inversion)
    result = pipe.edit(inversion, args.target, guidance_scale=args.guidance, pin_source=not args.free_source,
                       control=control, mask=args.mask, merge=merge)
    imgs.save_image(result.images[0], output)
    _say(args, f"wrote {output}")
    return 0


def _reconstruct(args) -> int:
    from . import images as imgs

    output = imgs.check_output_path(args.output, args.input)
    _check_nonempty(args.source, "source prompt")
    image = imgs.load_image(args.input, args.max_pixels or imgs.MAX_PIXELS)
    pipe = load_pipeline(args)
    image, stats = pipe.reconstruct(image, args.source, args.steps, args.guidance, args.inversion, args.tol,
                                    args.max_pixels or imgs.MAX_PIXELS)
    imgs.save_image(image, output)
    print(json.dumps({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in stats.items()}))
    return 0


def _generate(args) -> int:
    import torch

    from . import images as imgs

    output = imgs.check_output_path(args.output)
    _check_inversion_path(args.save_inversion, None, args.output)
    _check_nonempty(args.prompt, "prompt")
    pipe = load_pipeline(args)
    native = pipe.default_size()
    width, height = args.width or native, args.height or native
    imgs.check_size((width, height))
    generator = torch.Generator().manual_seed(args.seed)
    image, inversion = pipe.generate(args.prompt, height, width, args.steps, args.guidance, generator)
    if args.save_inversion:
        inversion.save(args.save_inversion)
    imgs.save_image(image, output)
    _say(args, f"wrote {output}")
    return 0


def _make_tiny_model(args) -> int:
    from .pipeline import DiT4EditPipeline
    from .tiny import tiny_components

    folder = Path(args.output)
    if folder.exists() and any(folder.iterdir()):
        raise DiT4EditError(f"{folder} exists and is not empty")
    DiT4EditPipeline(**tiny_components(args.seed)).save_pretrained(folder)
    print(f"wrote a tiny random-weight PixArt pipeline to {folder} (random weights: its images are noise)")
    return 0


def _attention(args) -> int:
    from . import images as imgs
    from . import pictures
    from .pipeline import Inversion

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise DiT4EditError(f"output must be a folder: {out} is a file")
    is_inversion = str(args.input).endswith(".safetensors")
    window = _range(args.steps_window, "--steps-window") if args.steps_window else None
    control, merge = control_from_args(args), merge_from_args(args)
    if is_inversion:
        inversion = Inversion.load(args.input)
        image = None
    else:
        _check_nonempty(args.source, "source prompt")
        image = imgs.load_image(args.input, args.max_pixels or imgs.MAX_PIXELS)
    pipe = load_pipeline(args)
    if not is_inversion:
        inversion = pipe.invert(image, args.source, args.steps, args.guidance, args.inversion, args.tol)
    target = args.target or inversion.source_prompt
    result = pipe.edit(inversion, target, guidance_scale=args.guidance, control=control, mask=args.mask,
                       merge=merge, record_words=True)
    controller = result.controller
    steps = range(*window) if window else None
    if steps is not None and not (0 <= steps.start < steps.stop <= inversion.num_inference_steps):
        raise DiT4EditError(f"--steps-window {args.steps_window} is outside 0:{inversion.num_inference_steps}")
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


def _batch(args) -> int:
    from . import batch

    out = _output_folder(args.output)
    settings_from_args(args)  # the command's own options are checked before anything else
    parser = settings_parser()
    jobs = batch.read_spec(args.spec, lambda overrides: item_settings(parser, args, overrides))
    processes = batch.Processes(cpu=_cpu_only(args.device))
    rows = batch.run_jobs(jobs, out, lambda: load_pipeline(args, processes.device), processes,
                          retry_failed=args.retry_failed, disable_progress=args.quiet)
    if processes.is_main:
        print(f"{batch.summary_line(rows)}; results in {out / batch.RESULTS}")
    return 0


COMMANDS = {"batch": _batch, "edit": _edit, "attention": _attention, "reconstruct": _reconstruct, "generate": _generate, "make-tiny-model": _make_tiny_model}


def _serve(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DiT4EditError("the web app needs gradio: pip install 'dit4edit[app]'") from None
    from . import app as web
    from .defaults import RunSettings
    from .images import MAX_PIXELS

    web.check_port(args.host, args.port)
    if not web.is_loopback(args.host):
        print(f"dit4edit: warning: serving on {args.host}: anyone who can reach this machine can use the editor",
              file=sys.stderr)
    editor = web.Editor(load_pipeline(args), max_pixels=args.max_pixels or MAX_PIXELS)
    settings = web.PageSettings.starting_from(RunSettings(args.steps, args.guidance, args.inversion, args.tol))
    web.serve(editor, args.host, args.port, settings)
    return 0


COMMANDS["serve"] = _serve


# --- helpers ---------------------------------------------------------------------------------------------------


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


def _output_folder(path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DiT4EditError(f"output must be a folder: {out} is a file")
    return out


def _cpu_only(name: str) -> bool:
    """Whether the processes of a distributed run work on the CPU (gloo) rather than one accelerator each."""
    import torch

    return name == "cpu" or (name == "auto" and not torch.cuda.is_available())


def load_pipeline(args, device=None):
    """The pipeline on `device` (default: the one --device names)."""
    import torch

    from .pipeline import DiT4EditPipeline, default_model

    model = args.model or default_model()
    if args.quiet:
        _silence_loading_bars()
    device = device or _device(args.device)
    dtype = _dtype(args.dtype, torch.device(device).type)
    _check_offload(args.offload, torch.device(device).type)
    pipe = DiT4EditPipeline.from_pretrained(model, torch_dtype=dtype)
    if args.offload:
        getattr(pipe, OFFLOAD[args.offload])(device=device)
    else:
        pipe.to(device)
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
