"""`dit4edit serve`: a Gradio editor over one loaded pipeline (the package's `[app]` extra).

`Editor` is the app without a browser: it validates a request, inverts an image once per (image, source prompt,
inversion settings) and keeps the last few inversions, so another target prompt on the same image edits at once.
`build_app` lays the page out around one `Editor`; the edit is also the API endpoint `/edit` (image, source prompt,
target prompt, then the settings, each optional) whose first output is the edited image.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from . import images as imgs
from . import pictures
from .control import AttentionControl
from .defaults import DEFAULTS, RunSettings
from .errors import DiT4EditError
from .methods import EDIT_MODES, INVERSION_METHODS
from .model_folder import ModelDefaults
from .pipeline import DEFAULT_MERGE, DiT4EditPipeline, EditResult, Inversion

logger = logging.getLogger(__name__)

#: The shipped example and its prompts (the same as `make demo`).
EXAMPLE = Path(__file__).parent / "examples" / "red-circle.png"
EXAMPLE_SOURCE = "a red circle on a white background"
EXAMPLE_TARGET = "a blue circle on a white background"
#: The attention-control defaults the app starts from (those of `AttentionControl`, like the command line's).
CONTROL_DEFAULTS = AttentionControl()


def _page_control(control: AttentionControl) -> dict:
    """The page's attention-control fields of `control`."""
    layers = "" if control.self_layers is None else f"{control.self_layers[0]}:{control.self_layers[1]}"
    return dict(self_replace_steps=control.self_replace_steps, self_layers=layers,
                cross_replace_steps=control.cross_replace_steps, edit_mode=control.edit_mode,
                blend_changed=control.local_blend_changed)


@dataclass(frozen=True)
class PageSettings:
    """The settings of one edit, as the page and the API take them (text fields as the command line's flags do).

    steps, guidance, inversion, tol: the run's settings (defaults: `dit4edit.defaults.DEFAULTS`).
    self_replace_steps, cross_replace_steps, edit_mode: `AttentionControl` fields (defaults: its own).
    self_layers: "START:END" blocks with self-attention control; "" = the control's default (the deeper half).
    reweight: "WORD=VALUE" items separated by commas; "" = none.
    local_blend: words whose attention bounds the edit, separated by commas or spaces; "" = no local blend.
    blend_changed: also bound the edit by the words that differ between the prompts (`AttentionControl`'s
        `local_blend_changed`).
    merging: patch merging with the pipeline's default `MergeConfig` (it applies to large images only).
    direct_inversion: the edit also takes the pinned source's error of each step (`DiT4EditPipeline.edit`).
    """

    steps: int = DEFAULTS.steps
    guidance: float = DEFAULTS.guidance
    inversion: str = DEFAULTS.inversion
    tol: float = DEFAULTS.tol
    self_replace_steps: float = CONTROL_DEFAULTS.self_replace_steps
    self_layers: str = ""
    cross_replace_steps: float = CONTROL_DEFAULTS.cross_replace_steps
    edit_mode: str = CONTROL_DEFAULTS.edit_mode
    reweight: str = ""
    local_blend: str = ""
    blend_changed: bool = CONTROL_DEFAULTS.local_blend_changed
    merging: bool = True
    direct_inversion: bool = False

    @classmethod
    def starting_from(cls, run: RunSettings, model: ModelDefaults | None = None) -> PageSettings:
        """The app's defaults when the server was started with other run settings (`dit4edit serve --steps 10`),
        the page's control fields from the model's attention control (`model`, its `dit4edit.json`)."""
        return cls(steps=run.steps, guidance=run.guidance, inversion=run.inversion, tol=run.tol,
                   **_page_control((model or ModelDefaults()).attention_control()))

    @classmethod
    def of_model(cls, pipe: DiT4EditPipeline) -> PageSettings:
        """The defaults of the model the pipeline was loaded from (its `dit4edit.json`, else the library's)."""
        model = pipe.defaults
        return cls(steps=model.num_inference_steps, guidance=model.guidance_scale, inversion=model.inversion,
                   **_page_control(model.attention_control()))

    def control(self, model: ModelDefaults | None = None) -> AttentionControl:
        """The attention control these settings ask for, parsed and validated as the command line's flags are, on
        top of the model's (`model`: its settings the page does not show stay as the model has them)."""
        from .cli import control_from_args

        flags = SimpleNamespace(
            no_attention_control=False, self_replace_steps=float(self.self_replace_steps),
            self_layers=self.self_layers.strip() or None, cross_replace_steps=float(self.cross_replace_steps),
            cross_replace_changed=None,
            edit_mode=self.edit_mode, reweight=[item for item in self.reweight.split(",") if item.strip()],
            local_blend=self.local_blend.strip() or None, local_blend_changed=bool(self.blend_changed),
        )  # fmt: skip
        return control_from_args(flags, model)

    def inversion_key(self) -> tuple:
        """What an inversion depends on besides the image and the source prompt."""
        return int(self.steps), float(self.guidance), self.inversion, float(self.tol)


