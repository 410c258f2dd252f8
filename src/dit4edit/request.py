"""One edit request, resolved once, run by one function.

Every surface (the command line, a batch spec line, a PIE-Bench entry, the web page, `pipe(...)`) builds an
`EditRequest`: the input (an image or a saved inversion), the source prompt, the target prompts and the user's
`Settings`. `resolve` fills what the user left open from the model folder's `dit4edit.json` (`ModelDefaults`), then
the library's defaults, and validates everything, without a model; `run` inverts (or takes the saved inversion),
edits and returns the `EditResult`. Adding an option means one field here (or one entry of `CONTROL_OPTIONS` /
`MERGE_OPTIONS`), one command-line flag and one page control.

Options by name (`Settings.from_options`): the same names are the command line's flags (`--self-replace-steps`),
the keys of a batch spec line (`"self_replace_steps": 0.5`) and the web page's fields.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from . import checks
from . import images as imgs
from .defaults import DEFAULTS
from .editing_methods import EDIT_METHODS
from .errors import DiT4EditError
from .methods import EDIT_MODES, INVERSION_METHODS
from .model_folder import ModelDefaults

# Attention control, merging, inversion files and masks import torch: they are imported inside the functions that
# need them, so the command line resolves and checks a request before torch loads.

#: Layouts of an edit batch under guidance (`BatchLayout`): 4 rows (the source's unconditional row too) or 3.
ROWS = (3, 4)
#: The largest input accepted when the user sets no limit, in pixels (`--max-pixels`).
MAX_PIXELS = 2048 * 2048
#: An empty set of changes: the model's attention control, or the library's patch merging, as they are.
UNCHANGED: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Settings:
    """What the user chose for one inversion and edit; None = the model's default, else the library's.

    steps, guidance, inversion: denoising steps, classifier-free guidance, inversion method (the model folder's
        `dit4edit.json` sets their defaults). Editing a saved inversion, steps and method are the file's.
    tol: stopping tolerance of the exact inversions.
    seed: random seed (noise of generation and SDEdit).
    control: the attention control: a mapping of `AttentionControl` fields to change on top of the model's control
        (the empty mapping: the model's as it is), an `AttentionControl` used as it is, or None for none.
    merge: patch merging (ToMe): a mapping of `MergeConfig` fields to change (empty: the library's), a
        `MergeConfig`, or None for none.
    mask: a mask image (path or PIL image) of the input's size; editable where light (or painted, for a mask with
        transparency, see `images.mask_from_image`): nothing outside it changes.
    pin_source: the source branch follows the inversion's trajectory (else it runs free).
    direct_inversion: every target also takes the pinned source's error of each step (PnP Inversion).
    rows: 4 or 3 rows per edit batch under guidance (3 leaves out the source's unconditional row).
    max_pixels: the largest input accepted, in pixels (the operator's limit: a batch line cannot raise it).
    method: the editing method (`editing_methods.EDIT_METHODS`; None = "dit4edit"): its attention control, on top
        of the model's and under the user's changes, its inversion or none, its step.
    strength: how far SDEdit noises the input, a fraction of the schedule in (0, 1] (sdedit only; default 0.6).
    """

    steps: int | None = None
    guidance: float | None = None
    inversion: str | None = None
    tol: float | None = None
    seed: int | None = None
    control: Any = field(default_factory=lambda: UNCHANGED)
    merge: Any = field(default_factory=lambda: UNCHANGED)
    mask: Any = None
    pin_source: bool = True
    direct_inversion: bool = False
    rows: int = 4
    max_pixels: int | None = None
    method: str | None = None
    strength: float | None = None

    def __post_init__(self):
        for name in ("control", "merge"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    def with_options(self, options: Mapping[str, Any], what: str = "setting") -> Settings:
        """These settings with `options` (by name, see `OPTIONS`) changed on top; control and merging changes add
        to the ones already made. Strictly typed: a one-line `DiT4EditError` names a bad option."""
        if not isinstance(options, Mapping):
            raise DiT4EditError(f"{what}s must be an object of named options, got {type(options).__name__}")
        changes: dict[str, Any] = {}
        switches: dict[str, bool] = {}
        control = dict(self.control) if isinstance(self.control, Mapping) else self.control
        merge = dict(self.merge) if isinstance(self.merge, Mapping) else self.merge
        for name, value in options.items():
            label = checks.printable(str(name))  # as the user wrote it: "--self-layers", "self_layers"
            key = str(name).lstrip("-").replace("-", "_")
            if key in CONTROL_OPTIONS:
                target, parse = CONTROL_OPTIONS[key]
                control = _changed(control, target, parse(value, label), label)
            elif key in MERGE_OPTIONS:
                target, parse = MERGE_OPTIONS[key]
                merge = _changed(merge, target, parse(value, label), label)
            elif key in SWITCHES:
                switches[key] = _flag(value, label)
            elif key in SETTING_OPTIONS:
                changes[key] = SETTING_OPTIONS[key](value, label)
            else:
                raise DiT4EditError(f"unknown {what} {checks.printable(str(name))!r} (known: {', '.join(OPTIONS)})")
        # The switches win over field changes; false turns a part that was off back on (with its defaults).
        if "no_attention_control" in switches:
            control = None if switches["no_attention_control"] else (UNCHANGED if control is None else control)
        if "no_merge" in switches:
            merge = None if switches["no_merge"] else (UNCHANGED if merge is None else merge)
        if "free_source" in switches:
            changes["pin_source"] = not switches["free_source"]
        return replace(self, control=control, merge=merge, **changes)


def _changed(config, name: str, value, key: str):
    """A control / merge setting with one field changed: a mapping of changes grows, an object is replaced."""
    if config is None:  # turned off: a field change does not turn it back on
        return None
    if isinstance(value, Mapping):  # {word: factor} settings add up: the command's, then the item's
        old = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        value = {**(old or {}), **value}
    if isinstance(config, Mapping):
        return {**config, name: value}
    try:
        return replace(config, **{name: value})
    except (TypeError, ValueError) as error:
        raise DiT4EditError(f"{key}: {error}") from None


@dataclass(frozen=True)
class Resolved:
    """Settings with nothing left open, validated: what an edit runs with."""

    steps: int
    guidance: float
    inversion: str
    tol: float
    seed: int
    control: Any  # AttentionControl or None
    merge: Any  # MergeConfig or None
    mask: Any
    pin_source: bool
    direct_inversion: bool
    rows: int
    max_pixels: int
    method: str = "dit4edit"
    strength: float | None = None  # sdedit's, else None


def resolve(settings: Settings, defaults=None, saved=None, num_blocks: int | None = None) -> Resolved:
    """`settings` with what they leave open filled from `defaults` (the model's `ModelDefaults`; None = the
    library's) and, when editing a saved inversion `saved`, from the file (its steps and method are fixed: another
    value is an error; its guidance is the default). With `num_blocks` (the model's transformer blocks) the block
    ranges are checked too. Needs no model; every problem is a one-line `DiT4EditError`."""
    if not isinstance(settings, Settings):
        raise DiT4EditError(f"settings must be Settings, got {type(settings).__name__}")
    defaults = defaults if defaults is not None else ModelDefaults()
    steps = _fixed_by_file(settings.steps, saved and saved.num_inference_steps, "steps", saved)
    method = _fixed_by_file(settings.inversion, saved and saved.method, "inversion", saved)
    steps = checks.steps(defaults.num_inference_steps if steps is None else steps)
    if saved is None:
        method = checks.inversion_method(defaults.inversion if method is None else method)
    guidance = settings.guidance if settings.guidance is not None else (
        saved.guidance_scale if saved is not None else defaults.guidance_scale)
    if settings.direct_inversion and not settings.pin_source:
        raise DiT4EditError("direct inversion corrects the targets by the pinned source's error: it cannot run with "
                            "a free source branch (--free-source)")
    rows = checks.integer(settings.rows, "rows", 3, 4)
    if rows == 3 and not settings.pin_source:
        raise DiT4EditError("the 3-row layout has no unconditional source row: it needs the pinned source branch")
    from .editing_methods import SDEDIT_STRENGTH, method as edit_method

    name = "dit4edit" if settings.method is None else settings.method
    chosen = edit_method(name)
    if saved is not None and not chosen.inverts:
        raise DiT4EditError(f"the {name} method does not invert: it edits an input image, not a saved inversion")
    if not chosen.inverts and settings.direct_inversion:
        raise DiT4EditError(f"direct inversion corrects the targets by an inversion's error: the {name} method does "
                            "not invert")
    if name == "sdedit" and settings.mask is not None:
        raise DiT4EditError("the sdedit method takes no mask (it has no source branch to keep outside it)")
    if settings.strength is not None and name != "sdedit":
        raise DiT4EditError(f"strength is an option of the sdedit method, not of {name}")
    strength = None if name != "sdedit" else checks.number(
        SDEDIT_STRENGTH if settings.strength is None else settings.strength, "strength", 0.0, 1.0, low_open=True)
    if chosen.control is None:  # the method installs no attention control
        control = None
    elif isinstance(settings.control, Mapping):  # the method's changes, then the user's
        control = _control({**chosen.control, **settings.control}, defaults)
    else:
        control = _control(settings.control, defaults)
    merge = _merge(settings.merge)
    if num_blocks is not None:
        if control is not None:
            control.self_blocks(num_blocks)
            control.blend_blocks(num_blocks)
        if merge is not None:
            merge.block_indices(num_blocks)
    return Resolved(
        steps=steps, guidance=checks.guidance(guidance), inversion=method,
        tol=checks.tolerance(DEFAULTS.tol if settings.tol is None else settings.tol),
        seed=checks.seed(DEFAULTS.seed if settings.seed is None else settings.seed),
        control=control, merge=merge, mask=settings.mask, pin_source=_flag(settings.pin_source, "pin_source"),
        direct_inversion=_flag(settings.direct_inversion, "direct_inversion") or chosen.direct_inversion, rows=rows,
        max_pixels=checks.integer(MAX_PIXELS if settings.max_pixels is None else settings.max_pixels,
                                  "max_pixels", 1),
        method=name, strength=strength,
    )  # fmt: skip


def _fixed_by_file(value, saved_value, name: str, saved):
    if saved is None or value is None:
        return value if saved is None else saved_value
    if value != saved_value:
        raise DiT4EditError(f"--{name} {value} conflicts with the saved inversion, made with {saved_value} "
                            f"{name}; leave it unset or invert the image again")
    return value


def _control(control, defaults):
    from .control import AttentionControl

    if control is None or isinstance(control, AttentionControl):
        return control
    if isinstance(control, Mapping):
        return defaults.attention_control(**control)
    raise DiT4EditError(f"control must be changes to the attention control, an AttentionControl or None, got "
                        f"{type(control).__name__}")


def _merge(merge):
    from .merging import MergeConfig

    if merge is None or isinstance(merge, MergeConfig):
        return merge
    if isinstance(merge, Mapping):
        try:
            return MergeConfig(**merge)
        except TypeError as error:
            raise DiT4EditError(f"merge: {error}") from None
    raise DiT4EditError(f"merge must be changes to patch merging, a MergeConfig or None, got {type(merge).__name__}")


# --- the request ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditRequest:
    """One input and its edits: `image` (a path or a PIL image) or `inversion` (a saved `Inversion` or its file),
    the `source` prompt (optional with a saved inversion: it holds its own), the `targets`, and the `settings`."""

    targets: tuple[str, ...]
    source: str | None = None
    image: Any = None
    inversion: Any = None
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)

    def check(self, allow_no_target: bool = False, targets: bool = True) -> None:
        """What needs no model and no file content: one input, and prompts that are text with something visible
        (`allow_no_target`: a request that only records the source's attention may have no target; `targets=False`
        leaves the targets to be checked one by one when each runs)."""
        if (self.image is None) == (self.inversion is None):
            raise DiT4EditError("an edit needs an input image or a saved inversion (one of the two)")
        if not self.targets and not allow_no_target:
            raise DiT4EditError("no target prompt given")
        for k, target in enumerate(self.targets if targets else ()):
            checks.prompt(target, "target prompt" if len(self.targets) == 1 else f"target prompt {k + 1}")
        if self.image is not None or self.source is not None:
            checks.prompt(self.source, "source prompt")

    def check_words(self, control, source: str) -> None:
        """The local-blend words are in the source or a target prompt; reweighted words are in the targets."""
        if control is None:
            return
        if control.local_blend_words:
            checks.words_in_prompts(control.local_blend_words, [source, *self.targets], "local-blend word(s)")
        if control.reweight:
            words = [word for key in control.reweight for word in key.split()]
            checks.words_in_prompts(words, list(self.targets), "reweighted word(s)")


def prepare(request: EditRequest, defaults=None, num_blocks: int | None = None,
            allow_no_target: bool = False) -> tuple[EditRequest, Resolved]:
    """Everything about `request` that needs no model, before any heavy work: its prompts, its files read and
    checked (the input image, a saved inversion, the mask against the input's size), its settings resolved against
    `defaults` (the model's `ModelDefaults`) and `num_blocks`, and the named words found in the prompts. Returns the
    request with its files read (`image` a PIL image, `inversion` an `Inversion`, the mask an "L" image) and the
    resolved settings. `allow_no_target`: a request that only records the source's attention."""
    from .inversion_file import Inversion  # torch, deferred (see the imports above)
    from .masks import load_mask

    request.check(allow_no_target)
    settings = request.settings
    limit = MAX_PIXELS if settings.max_pixels is None else checks.integer(settings.max_pixels, "max_pixels", 1)
    saved = request.inversion
    if isinstance(saved, (str, os.PathLike)):
        saved = Inversion.load(saved, limit)
    elif saved is not None and not isinstance(saved, Inversion):
        raise DiT4EditError(f"inversion must be an Inversion or its file, got {type(saved).__name__}")
    source = request.source if saved is None else saved.source_prompt
    if saved is not None and request.source and request.source != source:
        raise DiT4EditError(f"the inversion was made with the source prompt {checks.printable(source)!r}")
    image = request.image
    if isinstance(image, (str, os.PathLike)):
        image = imgs.load_image(image, limit)
    elif image is not None and hasattr(image, "size"):  # an image in memory: the same limit, on its work size
        imgs.check_size(image.size, limit)
    resolved = resolve(settings, defaults, saved, num_blocks)
    replace(request, targets=request.targets or (source,)).check_words(resolved.control, source)
    size = saved.original_size if saved is not None else image.size
    mask = None if resolved.mask is None else load_mask(resolved.mask, size)
    request = replace(request, source=source, image=image, inversion=saved, settings=replace(settings, mask=mask))
    return request, replace(resolved, mask=mask)


def run(pipe, request: EditRequest, inversion=None, targets: Sequence[int] | None = None, record_words: bool = False,
        disable_progress: bool | None = None):
    """Run `request` on `pipe`: `prepare` it against the model, check everything that depends on the model before
    any heavy work (`pipe.check_edit`), invert the image (unless `inversion` is given, e.g. kept from an earlier
    request with the same image, source and inversion settings) and edit it towards its targets (`targets`: the
    indices to edit, default all). Returns `(EditResult, Inversion)`."""
    if targets is not None:
        request = replace(request, targets=tuple(request.targets[k] for k in targets))
    request, resolved = prepare(request, pipe.defaults, pipe.num_blocks)
    saved = None if request.inversion is None else pipe.check_inversion(request.inversion)
    chosen = list(request.targets)
    size = saved.original_size if saved is not None else request.image.size
    pipe.check_edit(request.source, chosen, resolved, size, resolved.mask)
    method = EDIT_METHODS[resolved.method]
    if pipe.joint and not method.joint:
        raise DiT4EditError(f"{resolved.method} needs self- and cross-attention layers; this model has joint "
                            f"attention ({pipe.backbone.family}): use dit4edit, infedit or sdedit")
    if method.run is not None:  # a method off the shared invert-then-edit path (its inversion, if any, comes back)
        if method.inverts:
            inversion = saved or inversion or invert(pipe, request, resolved, disable_progress)
        return method.run(pipe, request, resolved, chosen, record_words, disable_progress, saved or inversion)
    inversion = saved or inversion or invert(pipe, request, resolved, disable_progress)
    result = pipe.edit(inversion, chosen, guidance_scale=resolved.guidance, pin_source=resolved.pin_source,
                       control=resolved.control, mask=resolved.mask, merge=resolved.merge,
                       record_words=record_words, disable_progress=disable_progress, rows=resolved.rows,
                       source_image=request.image, direct_inversion=resolved.direct_inversion)
    return result, inversion


def invert(pipe, request: EditRequest, resolved: Resolved, disable_progress: bool | None = None):
    """Invert a prepared request's image under its source prompt with its resolved settings."""
    return pipe.invert(request.image, request.source, resolved.steps, resolved.guidance, resolved.inversion,
                       resolved.tol, resolved.max_pixels, disable_progress=disable_progress)


def inversion_key(request: EditRequest, resolved: Resolved) -> tuple:
    """What an inversion of `request.image` depends on besides the image: the source prompt and the inversion
    settings (a web page keeps inversions by image digest and this key)."""
    return request.source, resolved.steps, resolved.guidance, resolved.inversion, resolved.tol


# --- options by name: the command line's flags, batch spec keys and the page's fields ----------------------------


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise DiT4EditError(f"{name} takes true or false, got {value!r}")
    return value


def _integer(value, name: str) -> int:
    return checks.integer(value, name)


def _number(value, name: str) -> float:
    return checks.number(value, name)


def _mask(value, name: str):
    """A mask: its file's path, or (from Python) a PIL image."""
    from PIL import Image

    if not isinstance(value, (str, os.PathLike, Image.Image)):
        raise DiT4EditError(f"{name} must be an image file's path, got {checks.printable(repr(value))[:80]}")
    return value


def _choice(choices: Sequence[str]) -> Callable[[Any, str], str]:
    def parse(value, name: str) -> str:
        if value not in choices:
            raise DiT4EditError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def _integer_pair(value, name: str, separator: str, form: str) -> tuple[int, int]:
    """Two integers as text joined by `separator` ("3:7", "3x3") or as a [a, b] pair; `form` names it in errors."""
    if isinstance(value, str):
        parts = value.lower().split(separator)
        try:
            value = [int(part) for part in parts] if len(parts) == 2 else None
        except ValueError:
            value = None
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        raise DiT4EditError(f"{name} takes {form} (two integers)")
    return int(value[0]), int(value[1])


def parse_range(value, name: str) -> tuple[int, int]:
    """A block or step range: START:END as text, or a [start, end] pair."""
    return _integer_pair(value, name, ":", "START:END")


def _stride(value, name: str) -> tuple[int, int]:
    """A merge cell: ROWSxCOLS as text, or a [rows, cols] pair."""
    return _integer_pair(value, name, "x", "ROWSxCOLS")


def _words(value, name: str) -> tuple[str, ...]:
    """Words as text (separated by commas or spaces) or a list of words."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise DiT4EditError(f"{name} names no words; give words of the prompts")
    return tuple(w.strip() for w in value)


def _reweight(value, name: str) -> dict[str, float]:
    """{word: factor}, or WORD=VALUE items (a list, or one text separated by commas)."""
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        pairs = {}
        for item in value:
            word, sep, factor = str(item).partition("=") if isinstance(item, str) else ("", "", "")
            try:
                if not sep or not word.strip():
                    raise ValueError
                pairs[word.strip()] = float(factor)
            except ValueError:
                raise DiT4EditError(f"{name} takes WORD=VALUE, got {checks.printable(str(item))!r}") from None
        value = pairs
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise DiT4EditError(f"{name} takes {{word: factor}} or WORD=VALUE items")
    from .control.config import MAX_REWEIGHT

    factors = {word: checks.number(factor, f"{name} of {word!r}") for word, factor in value.items()}
    for word, factor in factors.items():
        if not 0.0 < factor <= MAX_REWEIGHT:
            raise DiT4EditError(f"{name} of {word!r} must be in (0, {MAX_REWEIGHT:g}], got {factor:g}")
    return factors


#: Options that change one `AttentionControl` field: name -> (field, parser).
CONTROL_OPTIONS: dict[str, tuple[str, Callable]] = {
    "self_replace_steps": ("self_replace_steps", _number),
    "self_layers": ("self_layers", parse_range),
    "cross_replace_steps": ("cross_replace_steps", _number),
    "cross_replace_changed": ("cross_replace_changed", _number),
    "edit_mode": ("edit_mode", _choice(EDIT_MODES)),
    "reweight": ("reweight", _reweight),
    "local_blend": ("local_blend_words", _words),
    "local_blend_changed": ("local_blend_changed", _flag),
}
#: Options that change one `MergeConfig` field: name -> (field, parser).
MERGE_OPTIONS: dict[str, tuple[str, Callable]] = {
    "merge_ratio": ("ratio", _number),
    "merge_stride": ("stride", _stride),
    "merge_ff": ("merge_ff", _flag),
    "merge_min_tokens": ("min_tokens", lambda value, name: checks.integer(value, name, 0)),
    "merge_blocks": ("blocks", parse_range),
    "merge_skip_steps": ("skip_steps", lambda value, name: checks.integer(value, name, 0)),
    "merge_plan_every": ("plan_every", lambda value, name: checks.integer(value, name, 1)),
}
#: On/off options that turn a part off when true (attention control, patch merging, the pinned source).
SWITCHES = ("no_attention_control", "no_merge", "free_source")
#: Options that set one `Settings` field: name -> parser. (`max_pixels` is not one: it is the operator's limit.)
SETTING_OPTIONS: dict[str, Callable] = {
    "steps": checks.steps,
    "guidance": checks.guidance,
    "inversion": _choice(tuple(INVERSION_METHODS)),
    "tol": checks.tolerance,
    "seed": checks.seed,
    "mask": _mask,
    "direct_inversion": _flag,
    "rows": _integer,
    "method": _choice(tuple(EDIT_METHODS)),
    "strength": _number,
}
#: Every option name, in the order `--help` and error messages list them.
OPTIONS = (*SETTING_OPTIONS, *SWITCHES, *CONTROL_OPTIONS, *MERGE_OPTIONS)
