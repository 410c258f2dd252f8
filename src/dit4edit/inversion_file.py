"""`Inversion`: an inverted (or generated) image's latent trajectory and settings, and its file format.

A file is safetensors with one float32 tensor, `trajectory` `(N + 1, C, h, w)`, and the settings as JSON under the
metadata key `dit4edit`. Files are untrusted input: `Inversion.load` checks every key, type and size (the image
size against the pixel limit, at the size it is worked on, before anything is allocated), the trajectory's shape
against the settings, that its values are finite and within what real latents reach (`MAX_LATENT`), and which model
made it (`model_record`: a display name, latent channels, VAE scale, a probe of its weights and a fingerprint of
them; never a local path) so that editing it with another model is refused (`check_model`). `Inversion.check` runs
the same checks on an `Inversion` built in Python.
"""

from __future__ import annotations

import hashlib
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
_MODEL_OPTIONAL = ("fingerprint", "family")  # family: the model family's backbone name ("pixart", "sd3", "flux")
#: Largest magnitude a trajectory value may have. Latents of real images (VAE latents times its scaling factor) and
#: the noisy latents between them and noise stay within about +-10 (signal and noise of unit scale); a value beyond
#: this did not come from an image, and decoding it gives a black or white picture instead of an error.
MAX_LATENT = 1e4
#: Values of each probed parameter in `model_record`.
PROBE_VALUES = 8


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
        """Save as safetensors (trajectory in float32, metadata as JSON), written atomically (`images.atomic_path`:
        the mode of a file it replaces is kept, a write error is a one-line `DiT4EditError`, nothing is left)."""
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
        from safetensors import SafetensorError

        tensors = {"trajectory": self.trajectory.float().contiguous().cpu()}
        with imgs.atomic_path(path, "inversion file") as tmp:
            try:
                save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
            except SafetensorError as error:  # its I/O errors (a full disk): reported and cleaned up as OSErrors
                raise OSError(str(error).removeprefix("Error while serializing: ")) from None
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
        check_trajectory_values(trajectory, f"{path}: the trajectory")
        meta["original_size"] = tuple(meta["original_size"])
        return cls(trajectory=trajectory.to(torch.float64), **meta)

    def check(self, max_pixels: int = imgs.MAX_PIXELS) -> Inversion:
        """`self` when it passes every check `load` makes on a file (settings, model record, the trajectory's type,
        shape, finiteness and magnitude); otherwise a one-line `DiT4EditError`. For an `Inversion` built or
        changed in Python before it is edited."""
        meta = dict(source_prompt=self.source_prompt, num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale, method=self.method, nfe=self.nfe, residuals=self.residuals,
                    extra=self.extra, model=self.model,
                    original_size=list(self.original_size) if isinstance(self.original_size, (tuple, list))
                    else self.original_size)
        try:
            _check_settings(meta, model_required=False)
        except DiT4EditError as error:
            raise DiT4EditError(f"the inversion is not valid: {error}") from None
        trajectory = self.trajectory
        if not isinstance(trajectory, torch.Tensor) or not trajectory.is_floating_point():
            kind = trajectory.dtype if isinstance(trajectory, torch.Tensor) else type(trajectory).__name__
            raise DiT4EditError(f"the inversion's trajectory must be a float tensor, got {kind}")
        channels, factor = ((self.model["latent_channels"], self.model["vae_scale_factor"]) if self.model
                            else (trajectory.shape[1] if trajectory.dim() == 4 else None, None))
        _check_shape(list(trajectory.shape), self.num_inference_steps, tuple(self.original_size), channels, factor,
                     max_pixels, "the inversion")
        check_trajectory_values(trajectory, "the inversion's trajectory")
        return self


def check_trajectory_values(trajectory: torch.Tensor, what: str) -> torch.Tensor:
    """One-line error unless every value is finite and within `MAX_LATENT` (see there)."""
    return checks.finite(trajectory, what, limit=MAX_LATENT)


# --- which model made it ------------------------------------------------------------------------------------------