@dataclass
class EditOutcome:
    """What the page shows after an edit."""

    edited: Image.Image
    reconstruction: Image.Image  # the source branch: what the edit keeps
    blend_mask: Image.Image | None  # the editable region over the input, when a mask or local blend applies
    word_maps: list[tuple[Image.Image, str]]  # (heat map, "source: word" / "target: word")
    download: Path  # the edited image as a PNG file
    reused: bool  # True when the inversion came from the cache
    inversion_seconds: float  # how long the inversion took (when reused: the time saved)
    edit_seconds: float
    nfe: int  # model evaluations of the inversion
    warnings: list[str] = field(default_factory=list)  # what the library warned about during this edit

    def status(self) -> str:
        """How the inversion was obtained and what that cost or saved, in one line; then one line per warning."""
        if self.reused:
            head = (f"Reused the inversion of this image and source prompt: saved {self.inversion_seconds:.1f} s "
                    f"({self.nfe} model evaluations).")
        else:
            head = f"Inverted in {self.inversion_seconds:.1f} s ({self.nfe} model evaluations)."
        return "\n\n".join([f"{head} Edited in {self.edit_seconds:.1f} s.", *(f"Warning: {w}" for w in self.warnings)])


@dataclass
class _CachedInversion:
    inversion: Inversion
    seconds: float


