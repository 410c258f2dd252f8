"""A model folder read without loading it: where it is, whether it is a PixArt pipeline we can load safely, its
components' shapes, and the per-model default settings in `dit4edit.json`. Nothing here imports torch, so the CLI
checks a model folder and every flag that depends on it in a fraction of a second, before loading anything.

A folder is accepted when `model_index.json` is a JSON object naming the five PixArt components, each of the class
PixArt uses (`COMPONENT_CLASSES`), each component folder holds its config, the weights are safetensors (pickled
`.bin` / `.pt` weights are refused: loading them can run code), every size in the configs is within what the largest
real checkpoint of its kind needs (`CONFIG_LIMITS`: a config is a request for memory, checked before anything is
allocated), and the components fit together (the VAE's latent channels are the transformer's input channels, the
text encoder's width is the transformer's caption width).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from . import checks
from .defaults import DEFAULTS, PIXART_ALPHA_TOKENS
from .errors import DiT4EditError

logger = logging.getLogger(__name__)

#: The embedded default model (a small PixArt-architecture pipeline trained on the synthetic world).
EMBEDDED_MODEL = Path(__file__).parent / "models" / "shapes"
#: The file of per-model default settings in a model folder.
DEFAULTS_FILE = "dit4edit.json"
REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
WEIGHTED_COMPONENTS = ("text_encoder", "vae", "transformer")
TRANSFORMER_CLASS = "PixArtTransformer2DModel"
#: The (library, class) pairs `model_index.json` may name for each component. The scheduler may be any diffusers
#: scheduler class (`solvers.check_scheduler` says which ones editing runs with); the others load weights.
COMPONENT_CLASSES = {
    "transformer": ("diffusers", (TRANSFORMER_CLASS,)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("T5EncoderModel",)),
    "tokenizer": ("transformers", ("T5Tokenizer", "T5TokenizerFast")),
    "scheduler": ("diffusers", None),
}
_SCHEDULER_CLASS = re.compile(r"[A-Z][A-Za-z0-9]*Scheduler")
#: Upper bounds of every size in the component configs, each a few times what the largest real checkpoint of its
#: kind needs: PixArt-alpha/Sigma XL-2 (sample_size 128, 256 for Sigma's 2K model; 28 layers of 16 x 72 = 1152;
#: T5-XXL captions of 4096), SD3.5-large (38 layers of 38 x 64 = 2432; joint 4096; pooled 2048; positions 192),
#: FLUX.1 (19 + 38 layers of 24 x 128 = 3072; 64 input channels), the SD/SDXL/SD3/FLUX VAEs (block widths up to
#: 512, 16 latent channels), T5-XXL (d_model 4096, d_ff 10240, 64 heads, 24 layers, 32128 words; umT5 256384) and
#: CLIP-L/G (1280 wide, 32 layers), and their schedulers. A list's bound applies to each entry, and its length is
#: bounded too.
CONFIG_LIMITS = {
    "transformer": {
        "sample_size": 512, "num_layers": 96, "num_single_layers": 96, "num_attention_heads": 128,
        "attention_head_dim": 512, "in_channels": 256, "out_channels": 512, "patch_size": 8,
        "caption_channels": 16384, "cross_attention_dim": 16384, "joint_attention_dim": 16384,
        "caption_projection_dim": 16384, "pooled_projection_dim": 16384, "pos_embed_max_size": 1024,
        "num_embeds_ada_norm": 10000, "norm_num_groups": 1024, "num_vector_embeds": 65536,
        "axes_dims_rope": 1024, "dual_attention_layers": 96,
    },
    "vae": {
        "block_out_channels": 2048, "layers_per_block": 8, "latent_channels": 64, "in_channels": 16,
        "out_channels": 16, "norm_num_groups": 1024, "sample_size": 4096,
    },
    "text_encoder": {
        "d_model": 16384, "d_ff": 65536, "d_kv": 1024, "num_heads": 256, "num_layers": 96, "num_decoder_layers": 96,
        "vocab_size": 1_000_000, "relative_attention_num_buckets": 1024, "relative_attention_max_distance": 65536,
        "hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 96, "num_attention_heads": 256,
        "max_position_embeddings": 65536, "projection_dim": 16384,
    },
    # Schedulers allocate a table of num_train_timesteps values (1000 in every released model).
    "scheduler": {"num_train_timesteps": 10000, "solver_order": 3, "steps_offset": 10000},
}
#: Longest list in a component config (block widths, block types, rotary axes).
MAX_CONFIG_LIST = 16
#: The transformer's transformer width (heads x head width) and its table of position embeddings (positions x
#: width, filled when the model is built): about 5x FLUX.1's 3072 wide, about 3x SD3.5-large's 192^2 x 2432.
MAX_TRANSFORMER_WIDTH = 16384
MAX_POSITION_TABLE = 2**28
#: The VAE's scaling_factor (SD 0.18215, SDXL 0.13025, FLUX 0.3611, SD3 1.5305) and |shift_factor| (SD3 0.0609,
#: FLUX 0.1159): latents are multiplied by these, so a tiny or huge one turns every result into noise or black.
SCALING_FACTOR_RANGE = (1e-3, 100.0)
MAX_SHIFT_FACTOR = 100.0
#: Prompt length in T5 tokens of each PixArt pipeline class, as diffusers' pipelines encode prompts (PixArt-Sigma
#: reads 300; PixArt-alpha, and any other class, 120). A `max_sequence_length` in model_index.json wins.
PROMPT_LENGTHS = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": PIXART_ALPHA_TOKENS,
                  "StableDiffusion3Pipeline": 256, "FluxPipeline": 512}  # T5 tokens, as each diffusers pipeline
#: Pipelines with joint (MM-DiT) attention, whose folders `check_folder` validates by their backbone's `FolderSpec`.
JOINT_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
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
            if (isinstance(words, str) or not isinstance(words, (list, tuple, set, frozenset)) or not words
                    or not all(isinstance(w, str) and not checks.is_blank(w) for w in words)):
                raise DiT4EditError(f"vocabulary must be a non-empty list of words, got {words!r}")
            object.__setattr__(self, "vocabulary", frozenset(checks.word_key(w) for w in words))
        if self.control is not None:
            if not isinstance(self.control, Mapping) or not all(isinstance(k, str) for k in self.control):
                raise DiT4EditError(f"control must be an object of attention-control settings, got {self.control!r}")
            object.__setattr__(self, "control", MappingProxyType(dict(self.control)))

    def attention_control(self, **changes):
        """The attention control this model edits with: `AttentionControl` with the model's `control` fields, then
        `changes` on top. A setting `AttentionControl` does not know, or a bad value, is a one-line error."""
        from .control import AttentionControl  # imports torch: deferred so folders are checked without it

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
        values = checks.read_json(path)
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
        """The defaults of a model folder: its `dit4edit.json`, or the library's when it has none (or for a hub id).
        A `dit4edit.json` that is there but is not a regular file (a folder, a FIFO, a link to a device or to
        nothing) is an error, not a file to ignore."""
        if folder is None:
            return cls()
        path = Path(folder) / DEFAULTS_FILE
        if not os.path.lexists(path):
            return cls()
        if not path.is_file():
            kind = "a broken link" if not path.exists() else "not a regular file"
            raise DiT4EditError(f"{path} is {kind}; make it a JSON file of settings or remove it")
        return cls.from_file(path)

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` outside the vocabulary (compared by `checks.word_key`), in order; [] without one."""
        if self.vocabulary is None:
            return []
        return [w for w in prompt.split() if checks.word_key(w) not in self.vocabulary]

    def warn_unknown_words(self, prompt: str, what: str = "prompt") -> None:
        unknown = self.unknown_words(prompt)
        if unknown:
            logger.warning("the %s has words this model was not trained on: %s (it ignores or misreads them)",
                           checks.printable(what), ", ".join(checks.printable(w) for w in dict.fromkeys(unknown)))


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
    index = checks.read_json(index_path)
    if not isinstance(index, dict):
        raise DiT4EditError(f"{index_path} must hold a JSON object, got {json.dumps(index)[:40]}")
    if index.get("_class_name") in JOINT_PIPELINES:
        return _check_joint_folder(folder, index)
    missing = [name for name in REQUIRED_COMPONENTS if name not in index or not (folder / name).is_dir()]
    if missing:
        raise DiT4EditError(f"{folder} is not a PixArt-style pipeline: missing {', '.join(missing)}")
    for name in REQUIRED_COMPONENTS:
        check_component_class(name, index[name], str(folder))
    configs = {name: _component_config(folder, name) for name in WEIGHTED_COMPONENTS}
    check_config_limits(_component_config(folder, "scheduler", "scheduler_config.json"), "scheduler", str(folder))
    found = configs["transformer"].get("_class_name")
    if found != TRANSFORMER_CLASS:
        raise DiT4EditError(f"{folder} is not a PixArt model: its transformer is {found!r}, not {TRANSFORMER_CLASS}")
    vae_class = configs["vae"].get("_class_name", "AutoencoderKL")
    if vae_class != "AutoencoderKL":
        raise DiT4EditError(f"{folder}: vae/config.json is for a {vae_class!r}, not the AutoencoderKL PixArt uses")
    model_type = configs["text_encoder"].get("model_type", "t5")
    if model_type != "t5":
        raise DiT4EditError(f"{folder}: text_encoder/config.json is a {model_type!r} model, not the T5 PixArt uses")
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