def model_record(transformer: torch.nn.Module, vae: torch.nn.Module, name: str = "") -> dict:
    """What identifies a model in a saved inversion, from its weights rather than from where they are:

    - `probe`: the first `PROBE_VALUES` values of the transformer's and the VAE's first and last parameters, to 6
      significant digits (survives a change of dtype or device, compared with a tolerance by `check_model`);
    - `fingerprint`: 16 hex digits of a SHA-256 over those parameters' names, shapes and probe values (the same
      weights at the same dtype give the same fingerprint: a key for "made by this model");
    - `latent_channels`, `vae_scale_factor` from the VAE's config;
    - `name`: for messages only, the model's hub id or its folder's last part, never a local path.
    Under accelerate's offloading the values come from the copy its hooks keep. A `DiT4EditError` when a probe
    cannot be taken (weights out of reach): a record without one could not be checked later."""
    probe, described = [], []
    for module in (transformer, vae):
        named = list(module.named_parameters())
        if not named:
            raise DiT4EditError(f"the {type(module).__name__} has no parameters to identify it by")
        for parameter_name, parameter in (named[0], named[-1]):
            values = _parameter_values(module, parameter_name, parameter)
            if values is None:
                raise DiT4EditError("cannot identify the model: its weights are out of reach (offloaded to the meta "
                                    "device with no copy found)")
            head = [float(f"{v:.6g}") for v in values.detach().flatten()[:PROBE_VALUES].float().cpu().tolist()]
            probe += head
            described.append([parameter_name, list(values.shape), head])
    fingerprint = hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return dict(name=display_name(name), fingerprint=fingerprint, latent_channels=int(vae.config.latent_channels),
                vae_scale_factor=scale, probe=probe)


def display_name(name) -> str:
    """A model's name as recorded and shown: a hub id as it is ("owner/model"), a local folder by its last part
    only, so a record never tells where the files are on this machine."""
    text = str(name or "")
    path = Path(text).expanduser()
    local = path.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1 or path.exists()
    return path.name if local and text else text


def check_model(record: dict | None, ours: dict) -> None:
    """One-line error unless the inversion's model `record` matches this model's (`model_record`): same latent
    channels and VAE scale, and a probe of the same length whose values agree within float16/bfloat16 rounding.
    A record with no probe is refused: nothing would show that the weights are the same. `record` None: an
    inversion made in Python without a record, nothing to compare."""
    if record is None:
        return
    for key, what in (("latent_channels", "latent channels"), ("vae_scale_factor", "pixels per latent")):
        if record.get(key) != ours[key]:
            raise DiT4EditError(f"the inversion was made by a model with {record.get(key)} {what}; this model has "
                                f"{ours[key]}: invert the image again with this model")
    theirs = record.get("probe")
    if not theirs or not isinstance(theirs, list):
        raise DiT4EditError("the inversion does not say which weights made it (no weight probe): invert the image "
                            "again with this model")
    import numpy as np

    theirs, mine = np.asarray(theirs, dtype=np.float64), np.asarray(ours["probe"], dtype=np.float64)
    scale = max(float(np.abs(mine).max(initial=0.0)), 1e-8)
    if theirs.shape != mine.shape or not np.allclose(theirs, mine, rtol=2e-2, atol=1e-3 * scale):
        made_by = f" ({checks.printable(display_name(record.get('name')))})" if record.get("name") else ""
        raise DiT4EditError(f"the inversion was made by another model{made_by}: invert the image again with "
                            "this model")


def _parameter_values(module: torch.nn.Module, name: str, parameter: torch.Tensor) -> torch.Tensor | None:
    """A parameter's values; under accelerate's offloading (weights on the meta device) the copy its hook keeps."""
    if parameter.device.type != "meta":
        return parameter
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    hook = getattr(owner, "_hf_hook", None)
    for one in (hook, *(getattr(hook, "hooks", None) or ())):  # a SequentialHook holds the offloading one
        weights = getattr(one, "weights_map", None)
        if weights is not None:
            try:
                return weights[leaf]
            except KeyError:
                continue
    return None


