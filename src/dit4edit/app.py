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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import checks
from . import images as imgs
from . import pictures
from .editing_methods import EDIT_METHODS
from .errors import DiT4EditError
from .methods import EDIT_MODES, INVERSION_METHODS
from .pipeline import DiT4EditPipeline, EditResult, Inversion
from .request import EditRequest, Resolved, Settings, invert, inversion_key, prepare, resolve, run

logger = logging.getLogger(__name__)

#: The shipped example and its prompts (the same as `make demo`).
EXAMPLE = Path(__file__).parent / "examples" / "red-circle.png"
EXAMPLE_SOURCE = "a red circle on a white background"
EXAMPLE_TARGET = "a blue circle on a white background"
#: The largest upload the server accepts (an image or a mask layer), and the largest side of a mask layer.
MAX_UPLOAD = "50mb"
MAX_LAYER_SIDE = 8192


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

    `settings` are the server's (`dit4edit serve --steps 10 ...`): each request's settings change them. Every
    problem with a request is a `DiT4EditError` raised before any inversion or denoising.
    """

    pipe: DiT4EditPipeline
    settings: Settings = field(default_factory=Settings)
    cache_size: int = 4
    _cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _outputs: tempfile.TemporaryDirectory = field(
        default_factory=lambda: tempfile.TemporaryDirectory(prefix="dit4edit-app-"), init=False, repr=False
    )
    _count: int = field(default=0, init=False, repr=False)

    def resolved(self) -> Resolved:
        """The server's settings resolved against the model: the page's starting values."""
        return resolve(self.settings, self.pipe.defaults, None, self.pipe.num_blocks)

    def edit(self, image, source: str, target: str, settings: Settings | None = None,
             mask: Image.Image | None = None) -> EditOutcome:
        """Edit `image` (a PIL image or a file) from `source` towards `target` with `settings` (default the
        server's); `mask` (an "L" image, 255 = editable) is resized to the image. Inverts only when no kept
        inversion matches."""
        with _warnings_logged() as warnings:
            outcome = self._edit(image, source, target, settings or self.settings, mask)
        outcome.warnings = list(dict.fromkeys(warnings))  # a prompt is checked more than once on the way
        return outcome

    def _edit(self, image, source: str, target: str, settings: Settings, mask) -> EditOutcome:
        if image is None or (isinstance(image, str) and not image):
            raise DiT4EditError("no image: upload one first")
        if mask is not None:
            size = (image if isinstance(image, Image.Image) else Image.open(image)).size
            settings = replace(settings, mask=mask.convert("L").resize(size, Image.NEAREST))
        request = EditRequest(targets=(target,), source=source, image=image, settings=settings)
        request, resolved = prepare(request, self.pipe.defaults, self.pipe.num_blocks)
        self.pipe.check_edit(request.source, request.targets, resolved, request.image.size, resolved.mask)
        with self._lock:
            key = (_digest(request.image), inversion_key(request, resolved))
            cached, reused = self._cache.get(key), key in self._cache
            if not EDIT_METHODS[resolved.method].inverts:  # its own source path: nothing to invert or keep
                cached, reused = _CachedInversion(None, 0.0), False
            elif cached is None:
                start = time.perf_counter()
                inversion = invert(self.pipe, request, resolved, disable_progress=False)
                cached = self._keep(key, _CachedInversion(inversion, time.perf_counter() - start))
            if key in self._cache:
                self._cache.move_to_end(key)
            start = time.perf_counter()
            result, inversion = run(self.pipe, request, cached.inversion, record_words=True, disable_progress=False)
            edit_seconds = time.perf_counter() - start
            download = self._save(result.images[0])
        return EditOutcome(
            edited=result.images[0], reconstruction=result.reconstruction,
            blend_mask=_blend_picture(result, request.image), word_maps=_word_pictures(result, request.image),
            download=download, reused=reused, inversion_seconds=cached.seconds, edit_seconds=edit_seconds,
            nfe=inversion.nfe if inversion is not None else 0,
        )  # fmt: skip

    def _keep(self, key, cached: _CachedInversion) -> _CachedInversion:
        self._cache[key] = cached
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return cached

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
    over the edit (none for a method without attention control: SDEdit)."""
    tiles = []
    if result.controller is None:
        return tiles
    for name, branch, base in (("source", 0, image), ("target", 1, result.images[0])):
        tiles += [(picture, f"{name}: {word}")
                  for word, picture in pictures.word_pictures(result.controller, branch, base)]
    return tiles


def _blend_picture(result: EditResult, image: Image.Image) -> Image.Image | None:
    """The editable region of the last step over the input, or None when neither a mask nor local blend applied."""
    if result.controller is None:  # a method without attention control (SDEdit)
        return None
    mask = result.controller.blend_mask(result.controller.num_steps - 1)
    return None if mask is None else pictures.mask_picture(mask, image)


def editor_mask(value) -> Image.Image | None:
    """The brushed region of an image-editor value as an "L" mask (255 = editable), or None when nothing was
    brushed: the painted (opaque) part of its layers, the meaning a mask file with transparency has too
    (`images.mask_from_image`). A layer that is not an image or is larger than `MAX_LAYER_SIDE` is refused."""
    layers = [layer for layer in (value or {}).get("layers") or [] if layer is not None]
    if not layers:
        return None
    if not all(isinstance(layer, Image.Image) for layer in layers):
        raise DiT4EditError("the brushed mask is not an image")
    size = layers[0].size
    if max(size) > MAX_LAYER_SIDE or any(layer.size != size for layer in layers):
        raise DiT4EditError(f"the brushed mask's layers must share one size of at most {MAX_LAYER_SIDE} px a side")
    painted = np.zeros(size[::-1], dtype=bool)  # (H, W)
    for layer in layers:
        painted |= np.asarray(imgs.mask_from_image(layer, use_alpha=True)) > 0
    return Image.fromarray((painted * 255).astype(np.uint8)) if painted.any() else None


# --- the page ---------------------------------------------------------------------------------------------------

TITLE = "dit4edit: text-guided image editing with diffusion transformers"
#: Events that run the model share this concurrency group: one at a time, the others wait in the queue.
MODEL_QUEUE = "model"
#: The page's settings, in the order the API takes them (its inputs 4 to 17): each is the edit option of the
#: same name (`request.OPTIONS`), except "merging", the opposite of `no_merge`.
PAGE_OPTIONS = ("steps", "guidance", "inversion", "tol", "self_replace_steps", "self_layers", "cross_replace_steps",
                "edit_mode", "reweight", "local_blend", "local_blend_changed", "merging", "direct_inversion",
                "method")


def page_values(settings: Resolved) -> dict:
    """The page's starting values for resolved settings (the server's on top of the model's)."""
    control = settings.control
    layers = None if control is None else control.self_layers
    return dict(steps=settings.steps, guidance=settings.guidance, inversion=settings.inversion, tol=settings.tol,
                self_replace_steps=control.self_replace_steps if control else 0.0,
                self_layers="" if layers is None else f"{layers[0]}:{layers[1]}",
                cross_replace_steps=control.cross_replace_steps if control else 0.0,
                edit_mode=control.edit_mode if control else EDIT_MODES[0],
                reweight=", ".join(f"{w}={f:g}" for w, f in (control.reweight if control else {}).items()),
                local_blend=" ".join(control.local_blend_words) if control else "",
                local_blend_changed=bool(control and control.local_blend_changed),
                merging=settings.merge is not None, direct_inversion=settings.direct_inversion,
                method=settings.method)


def page_options(values: dict) -> dict:
    """The edit options a page submission asks for: empty text fields left at their defaults, "merging" as
    `no_merge`, whole-number floats (a slider's or an API client's 30.0) as integers; types stay strict
    (`Settings.with_options` refuses 2.7 steps or "no" for a switch)."""
    options = {}
    for name, value in values.items():
        if isinstance(value, str) and not value.strip() and name in ("self_layers", "reweight", "local_blend"):
            continue
        if name == "steps" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if name == "merging":
            name, value = "no_merge", (not value) if isinstance(value, bool) else value
        options[name] = value
    return options


def build_app(editor: Editor):
    """The Gradio page around `editor` (a `gradio.Blocks`, queued one model call at a time), its fields set to the
    editor's settings on top of the model's (`Editor.resolved`); launch it with `serve` or `.launch()`."""
    import gradio as gr

    defaults = page_values(editor.resolved())
    # Uploads older than an hour are removed hourly, and all of them when the server stops.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## {TITLE}\nUpload an image, describe it (source prompt), describe the edit (target prompt), "
                    "press **Edit**. Another target on the same image reuses its inversion.")
        with gr.Row():
            with gr.Column():
                image = _checked_image(gr, label="image", type="filepath", sources=["upload", "clipboard"],
                                       elem_id="image")
                source = gr.Textbox(label="source prompt: what the image shows", elem_id="source")
                target = gr.Textbox(label="target prompt: what the edit should show", elem_id="target")
                run_button = gr.Button("Edit", variant="primary", elem_id="edit")
                settings = _settings_fields(gr, defaults)
                with gr.Accordion("brush mask: paint where the edit may change the image (optional; painted = "
                                  "editable, as the opaque part of a mask file)", open=False):
                    mask = _readable(gr, gr.ImageEditor(label="mask", type="pil", sources=[], layers=False,
                                                        transforms=[],
                                                        brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed")),
                                     "the brushed mask")
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
        run_button.click(_edit_handler(editor, gr), inputs=[image, source, target, *settings, mask],
                         outputs=[edited, reconstruction, blend, maps, download, status], api_name="edit",
                         concurrency_limit=1, concurrency_id=MODEL_QUEUE)
    return app.queue(default_concurrency_limit=1)


def _settings_fields(gr, defaults: dict) -> list:
    """The settings, in `PAGE_OPTIONS` order."""
    with gr.Accordion("settings", open=False):
        fields = {
            "steps": gr.Slider(1, max(100, defaults["steps"]), value=defaults["steps"], step=1, label="steps"),
            "guidance": gr.Number(value=defaults["guidance"], label="guidance (classifier-free)"),
            "inversion": gr.Dropdown(list(INVERSION_METHODS), value=defaults["inversion"], label="inversion method"),
            "tol": gr.Number(value=defaults["tol"], label="exact inversion tolerance"),
            "self_replace_steps": gr.Slider(0, 1, value=defaults["self_replace_steps"], step=0.05,
                                            label="S: fraction of steps where the edit takes the source's "
                                                  "self-attention"),
            "self_layers": gr.Textbox(value=defaults["self_layers"],
                                      label="self-attention blocks START:END (empty: the deeper half)"),
            "cross_replace_steps": gr.Slider(0, 1, value=defaults["cross_replace_steps"], step=0.05,
                                             label="cross-attention window (fraction of steps)"),
            "edit_mode": gr.Radio(list(EDIT_MODES), value=defaults["edit_mode"], label="edit mode"),
            "reweight": gr.Textbox(value=defaults["reweight"], label="reweight: WORD=VALUE, ... (target words)"),
            "local_blend": gr.Textbox(value=defaults["local_blend"],
                                      label="local blend: edit only where these words attend"),
            "local_blend_changed": gr.Checkbox(value=defaults["local_blend_changed"],
                                               label="local blend on the words that change"),
            "merging": gr.Checkbox(value=defaults["merging"], label="patch merging (large images only)"),
            "direct_inversion": gr.Checkbox(value=defaults["direct_inversion"],
                                            label="direct inversion: the edit also takes the source's error of "
                                                  "each step"),
            "method": gr.Dropdown(list(EDIT_METHODS), value=defaults["method"],
                                  label="editing method (the paper's baselines on this model)"),
        }
    return [fields[name] for name in PAGE_OPTIONS]


def _checked_image(gr, **kwargs):
    """A `gr.Image` whose unreadable uploads are a one-line message (see `_readable`)."""
    return _readable(gr, gr.Image(**kwargs))


def _readable(gr, component, what: str | None = None):
    """`component` (an image or image-editor input) with unreadable uploads as a one-line message in the page (and
    an error for an API client, naming `what` or the upload's own name, never a server path) instead of a failed
    event with a traceback in the server's log. (A wrapper on this one component's `preprocess`: a subclass would
    make Gradio write a type-stub file next to this module.)"""
    read = component.preprocess

    def preprocess(payload):
        try:
            return read(payload)
        except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for a file it cannot read
            name = what or checks.printable(getattr(payload, "orig_name", None) or "the upload")
            raise gr.Error(f"cannot read {name}: not an image or corrupt ({type(error).__name__})",
                           print_exception=False) from None

    component.preprocess = preprocess
    return component


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
    # the settings by name, in PAGE_OPTIONS order
    def edit(image, source, target, steps, guidance, inversion, tol, self_replace_steps, self_layers,
             cross_replace_steps, edit_mode, reweight, local_blend, local_blend_changed, merging, direct_inversion,
             method=None, mask=None, progress=gr.Progress(track_tqdm=True)):
        given = locals()
        try:
            options = page_options({name: given[name] for name in PAGE_OPTIONS if given[name] is not None})
            settings = editor.settings.with_options(options, "setting")
            outcome = editor.edit(image, source, target, settings, editor_mask(mask))
        except DiT4EditError as error:
            raise gr.Error(_for_client(str(error), image), print_exception=False) from None
        except Exception as error:  # a bug: the log gets the traceback, the page one line
            logger.exception("edit failed")
            raise gr.Error(f"internal error: {type(error).__name__}", print_exception=False) from None
        for warning in outcome.warnings:
            gr.Warning(warning)
        return (outcome.edited, outcome.reconstruction, outcome.blend_mask, outcome.word_maps, str(outcome.download),
                outcome.status())

    return edit


def _for_client(message: str, upload) -> str:
    """A message for a web client: the server's paths of an upload shown as the file's name only."""
    if isinstance(upload, str) and upload:
        message = message.replace(upload, Path(upload).name).replace(str(Path(upload).parent), "")
    return checks.printable(message)


def serve(editor: Editor, host: str = "127.0.0.1", port: int = 7860):
    """Build the page and start serving it on `host:port` in the background; returns the running app
    (`app.local_url`; `app.block_thread()` waits until Ctrl-C, `app.close()` stops it). Uploads are limited to
    `MAX_UPLOAD` and removed from Gradio's cache when the server stops."""
    app = build_app(editor)
    try:
        app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False, quiet=True,
                   prevent_thread_lock=True, allowed_paths=[str(EXAMPLE.parent)], max_file_size=MAX_UPLOAD)
    except OSError as error:  # the port was taken between the check and the launch
        raise DiT4EditError(f"cannot serve on {host}:{port}: {error}") from None
    return app