def _check_joint_folder(folder: Path, index: dict) -> ModelInfo:
    """`check_folder` for an SD3 / SD3.5 or FLUX.1 folder: the components and classes its backbone's `FolderSpec`
    names, safetensors weights, configs within limits, the VAE's latent channels what the transformer reads."""
    from .backbones import BACKBONES, family_of  # deferred: torch and every backbone, for these folders only

    family = family_of(index)
    spec = BACKBONES[family].folder
    spec.check(index, str(folder))
    missing = [name for name in spec.components if not (folder / name).is_dir()]
    if missing:
        raise DiT4EditError(f"{folder}: model_index.json lists {', '.join(missing)} but the folder lacks them")
    weighted = [name for name in spec.components if name.startswith(("text_encoder", "transformer", "vae"))]
    for name in weighted:
        check_config_limits(_component_config(folder, name), name, str(folder))
        _check_weights(folder / name)
    check_config_limits(_component_config(folder, "scheduler", "scheduler_config.json"), "scheduler", str(folder))
    transformer, vae = _component_config(folder, "transformer"), _component_config(folder, "vae")
    patch = int(transformer.get("patch_size") or 1)
    channels, reads = vae.get("latent_channels"), transformer.get("in_channels")
    if family == "flux" and isinstance(channels, int):
        channels *= 4  # FLUX packs 2x2 latent pixels into one token
    if channels != reads:
        raise DiT4EditError(f"{folder}: the VAE's latents ({vae.get('latent_channels')!r} channels) are not what the "
                            f"transformer reads ({reads!r} channels)")
    blocks = int(transformer.get("num_layers") or 0) + int(transformer.get("num_single_layers") or 0)
    vae_scale = 2 ** (len(vae.get("block_out_channels") or [0]) - 1)
    return ModelInfo(num_blocks=blocks, latent_channels=int(vae["latent_channels"]), vae_scale_factor=vae_scale,
                     patch_size=patch * (2 if family == "flux" else 1),
                     sample_size=int(transformer.get("sample_size") or 128),
                     defaults=ModelDefaults.from_folder(folder), max_sequence_length=prompt_length(index))