def _parse_metadata(metadata: dict, path: Path) -> dict:
    def bad(message: str) -> DiT4EditError:
        return DiT4EditError(f"{path} is not a valid dit4edit inversion file: {message}")

    if METADATA_KEY not in metadata:
        raise bad("no dit4edit metadata")
    try:
        meta = checks.load_json(metadata[METADATA_KEY], "its metadata")
    except DiT4EditError as error:
        raise bad(str(error)) from None
    if not isinstance(meta, dict):
        raise bad(f"its metadata is a JSON {type(meta).__name__}, not an object")
    missing = [k for k in _REQUIRED if k not in meta]
    unknown = sorted(set(meta) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise bad(f"missing {', '.join(missing)}" if missing else f"unknown key(s) {', '.join(unknown)}")
    try:
        _check_settings(meta, model_required=True)
    except DiT4EditError as error:
        raise bad(str(error)) from None
    return meta


def _check_settings(meta: dict, model_required: bool) -> None:
    """The settings of an inversion (a file's metadata or an object's fields) have the right types and ranges."""
    if not isinstance(meta["source_prompt"], str) or checks.is_blank(meta["source_prompt"]):
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
    if meta["model"] is not None or model_required:
        _check_model_record(meta["model"])


def _check_model_record(model) -> None:
    if not isinstance(model, dict) or not set(_MODEL_KEYS) <= set(model) or not set(model) <= {*_MODEL_KEYS,
                                                                                              *_MODEL_OPTIONAL}:
        raise DiT4EditError(f"model must be an object with {', '.join(_MODEL_KEYS)} (and optionally "
                            f"{', '.join(_MODEL_OPTIONAL)})")
    if not isinstance(model["name"], str):
        raise DiT4EditError("model name must be text")
    family = model.get("family")
    if family is not None and not (isinstance(family, str) and 1 <= len(family) <= 32
                                   and all(c.isascii() and (c.isalnum() or c in ".-_") for c in family)):
        raise DiT4EditError("model family must be a short name (letters, digits, '.', '-', '_')")
    fingerprint = model.get("fingerprint")
    if fingerprint is not None and not (isinstance(fingerprint, str) and 1 <= len(fingerprint) <= 64
                                        and all(c in "0123456789abcdef" for c in fingerprint)):
        raise DiT4EditError("model fingerprint must be hex digits")
    checks.integer(model["latent_channels"], "model latent_channels", 1, 1024)
    checks.integer(model["vae_scale_factor"], "model vae_scale_factor", 1, 64)
    probe = model["probe"]
    if not (isinstance(probe, list) and 1 <= len(probe) <= 256 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in probe)):
        raise DiT4EditError("model probe must be a non-empty list of finite numbers (the weights that made it)")


def _check_tensors(names, shapes, meta: dict, path: Path, max_pixels: int) -> None:
    """The trajectory's name and shape fit the settings, and the image it decodes to fits `max_pixels`."""
    if names != ["trajectory"]:
        raise DiT4EditError(f"{path} is not a valid dit4edit inversion file: tensors {names}, expected trajectory")
    model = meta["model"]
    _check_shape(list(shapes["trajectory"]), meta["num_inference_steps"], tuple(meta["original_size"]),
                 model["latent_channels"], model["vae_scale_factor"], max_pixels, str(path),
                 bad=f"{path} is not a valid dit4edit inversion file: ")


def _check_shape(shape: list[int], steps: int, size: tuple[int, int], channels: int | None, factor: int | None,
                 max_pixels: int, what: str, bad: str = "") -> None:
    """A trajectory of `shape` holds `steps + 1` latents of an image of `size` (width, height) at its work size,
    which fits `max_pixels` (`images.check_size`: the pixels as computed). `factor` None: any whole scale."""
    width, height = size
    imgs.check_size((width, height), max_pixels, what=f"the image of {what}")
    work = imgs.work_size((width, height))
    if factor is None and len(shape) == 4 and shape[3] > 0 and work[0] % shape[3] == 0:
        factor = work[0] // shape[3]
    expected = [steps + 1, channels, work[1] // (factor or 1), work[0] // (factor or 1)]
    if shape != expected or factor is None or work[1] % factor or work[0] % factor:
        shown = [e if e is not None else "C" for e in expected]
        raise DiT4EditError(f"{bad}its trajectory is {shape}; {steps} steps of a {width}x{height} image need {shown}"
                            if bad else f"{what}'s trajectory is {shape}; {steps} steps of a {width}x{height} "
                            f"image need {shown}")