@dataclass
class Editor:
    """One loaded pipeline serving edits, one at a time; the last `cache_size` inversions are kept.

    Every problem with a request is a `DiT4EditError` raised before any inversion or denoising.
    """

    pipe: DiT4EditPipeline
    max_pixels: int = imgs.MAX_PIXELS
    cache_size: int = 4
    _cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _outputs: tempfile.TemporaryDirectory = field(
        default_factory=lambda: tempfile.TemporaryDirectory(prefix="dit4edit-app-"), init=False, repr=False
    )
    _count: int = field(default=0, init=False, repr=False)

    def edit(self, image, source: str, target: str, settings: PageSettings = PageSettings(),
             mask: Image.Image | None = None) -> EditOutcome:
        """Edit `image` (a PIL image or a file) from `source` towards `target`; `mask` (white = editable) is
        resized to the image. Inverts only when no kept inversion matches."""
        with _warnings_logged() as warnings:
            outcome = self._edit(image, source, target, settings, mask)
        outcome.warnings = list(dict.fromkeys(warnings))  # a prompt is checked more than once on the way
        return outcome

    def _edit(self, image, source: str, target: str, settings: PageSettings, mask) -> EditOutcome:
        image = self._load(image)
        for prompt, what in ((source, "source prompt"), (target, "target prompt")):
            self.pipe.check_prompt(prompt if isinstance(prompt, str) else "", what)
        self.pipe._schedule(int(settings.steps))  # the pipeline's own check of the step count (cheap)
        control = settings.control(self.pipe.defaults)
        merge = DEFAULT_MERGE if settings.merging else None
        mask = None if mask is None else mask.convert("L").resize(image.size, Image.NEAREST)
        self._check_controls(image, source, target, int(settings.steps), control, mask)
        with self._lock:
            inversion, seconds, reused = self._inversion(image, source, settings)
            start = time.perf_counter()
            result = self.pipe.edit(inversion, target, guidance_scale=float(settings.guidance), control=control,
                                    mask=mask, merge=merge, record_words=True, disable_progress=False,
                                    direct_inversion=bool(settings.direct_inversion))
            edit_seconds = time.perf_counter() - start
            download = self._save(result.images[0])
        return EditOutcome(
            edited=result.images[0], reconstruction=result.reconstruction, blend_mask=_blend_picture(result, image),
            word_maps=_word_pictures(result, image), download=download, reused=reused, inversion_seconds=seconds,
            edit_seconds=edit_seconds, nfe=inversion.nfe,
        )  # fmt: skip

    def _load(self, image) -> Image.Image:
        if image is None or (isinstance(image, str) and not image):
            raise DiT4EditError("no image: upload one first")
        if isinstance(image, Image.Image):
            imgs.check_size(image.size, self.max_pixels)
            return imgs.to_rgb(image)
        return imgs.load_image(image, self.max_pixels)

    def _check_controls(self, image, source, target, steps, control, mask) -> None:
        """Build the edit's attention controller on a stand-in inversion of the right shape: every setting that
        depends on the prompts or the model (local-blend words, reweighted words, block ranges, the mask) fails
        here, before the inversion."""
        width, height = imgs.work_size(image.size)
        factor = self.pipe.vae_scale_factor
        channels = self.pipe.transformer.config.in_channels
        stand_in = Inversion(trajectory=torch.zeros(1, channels, height // factor, width // factor),
                             source_prompt=source, num_inference_steps=steps, guidance_scale=1.0, method="stand-in",
                             original_size=image.size)
        self.pipe.make_controller(control, stand_in, [target], mask, record_words=True)

    def _inversion(self, image: Image.Image, source: str, settings: PageSettings) -> tuple[Inversion, float, bool]:
        key = (_digest(image), source, settings.inversion_key())
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached.inversion, cached.seconds, True
        steps, guidance, method, tol = settings.inversion_key()
        start = time.perf_counter()
        inversion = self.pipe.invert(image, source, steps, guidance, method, tol, self.max_pixels,
                                     disable_progress=False)
        cached = _CachedInversion(inversion, time.perf_counter() - start)
        self._cache[key] = cached
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return inversion, cached.seconds, False

    def _save(self, image: Image.Image) -> Path:
        self._count += 1
        return imgs.save_image(image, Path(self._outputs.name) / f"dit4edit-edit-{self._count}.png")


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]):
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@contextlib.contextmanager
def _warnings_logged():
    """The messages the package logs at WARNING and above while the block runs (the page shows them)."""
    records: list[str] = []
    handler, package = _ListHandler(records), logging.getLogger(__name__.rpartition(".")[0])
    package.addHandler(handler)
    try:
        yield records
    finally:
        package.removeHandler(handler)


def _digest(image: Image.Image) -> str:
    """Identifies an image by its pixels (the same picture uploaded twice has two file names)."""
    return hashlib.sha256(f"{image.size}{image.mode}".encode() + image.tobytes()).hexdigest()


def _word_pictures(result: EditResult, image: Image.Image) -> list[tuple[Image.Image, str]]:
    """Each word's cross-attention, as `dit4edit attention` draws it: source words over the input, target words
    over the edit."""
    tiles = []
    for name, branch, base in (("source", 0, image), ("target", 1, result.images[0])):
        tiles += [(picture, f"{name}: {word}")
                  for word, picture in pictures.word_pictures(result.controller, branch, base)]
    return tiles