def prompt_length(index: dict) -> int:
    """How many T5 tokens a pipeline's prompts are encoded to, from its `model_index.json`: its own
    `max_sequence_length` (a saved dit4edit pipeline), else its pipeline class's (`PROMPT_LENGTHS`)."""
    length = index.get("max_sequence_length")
    if length is None:
        return PROMPT_LENGTHS.get(index.get("_class_name"), DEFAULT_PROMPT_LENGTH)
    return checks.integer(length, "max_sequence_length in model_index.json", low=2, high=4096)


def check_component_class(component: str, entry, name: str) -> None:
    """One-line error unless `model_index.json`'s `entry` for `component` is a `[library, class]` pair PixArt uses
    (`COMPONENT_CLASSES`): another class would load (or fail) as something the pipeline cannot run."""
    library, classes = COMPONENT_CLASSES[component]
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
        raise DiT4EditError(f"{name}: model_index.json's {component} must be [library, class], got {entry!r}")
    if component == "transformer" and entry[1] != TRANSFORMER_CLASS:
        raise DiT4EditError(f"{name} is not a PixArt model: its transformer is {entry[1]!r}, not {TRANSFORMER_CLASS}")
    wanted = " or ".join(classes) if classes else "a scheduler class"
    known = _SCHEDULER_CLASS.fullmatch(entry[1]) is not None if classes is None else entry[1] in classes
    if entry[0] != library or not known:
        raise DiT4EditError(f"{name}: its {component} is {entry[0]}.{entry[1]}; a PixArt pipeline's is "
                            f"{library}.{wanted}")


