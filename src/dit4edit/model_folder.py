"""A model folder read without loading it: where it is, whether it is a PixArt pipeline we can load safely, its
components' shapes, and the per-model default settings in `dit4edit.json`. Nothing here imports torch, so the CLI
checks a model folder and every flag that depends on it in a fraction of a second, before loading anything.

A folder is accepted when `model_index.json` is a JSON object naming the five PixArt components, each component
folder holds its config, the transformer is a `PixArtTransformer2DModel`, the weights are safetensors (pickled
`.bin` / `.pt` weights are refused: loading them can run code), and the components fit together (the VAE's latent
channels are the transformer's input channels, the text encoder's width is the transformer's caption width).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from . import checks
from .defaults import DEFAULTS
from .errors import DiT4EditError

logger = logging.getLogger(__name__)

#: The embedded default model (a small PixArt-architecture pipeline trained on the synthetic world).
EMBEDDED_MODEL = Path(__file__).parent / "models" / "shapes"
#: The file of per-model default settings in a model folder.
DEFAULTS_FILE = "dit4edit.json"
REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
WEIGHTED_COMPONENTS = ("text_encoder", "vae", "transformer")
TRANSFORMER_CLASS = "PixArtTransformer2DModel"
#: Prompt length in T5 tokens of each PixArt pipeline class, as diffusers' pipelines encode prompts (PixArt-Sigma
#: reads 300; PixArt-alpha, and any other class, 120). A `max_sequence_length` in model_index.json wins.
PROMPT_LENGTHS = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}
DEFAULT_PROMPT_LENGTH = PROMPT_LENGTHS["PixArtAlphaPipeline"]
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def default_model() -> str:
    """The folder of the embedded model; a `DiT4EditError` when this install has none."""
    if (EMBEDDED_MODEL / "model_index.json").is_file():
        return str(EMBEDDED_MODEL)
    raise DiT4EditError("no --model given and this install has no embedded model; pass a PixArt-alpha folder or hub id")


# --- per-model default settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDefaults:
    """Settings a model works best with; a model folder's `dit4edit.json` overrides any of them, e.g.
    `{"guidance_scale": 2.5, "num_inference_steps": 30, "inversion": "dpm", "vocabulary": ["a", "red", ...],
    "control": {"self_mode_early": "p2p", "self_replace_steps": 1.0}}`.

    guidance_scale: classifier-free guidance of inversion, editing and generation.
    num_inference_steps: denoising (and inversion) steps.
    inversion: inversion method, one of `methods.INVERSION_METHODS`.
    The library's values (`defaults.DEFAULTS`) fill what the file leaves out.
    vocabulary: the words the model was trained on, when it knows only a few (None = any word); a prompt with
        other words draws a one-line warning, since the model ignores or misreads them.
    control: `AttentionControl` fields this model edits best with (None = the library's, i.e. the paper's); an
        edit that names no control uses them, and the command line's and the web app's control settings change
        them field by field (`attention_control`). Checked when first used (that needs torch), before any model load.
    """

    guidance_scale: float = DEFAULTS.guidance
    num_inference_steps: int = DEFAULTS.steps
    inversion: str = DEFAULTS.inversion
    vocabulary: frozenset[str] | None = None
    control: Mapping[str, object] | None = None

    def __post_init__(self):
        checks.guidance(self.guidance_scale, "guidance_scale")
        checks.steps(self.num_inference_steps, "num_inference_steps")
        checks.inversion_method(self.inversion, "inversion")
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if self.vocabulary is not None:
            words = self.vocabulary
            if isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words) or not words:
                raise DiT4EditError(f"vocabulary must be a non-empty list of words, got {words!r}")
            object.__setattr__(self, "vocabulary", frozenset(checks.word_key(w) for w in words))
        if self.control is not None:
            if not isinstance(self.control, Mapping) or not all(isinstance(k, str) for k in self.control):
                raise DiT4EditError(f"control must be an object of attention-control settings, got {self.control!r}")
            object.__setattr__(self, "control", MappingProxyType(dict(self.control)))

    def attention_control(self, **changes):
        """The attention control this model edits with: `AttentionControl` with the model's `control` fields, then
        `changes` on top. A setting `AttentionControl` does not know, or a bad value, is a one-line error."""
        from .control import AttentionControl

        settings = {**(self.control or {}), **changes}
        known = {f.name for f in fields(AttentionControl)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise DiT4EditError(f"unknown attention-control setting(s) {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
        try:
            return AttentionControl(**settings)
        except (TypeError, ValueError) as error:  # its own checks raise DiT4EditError, which passes through
            raise DiT4EditError(str(error)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelDefaults:
        """Read and validate a `dit4edit.json`; any problem is a one-line `DiT4EditError` naming the file."""
        path = Path(path)
        values = _read_json(path)
        if not isinstance(values, dict):
            raise DiT4EditError(f"{path} must hold a JSON object, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DiT4EditError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**values)
        except DiT4EditError as error:
            raise DiT4EditError(f"{path}: {error}") from None

    @classmethod
    def from_folder(cls, folder: str | Path | None) -> ModelDefaults:
        """The defaults of a model folder: its `dit4edit.json`, or the library's when it has none (or for a hub id)."""
        path = Path(folder) / DEFAULTS_FILE if folder is not None else None
        return cls.from_file(path) if path is not None and path.is_file() else cls()

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` outside the vocabulary (compared by `checks.word_key`), in order; [] without one."""
        if self.vocabulary is None:
            return []
        return [w for w in prompt.split() if checks.word_key(w) not in self.vocabulary]

    def warn_unknown_words(self, prompt: str, what: str = "prompt") -> None:
        unknown = self.unknown_words(prompt)
        if unknown:
            logger.warning("the %s has words this model was not trained on: %s (it ignores or misreads them)",
                           what, ", ".join(dict.fromkeys(unknown)))


# --- where a model is ---------------------------------------------------------------------------------------------


def local_folder(name: str | Path) -> Path | None:
    """The local folder `name` names, or None when it is a hub id ("owner/name" with no such local path).

    A name that looks like a path (a separator other than the hub's one slash, a leading ".", "/" or "~", or a
    first part that exists here) and does not exist is a missing folder, not a hub id.
    """
    text = str(name)
    folder = Path(text).expanduser()
    if folder.exists():
        return folder
    looks_like_hub = _HUB_ID.fullmatch(text) is not None and not Path(text.split("/")[0]).exists()
    if looks_like_hub and not text.startswith((".", "~")):
        return None
    raise DiT4EditError(f"model folder not found: {text}")


# --- what is in a folder ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder's configs say, for checks before loading (see `check_folder`)."""

    num_blocks: int  # transformer blocks
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    patch_size: int
    sample_size: int  # latent side the transformer was built for
    defaults: ModelDefaults
    max_sequence_length: int = DEFAULT_PROMPT_LENGTH  # T5 tokens per prompt (`prompt_length`)

    @property
    def native_size(self) -> int:
        return self.sample_size * self.vae_scale_factor


def check_folder(folder: str | Path) -> ModelInfo:
    """Validate a local model folder without loading weights (see the module docstring); one-line errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiT4EditError(f"model path is not a folder: {folder}")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise DiT4EditError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(index_path)
    if not isinstance(index, dict):
        raise DiT4EditError(f"{index_path} must hold a JSON object, got {json.dumps(index)[:40]}")
    missing = [name for name in REQUIRED_COMPONENTS if name not in index or not (folder / name).is_dir()]
    if missing:
        raise DiT4EditError(f"{folder} is not a PixArt-style pipeline: missing {', '.join(missing)}")
    configs = {name: _component_config(folder, name) for name in WEIGHTED_COMPONENTS}
    entry = index["transformer"]
    declared = entry[1] if isinstance(entry, list) and len(entry) == 2 else entry
    for found in (declared, configs["transformer"].get("_class_name")):
        if found != TRANSFORMER_CLASS:
            raise DiT4EditError(f"{folder} is not a PixArt model: its transformer is {found!r}, not {TRANSFORMER_CLASS}")
    for name in WEIGHTED_COMPONENTS:
        _check_weights(folder / name)
    check_component_shapes(configs["transformer"], configs["vae"], configs["text_encoder"], str(folder))
    transformer, vae = configs["transformer"], configs["vae"]
    return ModelInfo(
        num_blocks=int(transformer["num_layers"]),
        latent_channels=int(vae["latent_channels"]),
        vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        patch_size=int(transformer.get("patch_size") or 2),
        sample_size=int(transformer["sample_size"]),
        defaults=ModelDefaults.from_folder(folder),
        max_sequence_length=prompt_length(index),
    )


def prompt_length(index: dict) -> int:
    """How many T5 tokens a pipeline's prompts are encoded to, from its `model_index.json`: its own
    `max_sequence_length` (a saved dit4edit pipeline), else its pipeline class's (`PROMPT_LENGTHS`)."""
    length = index.get("max_sequence_length")
    if length is None:
        return PROMPT_LENGTHS.get(index.get("_class_name"), DEFAULT_PROMPT_LENGTH)
    return checks.integer(length, "max_sequence_length in model_index.json", low=2, high=4096)


def check_component_shapes(transformer: dict, vae: dict, text_encoder: dict, name: str) -> None:
    """The components' configs fit together: one-line error naming the mismatch (before anything runs into it)."""
    def value(config: dict, key: str, component: str) -> int:
        got = config.get(key)
        if isinstance(got, bool) or not isinstance(got, int) or got < 1:
            raise DiT4EditError(f"{name}: the {component} config has no valid {key} (got {got!r})")
        return got

    for key in ("in_channels", "num_layers", "sample_size"):
        value(transformer, key, "transformer")
    blocks = vae.get("block_out_channels")
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise DiT4EditError(f"{name}: the vae config has no valid block_out_channels (got {blocks!r})")
    channels = value(vae, "latent_channels", "vae")
    in_channels = transformer["in_channels"]
    if channels != in_channels:
        raise DiT4EditError(f"{name}: the VAE has {channels} latent channels but the transformer takes {in_channels}")
    out_channels = transformer.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise DiT4EditError(f"{name}: the transformer outputs {out_channels} channels for {in_channels} in "
                            f"(PixArt predicts {in_channels} or {2 * in_channels})")
    width, caption = value(text_encoder, "d_model", "text encoder"), transformer.get("caption_channels")
    if caption is not None and width != caption:
        raise DiT4EditError(f"{name}: the text encoder is {width} wide but the transformer reads {caption}-wide "
                            "captions")
    scaling = vae.get("scaling_factor", 1.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise DiT4EditError(f"{name}: the vae config has no valid scaling_factor (got {scaling!r})")


def _component_config(folder: Path, name: str) -> dict:
    path = folder / name / "config.json"
    if not path.is_file():
        raise DiT4EditError(f"{folder} is not a PixArt-style pipeline: {name}/config.json is missing")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise DiT4EditError(f"{path} must hold a JSON object")
    return config


def _check_weights(component: Path) -> None:
    files = [p for p in component.iterdir() if p.is_file()]
    if any(p.name.endswith((".safetensors", ".safetensors.index.json")) for p in files):
        return
    pickled = [p.name for p in files if p.name.endswith(PICKLED_SUFFIXES) or p.name.endswith(".bin.index.json")]
    if pickled:
        raise DiT4EditError(f"{component} holds pickled weights ({pickled[0]}), which can run code when loaded; "
                            "only safetensors weights are accepted (convert them with safetensors)")
    raise DiT4EditError(f"{component} has no weights (no .safetensors file)")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise DiT4EditError(f"{path} is not valid JSON") from None
    except OSError as error:
        raise DiT4EditError(f"cannot read {path}: {error.strerror or error}") from None