def _blend_picture(result: EditResult, image: Image.Image) -> Image.Image | None:
    """The editable region of the last step over the input, or None when neither a mask nor local blend applied."""
    mask = result.controller.blend_mask(result.controller.num_steps - 1)
    return None if mask is None else pictures.mask_picture(mask, image)


def editor_mask(value) -> Image.Image | None:
    """The brushed region of an image-editor value (white = editable), or None when nothing was brushed."""
    layers = [layer for layer in (value or {}).get("layers") or [] if layer is not None]
    if not layers:
        return None
    painted = np.zeros(layers[0].size[::-1], dtype=bool)  # (H, W)
    for layer in layers:
        alpha = np.asarray(layer.convert("RGBA").resize(layers[0].size, Image.NEAREST))[..., 3]
        painted |= alpha > 0
    return Image.fromarray((painted * 255).astype(np.uint8)) if painted.any() else None


# --- the page ---------------------------------------------------------------------------------------------------

TITLE = "dit4edit: text-guided image editing with diffusion transformers"
#: Events that run the model share this concurrency group: one at a time, the others wait in the queue.
MODEL_QUEUE = "model"


def build_app(editor: Editor, defaults: PageSettings | None = None):
    """The Gradio page around `editor` (a `gradio.Blocks`, queued one model call at a time), its fields set to
    `defaults` (None: the model's own, `PageSettings.of_model`); launch it with `serve` or `.launch()`."""
    import gradio as gr

    defaults = defaults or PageSettings.of_model(editor.pipe)

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\nUpload an image, describe it (source prompt), describe the edit (target prompt), "
                    "press **Edit**. Another target on the same image reuses its inversion.")
        with gr.Row():
            with gr.Column():
                image = _checked_image(gr, label="image", type="filepath", sources=["upload", "clipboard"],
                                       elem_id="image")
                source = gr.Textbox(label="source prompt: what the image shows", elem_id="source")
                target = gr.Textbox(label="target prompt: what the edit should show", elem_id="target")
                run = gr.Button("Edit", variant="primary", elem_id="edit")
                settings = _settings_fields(gr, defaults)
                with gr.Accordion("brush mask: paint where the edit may change the image (optional)", open=False):
                    mask = gr.ImageEditor(label="mask", type="pil", sources=[], layers=False, transforms=[],
                                          brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"))
                gr.Examples([[str(EXAMPLE), EXAMPLE_SOURCE, EXAMPLE_TARGET]], inputs=[image, source, target])
            with gr.Column():
                with gr.Row():
                    edited = gr.Image(label="edit", type="pil", format="png", elem_id="edited")
                    reconstruction = gr.Image(label="source reconstruction", type="pil", format="png")
                status = gr.Markdown(elem_id="status")
                download = gr.File(label="download the edit (PNG)")
                blend = gr.Image(label="local-blend mask (bright: editable)", type="pil", format="png", height=220)
                maps = gr.Gallery(label="cross-attention per word", columns=4, height="auto")
        image.change(_mask_background, inputs=image, outputs=mask, api_visibility="private")
        run.click(_edit_handler(editor, gr), inputs=[image, source, target, *settings, mask],
                  outputs=[edited, reconstruction, blend, maps, download, status], api_name="edit",
                  concurrency_limit=1, concurrency_id=MODEL_QUEUE)
    return app.queue(default_concurrency_limit=1)


def _settings_fields(gr, defaults: PageSettings) -> list:
    """The settings, in `PageSettings` field order (the API's inputs 4 to 16)."""
    with gr.Accordion("settings", open=False):
        values = [
            gr.Slider(1, max(100, defaults.steps), value=defaults.steps, step=1, label="steps"),
            gr.Number(value=defaults.guidance, label="guidance (classifier-free)"),
            gr.Dropdown(list(INVERSION_METHODS), value=defaults.inversion, label="inversion method"),
            gr.Number(value=defaults.tol, label="exact inversion tolerance"),
            gr.Slider(0, 1, value=defaults.self_replace_steps, step=0.05,
                      label="S: fraction of steps where the edit takes the source's self-attention"),
            gr.Textbox(value=defaults.self_layers, label="self-attention blocks START:END (empty: the deeper half)"),
            gr.Slider(0, 1, value=defaults.cross_replace_steps, step=0.05,
                      label="cross-attention window (fraction of steps)"),
            gr.Radio(list(EDIT_MODES), value=defaults.edit_mode, label="edit mode"),
            gr.Textbox(value=defaults.reweight, label="reweight: WORD=VALUE, ... (target words)"),
            gr.Textbox(value=defaults.local_blend, label="local blend: edit only where these words attend"),
            gr.Checkbox(value=defaults.blend_changed, label="local blend on the words that change"),
            gr.Checkbox(value=defaults.merging, label="patch merging (large images only)"),
            gr.Checkbox(value=defaults.direct_inversion,
                        label="direct inversion: the edit also takes the source's error of each step"),
        ]
    assert len(values) == len(fields(PageSettings))
    return values


def _checked_image(gr, **kwargs):
    """A `gr.Image` whose unreadable uploads are a one-line message in the page (and an error for an API client)
    instead of a failed event with a traceback in the server's log. (A wrapper on this one component's
    `preprocess`: a subclass would make Gradio write a type-stub file next to this module.)"""
    image = gr.Image(**kwargs)
    read = image.preprocess

    def preprocess(payload):
        try:
            return read(payload)
        except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for a file it cannot read
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"cannot read {name}: not an image or corrupt ({type(error).__name__})",
                           print_exception=False) from None

    image.preprocess = preprocess
    return image