def check_config_limits(config: dict, component: str, name: str) -> None:
    """One-line error when a size in a component's config is not a whole number in `[0, limit]` of
    `CONFIG_LIMITS` (a list: each entry, and at most `MAX_CONFIG_LIST` of them), or the transformer's width or
    position table exceeds `MAX_TRANSFORMER_WIDTH` / `MAX_POSITION_TABLE`. Checked before any weight loads."""
    for key, limit in CONFIG_LIMITS.get(component, {}).items():
        got = config.get(key)
        if got is None:
            continue
        entries = got if isinstance(got, (list, tuple)) else [got]
        if isinstance(got, (list, tuple)) and len(got) > MAX_CONFIG_LIST:
            raise DiT4EditError(f"{name}: the {component} config's {key} has {len(got)} entries (at most "
                                f"{MAX_CONFIG_LIST})")
        for entry in entries:
            if isinstance(entry, bool) or not isinstance(entry, int) or entry < 0:
                raise DiT4EditError(f"{name}: the {component} config has no valid {key} (got {got!r})")
            if entry > limit:
                raise DiT4EditError(f"{name}: the {component} config's {key} is {got!r}, over the limit of {limit} "
                                    "(a few times what the largest real models use)")
    if component == "transformer":
        heads, head_dim = config.get("num_attention_heads") or 1, config.get("attention_head_dim") or 1
        if heads * head_dim > MAX_TRANSFORMER_WIDTH:
            raise DiT4EditError(f"{name}: the transformer is {heads} x {head_dim} = {heads * head_dim} wide "
                                f"(at most {MAX_TRANSFORMER_WIDTH})")
        side = max((config.get("sample_size") or 1) // (config.get("patch_size") or 1),
                   config.get("pos_embed_max_size") or 1)
        if side * side * heads * head_dim > MAX_POSITION_TABLE:
            raise DiT4EditError(f"{name}: the transformer's position table is {side}^2 positions x {heads * head_dim}"
                                f" = {side * side * heads * head_dim} values (at most {MAX_POSITION_TABLE})")


def check_component_shapes(transformer: dict, vae: dict, text_encoder: dict, name: str) -> None:
    """The components' configs are within `CONFIG_LIMITS` and fit together: one-line error naming the mismatch
    (before anything runs into it)."""
    for component, config in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder)):
        check_config_limits(config, component, name)

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
    low, high = SCALING_FACTOR_RANGE
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not low <= scaling <= high:
        raise DiT4EditError(f"{name}: the vae config has no valid scaling_factor (got {scaling!r}; real VAEs use "
                            f"{low:g} to {high:g})")
    shift = vae.get("shift_factor")
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float))
                              or not abs(shift) <= MAX_SHIFT_FACTOR):
        raise DiT4EditError(f"{name}: the vae config has no valid shift_factor (got {shift!r})")


def _component_config(folder: Path, name: str, file: str = "config.json") -> dict:
    path = folder / name / file
    if not path.is_file():
        raise DiT4EditError(f"{folder} is not a PixArt-style pipeline: {name}/{file} is missing")
    config = checks.read_json(path)
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
