"""`Inversion`: an inverted (or generated) image's latent trajectory and settings, and its file format.

A file is safetensors with one float32 tensor, `trajectory` `(N + 1, C, h, w)`, and the settings as JSON under the
metadata key `dit4edit`. Files are untrusted input: `Inversion.load` checks every key, type and size (the image
size against the pixel limit before anything is allocated), the trajectory's shape against the settings, that it is
finite, and records which model made it (`model`: name, latent channels, VAE scale and a probe of its weights) so
that editing it with another model is refused (`DiT4EditPipeline.check_inversion`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checks
from . import images as imgs
from .errors import DiT4EditError
from .methods import INVERSION_METHODS

#: `method` of a trajectory made by `generate` rather than by inverting an image.
GENERATED = "generated"
METADATA_KEY = "dit4edit"
_REQUIRED = ("source_prompt", "num_inference_steps", "guidance_scale", "method", "original_size", "model")
_OPTIONAL = ("nfe", "residuals", "extra")
_MODEL_KEYS = ("name", "latent_channels", "vae_scale_factor", "probe")


@dataclass
class Inversion:
    """An inverted (or generated) image: the latent trajectory and everything needed to edit it again.

    `trajectory[0]` is the noisiest latent, `trajectory[-1]` the encoded input; an edit started from
    `trajectory[0]` with the same prompt, steps and guidance regenerates the input (exactly, for exact methods).
    `model` records the model that made it (see `DiT4EditPipeline.model_record`); None when unknown.
    """

    trajectory: torch.Tensor  # (N + 1, C, h, w)
    source_prompt: str
    num_inference_steps: int
    guidance_scale: float
    method: str  # one of methods.INVERSION_METHODS, or "generated"
    original_size: tuple[int, int]  # (width, height) of the input image
    nfe: int = 0
    residuals: list[float] | None = None
    extra: dict = field(default_factory=dict)
    model: dict | None = None

    @property
    def latent(self) -> torch.Tensor:
        return self.trajectory[0]

    @property
    def input_latent(self) -> torch.Tensor:
        return self.trajectory[-1]

    @property
    def sampler(self) -> str:
        """The sampler that regenerates this trajectory: the one its inversion method inverts ("dpm" when
        generated)."""
        return INVERSION_METHODS[self.method].sampler if self.method in INVERSION_METHODS else "dpm"

    def settings(self) -> str:
        """"30 steps, dpm-exact, guidance 4.5": how it was made, for messages."""
        return f"{self.num_inference_steps} steps, {self.method}, guidance {self.guidance_scale:g}"

    def save(self, path: str | os.PathLike) -> Path:
        """Save as safetensors (trajectory in float32, metadata as JSON), written atomically."""
        from safetensors.torch import save_file

        meta = dict(
            source_prompt=self.source_prompt,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            method=self.method,
            original_size=list(self.original_size),
            nfe=self.nfe,
            residuals=self.residuals,
            extra=self.extra,
            model=self.model,
        )
        tensors = {"trajectory": self.trajectory.float().contiguous().cpu()}
        with imgs.atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, max_pixels: int = imgs.MAX_PIXELS) -> Inversion:
        """Read and validate an inversion file (see the module docstring); any problem is a one-line
        `DiT4EditError`. `max_pixels` bounds the image size it may ask for, as for input images."""
        from safetensors import safe_open

        path = checks.existing_file(path, "inversion file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                names = list(handle.keys())
                shapes = {name: handle.get_slice(name).get_shape() for name in names}
                meta = _parse_metadata(metadata, path)
                _check_tensors(names, shapes, meta, path, max_pixels)
                trajectory = handle.get_tensor("trajectory")  # its size is known to fit now
        except DiT4EditError:
            raise
        except Exception as error:  # safetensors raises several types for a bad file
            raise DiT4EditError(f"{path} is not a dit4edit inversion file ({type(error).__name__})") from None
        if trajectory.dtype not in (torch.float32, torch.float64):
            raise DiT4EditError(f"{path} is not a valid dit4edit inversion file: its trajectory is {trajectory.dtype}, "
                                "not float32")
        if not bool(torch.isfinite(trajectory).all()):
            raise DiT4EditError(f"{path}: the trajectory holds NaN or infinite values")
        meta["original_size"] = tuple(meta["original_size"])
        return cls(trajectory=trajectory.to(torch.float64), **meta)


def _parse_metadata(metadata: dict, path: Path) -> dict:
    def bad(message: str) -> DiT4EditError:
        return DiT4EditError(f"{path} is not a valid dit4edit inversion file: {message}")

    if METADATA_KEY not in metadata:
        raise bad("no dit4edit metadata")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (json.JSONDecodeError, TypeError):
        raise bad("its metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise bad(f"its metadata is a JSON {type(meta).__name__}, not an object")
    missing = [k for k in _REQUIRED if k not in meta]
    unknown = sorted(set(meta) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise bad(f"missing {', '.join(missing)}" if missing else f"unknown key(s) {', '.join(unknown)}")
    try:
        if not isinstance(meta["source_prompt"], str) or not meta["source_prompt"].strip():
            raise DiT4EditError("source_prompt must be non-empty text")
        checks.steps(meta["num_inference_steps"], "num_inference_steps")
        checks.guidance(meta["guidance_scale"], "guidance_scale")
        if meta["method"] != GENERATED:
            checks.inversion_method(meta["method"], "method")
        size = meta["original_size"]
        if not (isinstance(size, list) and len(size) == 2):
            raise DiT4EditError(f"original_size must be [width, height], got {size!r}")
        for side in size:
            checks.integer(side, "original_size", 1, 1 << 20)
        checks.integer(meta.get("nfe", 0), "nfe", 0)
        residuals = meta.get("residuals")
        if residuals is not None and not (isinstance(residuals, list) and all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in residuals)):
            raise DiT4EditError("residuals must be a list of finite numbers")
        if not isinstance(meta.get("extra", {}), dict):
            raise DiT4EditError("extra must be a JSON object")
        _check_model_record(meta["model"])
    except DiT4EditError as error:
        raise bad(str(error)) from None
    return meta


def _check_model_record(model) -> None:
    if not isinstance(model, dict) or sorted(model) != sorted(_MODEL_KEYS):
        raise DiT4EditError(f"model must be an object with {', '.join(_MODEL_KEYS)}")
    if not isinstance(model["name"], str):
        raise DiT4EditError("model name must be text")
    checks.integer(model["latent_channels"], "model latent_channels", 1, 1024)
    checks.integer(model["vae_scale_factor"], "model vae_scale_factor", 1, 64)
    probe = model["probe"]
    if not (isinstance(probe, list) and len(probe) <= 256 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in probe)):
        raise DiT4EditError("model probe must be a list of finite numbers")


def _check_tensors(names, shapes, meta: dict, path: Path, max_pixels: int) -> None:
    """The trajectory's name and shape fit the settings, and the image it decodes to fits `max_pixels`."""
    if names != ["trajectory"]:
        raise DiT4EditError(f"{path} is not a valid dit4edit inversion file: tensors {names}, expected trajectory")
    shape = list(shapes["trajectory"])
    width, height = meta["original_size"]
    imgs.check_size((width, height), max_pixels, what=f"the image of inversion {path}")
    steps, model = meta["num_inference_steps"], meta["model"]
    factor = model["vae_scale_factor"]
    work = imgs.work_size((width, height))
    expected = [steps + 1, model["latent_channels"], work[1] // factor, work[0] // factor]
    if shape != expected:
        raise DiT4EditError(f"{path} is not a valid dit4edit inversion file: its trajectory is {shape}; "
                            f"{steps} steps of a {width}x{height} image need {expected}")