def check_port(host: str, port: int) -> None:
    """One-line `DiT4EditError` unless this process can listen on `host:port` (checked before the model loads)."""
    if not 1 <= port <= 65535:
        raise DiT4EditError(f"--port must be between 1 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise DiT4EditError(f"cannot listen on {host}: {error.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does
        try:
            probe.bind(address)
        except OSError as error:
            raise DiT4EditError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mask_background(path):
    """Show the uploaded image under the brush."""
    return None if not path else {"background": path, "layers": [], "composite": path}


def _edit_handler(editor: Editor, gr):
    def edit(image, source, target, steps, guidance, inversion, tol, self_replace_steps, self_layers,
             cross_replace_steps, edit_mode, reweight, local_blend, blend_changed, merging, direct_inversion,
             mask=None,
             progress=gr.Progress(track_tqdm=True)):
        try:
            settings = PageSettings(int(steps), float(guidance), inversion, float(tol), float(self_replace_steps),
                                    self_layers or "", float(cross_replace_steps), edit_mode, reweight or "",
                                    local_blend or "", bool(blend_changed), bool(merging), bool(direct_inversion))
            outcome = editor.edit(image, source, target, settings, editor_mask(mask))
        except DiT4EditError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except (TypeError, ValueError) as error:  # a setting of the wrong type through the API
            raise gr.Error(f"bad setting: {error}", print_exception=False) from None
        except Exception as error:  # a bug: the log gets the traceback, the page one line
            logger.exception("edit failed")
            raise gr.Error(f"internal error: {type(error).__name__}: {error}", print_exception=False) from None
        for warning in outcome.warnings:
            gr.Warning(warning)
        return (outcome.edited, outcome.reconstruction, outcome.blend_mask, outcome.word_maps, str(outcome.download),
                outcome.status())

    return edit


def serve(editor: Editor, host: str = "127.0.0.1", port: int = 7860, defaults: PageSettings | None = None):
    """Build the page and start serving it on `host:port` in the background; returns the running app
    (`app.local_url`; `app.block_thread()` waits until Ctrl-C, `app.close()` stops it)."""
    app = build_app(editor, defaults)
    try:
        app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False, quiet=True,
                   prevent_thread_lock=True, allowed_paths=[str(EXAMPLE.parent)])
    except OSError as error:  # the port was taken between the check and the launch
        raise DiT4EditError(f"cannot serve on {host}:{port}: {error}") from None
    return app
