"""DiT4EditPipeline: encode -> invert -> edit -> decode on PixArt-alpha, written out step by step."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PixArtTransformer2DModel
from PIL import Image
from transformers import T5EncoderModel

from . import checks
from . import images as imgs
from .compiling import blocks_compiled, compile_blocks
from .control import AttentionControl, AttentionController, install
from .errors import DiT4EditError
from .layout import SOURCE, BatchLayout
from .inversion_file import GENERATED, Inversion
from .merging import MergeConfig, token_merging
from .model_folder import (DEFAULT_PROMPT_LENGTH, EMBEDDED_MODEL, ModelDefaults, check_component_shapes,
                           check_folder, default_model, local_folder, prompt_length)
from .prompts import PIXART_ALPHA_TOKENS
from .solvers import INVERSIONS, SAMPLERS, Schedule

__all__ = ["DiT4EditPipeline", "EditResult", "Inversion", "EMBEDDED_MODEL", "default_model"]

logger = logging.getLogger(__name__)


@dataclass
class EditResult:
    images: list[Image.Image]  # one per target prompt, at the input's original size
    reconstruction: Image.Image  # the source branch decoded: what the edit keeps
    latents: torch.Tensor  # (1 + targets, C, h, w) final latents, source first
    controller: AttentionController | None = None  # holds the recorded attention maps, when any


#: What `edit` does when given no control: the model's attention control (`self.defaults.attention_control()`:
#: DiT4Edit's unified control with its documented defaults, or the settings the model's dit4edit.json names).
#: Passing `AttentionControl()` itself asks for the library's defaults whatever the model.
DEFAULT_CONTROL = AttentionControl()
#: Patch merging by default: the paper's ratio 0.8 (stride 3x3), on grids of 1024 tokens (512² images) and up.
DEFAULT_MERGE = MergeConfig()
#: A local-blend mask covering at least this fraction of the image blends (almost) nothing: the user is told.
BLEND_EVERYWHERE = 0.95


def paste_outside(edited: Image.Image, source: Image.Image, mask: Image.Image, radius: int = 8) -> Image.Image:
    """`edited` inside `mask` (L, 255 = editable), `source` outside it, pixel for pixel.

    The seam is feathered inside the mask only: the weight of `edited` is `mask * blur(mask)` (a Gaussian of
    `radius` px), 0 everywhere outside the mask, so outside it the result is exactly `source`."""
    from PIL import ImageFilter

    hard = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0  # (H, W) in {0, 1}
    soft = np.asarray(mask.convert("L").filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
    weight = (hard * np.clip(2.0 * soft, 0.0, 1.0))[..., None]  # (H, W, 1): 1 deep inside, 0 outside
    a = np.asarray(edited.convert("RGB"), dtype=np.float32)
    b = np.asarray(source.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.rint(weight * a + (1.0 - weight) * b).astype(np.uint8))


class DiT4EditPipeline(DiffusionPipeline):
    """Training-free text-guided editing on PixArt-alpha (DiT4Edit, arXiv 2411.03286).

    Loads any PixArt-alpha checkpoint in diffusers layout (`PixArt-alpha/PixArt-XL-2-512x512`,
    `PixArt-alpha/PixArt-XL-2-1024-MS`, or a local folder) with `from_pretrained`.

    Memory: diffusers' `enable_model_cpu_offload()` (one model on the GPU at a time) and
    `enable_sequential_cpu_offload()` (one layer at a time) work with every method here, as do
    `vae.enable_tiling()` and `vae.enable_slicing()`; each method sends offloaded models back to the CPU when it
    returns. `compile_blocks()` compiles the transformer blocks with `torch.compile`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    #: Settings used where a caller passes None: the model folder's `dit4edit.json`, else the library's.
    defaults: ModelDefaults = ModelDefaults()

    def __init__(self, tokenizer, text_encoder: T5EncoderModel, vae: AutoencoderKL,
                 transformer: PixArtTransformer2DModel, scheduler, max_sequence_length: int = PIXART_ALPHA_TOKENS):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler)
        self._vocabulary_warned: set[str] = set()  # prompts already warned about (see `check_prompt`)
        self.register_to_config(max_sequence_length=int(max_sequence_length))

    @property
    def max_sequence_length(self) -> int:
        """How many T5 tokens the model reads per prompt (padding included): a setting of the model, saved in its
        `model_index.json` (120 for PixArt-alpha, 300 for PixArt-Sigma)."""
        return self.config.max_sequence_length

    # --- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> DiT4EditPipeline:
        """`DiffusionPipeline.from_pretrained` with a one-line `DiT4EditError` for anything that is not a
        PixArt-style pipeline (missing folder, bad model_index.json, missing components or weights, pickled
        weights, a non-PixArt transformer, components that do not fit together; see `model_folder`). Weights load
        from safetensors only. Every component loads as `dtype` (default float32): transformers would otherwise
        keep the stored dtype of the text encoder (float16 in half-precision checkpoints), which is slow and lossy
        on a CPU. A folder's `dit4edit.json` becomes `pipe.defaults`."""
        name = str(pretrained_model_name_or_path)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or torch.float32
        kwargs[_dtype_kwarg()] = dtype
        if kwargs.setdefault("use_safetensors", True) is not True:
            raise DiT4EditError("dit4edit loads safetensors weights only (use_safetensors=True)")
        folder = local_folder(name)
        info = check_folder(folder) if folder is not None else None
        defaults = info.defaults if info is not None else ModelDefaults()
        try:
            with _quiet_loaders():
                if "max_sequence_length" not in kwargs:  # the model's prompt length (PixArt-Sigma: 300 T5 tokens)
                    kwargs["max_sequence_length"] = (info.max_sequence_length if info is not None
                                                     else _hub_prompt_length(name, kwargs))
                pipe = super().from_pretrained(str(folder) if folder is not None else name, **kwargs)
        except DiT4EditError:
            raise
        except Exception as error:
            raise DiT4EditError(f"cannot load model {name}: {_one_line(error)}") from None
        if not isinstance(pipe.transformer, PixArtTransformer2DModel):
            raise DiT4EditError(f"{name} is not a PixArt model: its transformer is {type(pipe.transformer).__name__}")
        check_component_shapes(dict(pipe.transformer.config), dict(pipe.vae.config),
                               pipe.text_encoder.config.to_dict(), name)
        pipe.defaults = defaults
        return pipe

    def model_record(self) -> dict:
        """What identifies this model in a saved inversion: its name, latent channels, VAE scale, and a probe of
        its weights (the first values of the transformer's and the VAE's first and last parameters) that survives
        a change of dtype or device but not other weights. The probe is empty when the weights are out of reach
        (offloaded to the meta device with no copy found)."""
        probe = []
        for module in (self.transformer, self.vae):
            named = list(module.named_parameters())
            for name, parameter in (named[0], named[-1]):
                values = _parameter_values(module, name, parameter)
                if values is None:
                    probe = []
                    break
                probe += [float(f"{v:.6g}") for v in values.detach().flatten()[:8].float().cpu().tolist()]
            else:
                continue
            break
        name = str(self.config.get("_name_or_path") or "") if hasattr(self, "config") else ""
        return dict(name=name, latent_channels=int(self.vae.config.latent_channels),
                    vae_scale_factor=self.vae_scale_factor, probe=probe)

    def check_inversion(self, inversion: Inversion) -> Inversion:
        """One-line error unless `inversion` was made by this model (see `model_record`) and fits it."""
        record, ours = inversion.model, self.model_record()
        if record is None:
            return inversion
        for key, what in (("latent_channels", "latent channels"), ("vae_scale_factor", "pixels per latent")):
            if record[key] != ours[key]:
                raise DiT4EditError(f"the inversion was made by a model with {record[key]} {what}; this model has "
                                    f"{ours[key]}: invert the image again with this model")
        if not record["probe"] or not ours["probe"]:  # a probe could not be taken: nothing more to compare
            return inversion
        theirs, mine = np.asarray(record["probe"], dtype=np.float64), np.asarray(ours["probe"], dtype=np.float64)
        scale = max(float(np.abs(mine).max(initial=0.0)), 1e-8)
        if theirs.shape != mine.shape or not np.allclose(theirs, mine, rtol=2e-2, atol=1e-3 * scale):
            made_by = f" ({record['name']})" if record["name"] else ""
            raise DiT4EditError(f"the inversion was made by another model{made_by}: invert the image again with "
                                "this model")
        return inversion

    # --- prompts, latents, images ----------------------------------------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings and 0/1 masks as PixArt computes them: `max_sequence_length` (L) tokens, no caption
        cleaning. Returns `(prompt_embeds (B, L, D), prompt_attention_mask (B, L))`."""
        tokens = self.tokenizer(list(prompts), max_length=self.max_sequence_length, padding="max_length",
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self._execution_device)
        embeds = self.text_encoder(tokens.input_ids.to(self._execution_device), attention_mask=mask)[0]
        return embeds.to(self._dtype), mask

    def check_prompt(self, prompt: str, what: str = "prompt") -> str:
        """One-line error for a prompt that is not text, is empty or is over the model's `max_sequence_length` T5
        tokens; a one-line
        warning for words outside the model's vocabulary (`defaults.vocabulary`)."""
        if not isinstance(prompt, str):
            raise DiT4EditError(f"the {what} must be text, got {type(prompt).__name__}")
        if not prompt.strip():
            raise DiT4EditError(f"the {what} is empty")
        count = len(self.tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids)
        if count > self.max_sequence_length:
            raise DiT4EditError(f"the {what} is {count} T5 tokens long; this model reads at most "
                                f"{self.max_sequence_length}")
        if prompt not in self._vocabulary_warned and self.defaults.unknown_words(prompt):
            self._vocabulary_warned.add(prompt)  # once per prompt, not at every check of it
            self.defaults.warn_unknown_words(prompt, what)
        return prompt

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """(1, C, h, w) latent of an RGB image whose sides are multiples of 16 (posterior mean, scaled)."""
        pixels = imgs.to_tensor(image).to(self._execution_device, self.vae.dtype)
        latent = self.vae.encode(pixels).latent_dist.mean
        return latent * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """Decode (B, C, h, w) latents; resize to `size` (width, height) when given."""
        latents = latents.to(self._execution_device, self.vae.dtype) / self.vae.config.scaling_factor
        decoded = self.vae.decode(latents).sample
        return [imgs.resize(imgs.to_image(x), size) if size else imgs.to_image(x) for x in decoded]

    def prepare_image(self, image: Image.Image | str | os.PathLike, max_pixels: int = imgs.MAX_PIXELS):
        """(RGB image at the working size, original (width, height))."""
        checks.integer(max_pixels, "max_pixels", 1)
        if isinstance(image, (str, os.PathLike)):
            image = imgs.load_image(image, max_pixels)
        elif not isinstance(image, Image.Image):
            raise DiT4EditError(f"the image must be a PIL image or a file path, got {type(image).__name__}")
        else:
            imgs.check_size(image.size, max_pixels)
            image = imgs.to_rgb(image)
        return imgs.resize(image, imgs.work_size(image.size)), image.size

    # --- the denoiser ----------------------------------------------------------------------------------------

    def make_denoiser(self, prompts: Sequence[str], guidance_scale: float, schedule: Schedule,
                      size: tuple[int, int], step_kwargs: bool = False, layout: BatchLayout | None = None):
        """`denoise(x, i) -> D`: PixArt's data prediction at point i for the latents x (one row per prompt, the
        source first), classifier-free guidance applied. The transformer sees the rows of `layout` (default: the
        prompts as branches, with unconditional rows when `guidance_scale > 1`, as diffusers decides; at 1 or below
        the conditional prediction alone). With `step_kwargs` the step index reaches the attention processors
        through `cross_attention_kwargs={"step_index": i}`."""
        if layout is None:
            layout = BatchLayout.for_scale(len(prompts) - 1, guidance_scale)
        if layout.branches != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for a layout of {layout.branches} branches")
        cond, cond_mask = self.encode_prompt(prompts)
        uncond, uncond_mask = self.encode_prompt([""]) if layout.guidance else (cond, cond_mask)
        embeds = layout.join_guidance(uncond, cond)  # (rows, L, D)
        mask = layout.join_guidance(uncond_mask, cond_mask)  # (rows, L)
        added = self._micro_conditions(size, layout.rows)
        in_channels = self.transformer.config.in_channels
        device, dtype = self._execution_device, self._dtype

        @torch.no_grad()
        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            model_in = layout.join_guidance(x, x)  # (branches, C, h, w) -> (rows, C, h, w)
            timestep = schedule.timesteps[i].to(device).expand(layout.rows)
            kwargs = {"cross_attention_kwargs": {"step_index": i}} if step_kwargs else {}
            out = self.transformer(model_in.to(device, dtype), encoder_hidden_states=embeds,
                                   encoder_attention_mask=mask, timestep=timestep, added_cond_kwargs=added,
                                   return_dict=False, **kwargs)[0]
            eps = out[:, :in_channels].to(x.dtype)  # PixArt predicts [eps, learned sigma]: keep eps
            eps = layout.guide(eps, guidance_scale)  # (rows, ...) -> (branches, ...)
            a, s = schedule.alphas[i].item(), schedule.sigmas[i].item()
            return (x - s * eps.to(x.device)) / a

        return denoise

    def _micro_conditions(self, size: tuple[int, int], rows: int) -> dict:
        """Resolution and aspect-ratio conditions, used by the 1024 model (`use_additional_conditions`)."""
        if not getattr(self.transformer, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        width, height = size
        device, dtype = self._execution_device, self._dtype
        resolution = torch.tensor([[height, width]], device=device, dtype=dtype).expand(rows, -1)
        aspect = torch.tensor([[height / width]], device=device, dtype=dtype).expand(rows, -1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_size(self) -> int:
        """The side in pixels the transformer was built for (512 or 1024 for PixArt-alpha)."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    def _schedule(self, num_inference_steps: int) -> Schedule:
        return Schedule.from_scheduler(self.scheduler, checks.steps(num_inference_steps))

    def _settings(self, num_inference_steps: int | None, guidance_scale: float | None,
                  method: str | None = None) -> tuple[int, float, str]:
        """(steps, guidance, inversion method): each None filled from `self.defaults`, each checked."""
        defaults = self.defaults
        steps = checks.steps(defaults.num_inference_steps if num_inference_steps is None else num_inference_steps)
        guidance = checks.guidance(defaults.guidance_scale if guidance_scale is None else guidance_scale)
        method = defaults.inversion if method is None else method
        if method not in INVERSIONS:
            raise DiT4EditError(f"unknown inversion method {method!r} (choose from {', '.join(INVERSIONS)})")
        return steps, guidance, method

    def _solver_dtype(self) -> torch.dtype:
        return torch.float32 if self._execution_device.type == "mps" else torch.float64

    def _progress(self, disable: bool | None) -> bool:
        config = getattr(self, "_progress_bar_config", {}) or {}
        return bool(config.get("disable", False)) if disable is None else disable

    # --- invert, edit, generate ------------------------------------------------------------------------------

    @torch.no_grad()
    def invert(
        self,
        image: Image.Image | str | os.PathLike,
        source_prompt: str,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        method: str | None = None,
        tol: float = 1e-5,
        max_pixels: int = imgs.MAX_PIXELS,
        disable_progress: bool | None = None,
    ) -> Inversion:
        """Invert `image` under `source_prompt`: the latent trajectory that the matching sampler (2M for dpm*,
        DDIM for ddim*) turns back into the image. Invert at the guidance the edit will use, or edit with
        `pin_source=True` (the default), which makes the source branch follow the stored trajectory anyway.
        Steps, guidance and method default to `self.defaults`."""
        num_inference_steps, guidance_scale, method = self._settings(num_inference_steps, guidance_scale, method)
        checks.tolerance(tol)
        self.check_prompt(source_prompt, "source prompt")
        work, original_size = self.prepare_image(image, max_pixels)
        schedule = self._schedule(num_inference_steps)
        latent = self.encode_image(work).to(self._solver_dtype())
        denoise = self.make_denoiser([source_prompt], guidance_scale, schedule, work.size)
        result = INVERSIONS[method](denoise, latent, schedule, tol=tol, disable=self._progress(disable_progress))
        self.maybe_free_model_hooks()
        return Inversion(
            trajectory=torch.cat(result.trajectory).cpu(),  # (N + 1, C, h, w)
            source_prompt=source_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            method=method,
            original_size=original_size,
            nfe=result.nfe,
            residuals=result.residuals,
            model=self.model_record(),
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        disable_progress: bool | None = None,
    ) -> tuple[Image.Image, Inversion]:
        """Generate from `prompt` with DPM-Solver++(2M) and keep the trajectory, so the image can be edited
        without inversion ("generate, then edit"). Height and width default to the model's native size
        (`default_size`), steps and guidance to `self.defaults`."""
        num_inference_steps, guidance_scale, _ = self._settings(num_inference_steps, guidance_scale)
        native = self.default_size()
        width = native if width is None else checks.integer(width, "width", 1)
        height = native if height is None else checks.integer(height, "height", 1)
        self.check_prompt(prompt)
        imgs.check_size((width, height))
        size = imgs.work_size((width, height))
        schedule = self._schedule(num_inference_steps)
        factor = self.vae_scale_factor
        shape = (1, self.transformer.config.in_channels, size[1] // factor, size[0] // factor)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        x = noise.to(self._execution_device, self._solver_dtype())
        denoise = self.make_denoiser([prompt], guidance_scale, schedule, size)
        trajectory = SAMPLERS["dpm"](denoise, x, schedule, disable=self._progress(disable_progress))
        inversion = Inversion(trajectory=torch.cat(trajectory).cpu(), source_prompt=prompt,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              method=GENERATED, original_size=(width, height), model=self.model_record())
        image = self.decode_latents(trajectory[-1], (width, height))[0]
        self.maybe_free_model_hooks()
        return image, inversion

    @torch.no_grad()
    def edit(
        self,
        inversion: Inversion,
        target_prompt: str | Sequence[str],
        guidance_scale: float | None = None,
        pin_source: bool = True,
        control: AttentionControl | None = DEFAULT_CONTROL,
        mask: Image.Image | str | os.PathLike | torch.Tensor | None = None,
        merge: MergeConfig | None = DEFAULT_MERGE,
        record_words: bool = False,
        disable_progress: bool | None = None,
        rows: str = "4",
        source_image: Image.Image | None = None,
        direct_inversion: bool = False,
    ) -> EditResult:
        """Denoise the source branch and one branch per target prompt in one batch from the inverted latent.

        `control` is DiT4Edit's unified attention control (`AttentionControl`; None = plain inversion-then-denoise;
        not given = the model's, `self.defaults.attention_control()`).
        `mask` (white = editable, the input's size) keeps the source outside it, overriding the attention-derived
        local-blend mask. `pin_source=True` resets the source branch to the stored trajectory after every step, so
        it reproduces the input whatever the guidance or precision; `False` lets it run free (it still reproduces
        the input when the inversion was exact and made at this guidance). `guidance_scale` defaults to the
        inversion's. `merge` is patch merging around self-attention (ToMe; one plan per step and block from the
        source branch, shared by all branches; None = off); it applies to grids of `merge.min_tokens` and up.
        `record_words` keeps every word's cross-attention maps in `result.controller`. `rows` is the batch layout
        under guidance (`BatchLayout`): "4" runs the source's unconditional row too, "3" leaves it out (one row
        fewer; the target's unconditional row is then not controlled, and the source must be pinned). At
        `guidance_scale <= 1` there are no unconditional rows and the control works on the conditional ones.
        With `mask`, nothing outside it changes, measured in pixels: outside the mask each output shows
        `source_image` (the input, at its original size; default the decoded source branch), blended in over a
        feathered edge inside the mask (see `paste_outside`).
        `direct_inversion=True` (PnP Inversion's "direct inversion", Ju et al. 2024) adds the source branch's error
        of each step, the stored trajectory's next latent minus where the step took the source branch, to every
        target branch too: an inexact (naive) inversion then costs the edit nothing where the target's prediction
        equals the source's, so an edit whose target prompt is the source prompt returns the input's latent. It
        needs `pin_source=True`; with an exact inversion made at this guidance the error is ~0 and it changes little.
        """
        if control is DEFAULT_CONTROL:  # not given: the model's own (its dit4edit.json), else the library's
            control = self.defaults.attention_control()
        _check_edit_arguments(inversion, target_prompt, control, mask, merge, source_image)
        targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
        if not targets:
            raise DiT4EditError("no target prompt given")
        for k, prompt in enumerate(targets):
            self.check_prompt(prompt, "target prompt" if len(targets) == 1 else f"target prompt {k + 1}")
        self.check_inversion(inversion)
        if source_image is not None and source_image.size != tuple(inversion.original_size):
            raise DiT4EditError(f"source_image is {source_image.size[0]}x{source_image.size[1]}, the inversion's "
                                f"image is {inversion.original_size[0]}x{inversion.original_size[1]}")
        guidance = checks.guidance(inversion.guidance_scale if guidance_scale is None else guidance_scale)
        if rows not in ("3", "4"):
            raise DiT4EditError(f'rows must be "3" or "4", got {rows!r}')
        if rows == "3" and not pin_source:
            raise DiT4EditError("the 3-row layout has no unconditional source row: it needs pin_source=True")
        if direct_inversion and not pin_source:
            raise DiT4EditError("direct inversion corrects the targets by the pinned source's error: it needs "
                                "pin_source=True")
        layout = BatchLayout.for_scale(len(targets), guidance, rows)
        schedule = self._schedule(inversion.num_inference_steps)
        trajectory = inversion.trajectory.to(self._execution_device, self._solver_dtype())
        latent_hw = tuple(trajectory.shape[-2:])
        size = (latent_hw[1] * self.vae_scale_factor, latent_hw[0] * self.vae_scale_factor)
        grid = self._token_grid(latent_hw)
        if merge is not None and merge.merge_ff and merge.applies(grid) and blocks_compiled(self.transformer):
            raise DiT4EditError("merging the feed-forward (merge_ff) does not work on compiled transformer blocks")
        merges = merge is not None and merge.applies(grid)
        if merges:
            merge.block_indices(len(self.transformer.transformer_blocks))  # a range outside the model: one-line error
        controller = self.make_controller(control, inversion, targets, mask, record_words, layout)
        denoise = self.make_denoiser([inversion.source_prompt, *targets], guidance, schedule, size,
                                     step_kwargs=controller is not None or merges, layout=layout)
        x = trajectory[:1].expand(layout.branches, -1, -1, -1).clone()  # (branches, C, h, w), source first

        def on_step(i: int, x_next: torch.Tensor) -> torch.Tensor:
            if direct_inversion:  # every branch takes the source's step error (the source's own is pinned next)
                x_next = x_next + (trajectory[i + 1] - layout.source(x_next))  # (branches, C, h, w) + (C, h, w)
            if pin_source:
                x_next = layout.with_source(x_next, trajectory[i + 1 : i + 2])
            if controller is not None:
                x_next = controller.local_blend(x_next, i)
            return x_next

        installed = install(self.transformer, controller) if controller is not None else contextlib.nullcontext()
        merging = (token_merging(self.transformer, merge, grid, plan_row=layout.row(SOURCE, cond=True))
                   if merges else contextlib.nullcontext())  # one plan from the source's conditional row
        with installed, merging:
            final = SAMPLERS[inversion.sampler](denoise, x, schedule, callback=on_step,
                                                   disable=self._progress(disable_progress))[-1]
        decoded = self.decode_latents(final, inversion.original_size)
        images = decoded[SOURCE + 1 :]
        if mask is not None:
            keep = decoded[SOURCE] if source_image is None else imgs.to_rgb(source_image)
            pixel_mask = self._pixel_mask(mask, inversion.original_size)
            images = [paste_outside(image, keep, pixel_mask, radius=self.vae_scale_factor) for image in images]
        elif controller is not None:
            self._warn_blend_everywhere(controller, inversion.num_inference_steps)
        self.maybe_free_model_hooks()
        return EditResult(images=images, reconstruction=decoded[SOURCE], latents=final.cpu(), controller=controller)

    @staticmethod
    def _warn_blend_everywhere(controller: AttentionController, num_steps: int) -> None:
        """A local-blend mask of named words over (nearly) the whole image blends nothing: say so in one line. (A
        blend on the changed words alone is the model's setting, not the user's choice: a background edit rightly
        covers everything.)"""
        if not controller.config.enabled or controller.user_mask is not None or not controller.config.local_blend_words:
            return
        for target, (source_words, target_words) in enumerate(controller.blend_words):
            mask = controller.blend_mask(num_steps - 1, target)
            if mask is not None and float(mask.float().mean()) >= BLEND_EVERYWHERE:
                words = " ".join(dict.fromkeys(source_words + target_words))
                logger.warning("the local-blend mask of %s covers %.0f%% of the image, so the blend keeps (almost) "
                               "nothing of the source; name other words or give a --mask",
                               words, 100 * float(mask.float().mean()))

    def _pixel_mask(self, mask, size: tuple[int, int]) -> Image.Image:
        """The user mask as an "L" image of `size` (width, height), 255 = editable."""
        if isinstance(mask, torch.Tensor):  # (h, w) at latent resolution
            small = Image.fromarray(((mask > 0.5).cpu().numpy() * 255).astype(np.uint8), mode="L")
            return small.resize(size, Image.NEAREST)
        if not isinstance(mask, Image.Image):
            mask = imgs.load_image(mask, what="mask")
        return mask.convert("L").point(lambda v: 255 if v > 127 else 0)

    def compile_blocks(self, **options) -> DiT4EditPipeline:
        """Compile the transformer blocks with `torch.compile(**options)`, attention layers left eager, so attention
        control and token merging keep working without recompiling each step (`dit4edit.compiling`). The first
        call at a new batch or image size compiles; later ones reuse the graphs. Returns the pipeline."""
        compile_blocks(self.transformer, **options)
        return self

    def make_controller(self, control: AttentionControl | None, inversion: Inversion, targets: Sequence[str],
                        mask=None, record_words: bool = False,
                        layout: BatchLayout | None = None) -> AttentionController | None:
        """The attention controller of one edit, or None when nothing is controlled, masked or recorded (a mask or
        recording without control runs with `AttentionControl(enabled=False)`: default attention)."""
        latent_hw = tuple(inversion.trajectory.shape[-2:])
        grid = self._token_grid(latent_hw)
        if control is None:
            if mask is None and not record_words:
                return None
            control = AttentionControl(enabled=False)
        user_mask = None if mask is None else self._latent_mask(mask, inversion.original_size, latent_hw)
        return AttentionController.for_edit(
            control, self.tokenizer, inversion.source_prompt, list(targets),
            num_steps=inversion.num_inference_steps, num_blocks=len(self.transformer.transformer_blocks),
            grid=grid, patch_size=self.transformer.config.patch_size, user_mask=user_mask,
            record_words=record_words, layout=layout, max_length=self.max_sequence_length,
        )

    def _token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        patch = self.transformer.config.patch_size
        return latent_hw[0] // patch, latent_hw[1] // patch

    @staticmethod
    def _latent_mask(mask, original_size: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
        """A user mask (image or path, white = editable, the input's size; or an (h, w) latent tensor) as an
        (h, w) 0/1 tensor at latent resolution."""
        if isinstance(mask, torch.Tensor):
            if tuple(mask.shape) != latent_hw:
                raise DiT4EditError(f"mask tensor is {tuple(mask.shape)}, the latent is {latent_hw}")
            return (mask > 0.5).float()
        if not isinstance(mask, Image.Image):
            mask = imgs.load_image(mask)
        if mask.size != tuple(original_size):
            raise DiT4EditError(f"mask is {mask.size[0]}x{mask.size[1]}, the image is "
                                f"{original_size[0]}x{original_size[1]}; they must match")
        small = mask.convert("L").resize((latent_hw[1], latent_hw[0]), Image.BOX)  # area average
        return (torch.from_numpy(np.asarray(small, dtype=np.float32)) / 255.0 > 0.5).float()

    @torch.no_grad()
    def sdedit(self, image, target_prompt: str, strength: float = 0.6, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, generator: torch.Generator | None = None,
               max_pixels: int = imgs.MAX_PIXELS, disable_progress: bool | None = None) -> Image.Image:
        """SDEdit (Meng et al. 2022), the baseline: noise the input latent to `strength` of the schedule and
        denoise it with the target prompt (2M). No inversion, no attention control."""
        num_inference_steps, guidance_scale, _ = self._settings(num_inference_steps, guidance_scale)
        checks.number(strength, "strength", 0.0, 1.0, low_open=True)
        self.check_prompt(target_prompt, "target prompt")
        work, original_size = self.prepare_image(image, max_pixels)
        schedule = self._schedule(num_inference_steps)
        start = min(num_inference_steps - 1, round(num_inference_steps * (1.0 - strength)))
        tail = schedule.tail(start)
        latent = self.encode_image(work).to(self._solver_dtype())
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent)
        x = tail.alphas[0].item() * latent + tail.sigmas[0].item() * noise
        denoise = self.make_denoiser([target_prompt], guidance_scale, tail, work.size)
        final = SAMPLERS["dpm"](denoise, x, tail, disable=self._progress(disable_progress))[-1]
        image = self.decode_latents(final, original_size)[0]
        self.maybe_free_model_hooks()
        return image

    @torch.no_grad()
    def reconstruct(self, image, source_prompt: str, num_inference_steps: int | None = None,
                    guidance_scale: float | None = None, method: str | None = None, tol: float = 1e-5,
                    max_pixels: int = imgs.MAX_PIXELS, disable_progress: bool | None = None
                    ) -> tuple[Image.Image, dict]:
        """Invert, then regenerate with the same prompt, guidance and matching sampler; report how close it came.

        Returns the regenerated image and `latent_nmse` (regenerated vs encoded input, ||a-b||^2/||b||^2), `nfe`,
        `psnr` (output vs input image), `vae_psnr` (VAE round trip alone, the floor of any edit) and, for the exact
        methods, `step_residual` (the largest relative residual of the sampler's step equations, None for the naive
        ones). A small step residual with a large `latent_nmse` means the inversion is exact but sampling amplifies
        its last digits (an unstable trajectory of the model, seen at 2.5x per step), not that the solver failed.
        Steps, guidance and method default to `self.defaults`."""
        num_inference_steps, guidance_scale, method = self._settings(num_inference_steps, guidance_scale, method)
        checks.tolerance(tol)
        self.check_prompt(source_prompt, "source prompt")
        work, original_size = self.prepare_image(image, max_pixels)
        original = imgs.to_rgb(image) if isinstance(image, Image.Image) else imgs.load_image(image, max_pixels)
        inversion = self.invert(work, source_prompt, num_inference_steps, guidance_scale, method, tol,
                                max_pixels, disable_progress)
        schedule = self._schedule(num_inference_steps)
        denoise = self.make_denoiser([source_prompt], guidance_scale, schedule, work.size)
        start = inversion.latent.unsqueeze(0).to(self._execution_device, self._solver_dtype())
        regenerated = SAMPLERS[inversion.sampler](denoise, start, schedule,
                                                     disable=self._progress(disable_progress))[-1]
        target = inversion.input_latent.unsqueeze(0).to(regenerated)
        nmse = ((regenerated - target).norm() ** 2 / target.norm() ** 2).item()
        output = self.decode_latents(regenerated, original_size)[0]
        vae_only = self.decode_latents(target, original_size)[0]
        self.maybe_free_model_hooks()
        stats = dict(method=method, steps=num_inference_steps, guidance=guidance_scale, latent_nmse=nmse,
                     nfe=inversion.nfe, psnr=imgs.psnr(output, original), vae_psnr=imgs.psnr(vae_only, original),
                     step_residual=max(inversion.residuals) if inversion.residuals else None)
        return output, stats

    @torch.no_grad()
    def __call__(self, image, source_prompt: str, target_prompt: str | Sequence[str],
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 inversion_method: str | None = None,
                 control: AttentionControl | None = DEFAULT_CONTROL, mask=None,
                 merge: MergeConfig | None = DEFAULT_MERGE, pin_source: bool = True,
                 max_pixels: int = imgs.MAX_PIXELS, disable_progress: bool | None = None) -> EditResult:
        """Invert `image` under `source_prompt`, then edit it towards `target_prompt` (see `invert`, `edit`)."""
        inversion = self.invert(image, source_prompt, num_inference_steps, guidance_scale, inversion_method,
                                max_pixels=max_pixels, disable_progress=disable_progress)
        original = None
        if mask is not None:  # the input's own pixels outside the mask
            original = imgs.to_rgb(image) if isinstance(image, Image.Image) else imgs.load_image(image, max_pixels)
        return self.edit(inversion, target_prompt, guidance_scale, pin_source, control, mask, merge,
                         disable_progress=disable_progress, source_image=original)


def _hub_prompt_length(name: str, kwargs: dict) -> int:
    """The prompt length of a hub model, from its model_index.json (`model_folder.prompt_length`); where and how
    to look (`local_files_only`, `revision`, `cache_dir`, `token`) as `kwargs` tell `from_pretrained`."""
    where = {k: kwargs[k] for k in ("local_files_only", "revision", "cache_dir", "token") if k in kwargs}
    try:
        index = DiffusionPipeline.load_config(name, **where)
    except Exception:  # unreachable or not a pipeline: from_pretrained reports it
        return DEFAULT_PROMPT_LENGTH
    return prompt_length(dict(index))


def _dtype_kwarg() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name warns); use the one this install prefers."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def _check_edit_arguments(inversion, target_prompt, control, mask, merge, source_image) -> None:
    """One-line errors for arguments of the wrong type (before they fail deep inside the loop)."""
    expected = (
        ("inversion", inversion, Inversion, False),
        ("target_prompt", target_prompt, (str, list, tuple), False),
        ("control", control, AttentionControl, True),
        ("mask", mask, (Image.Image, str, os.PathLike, torch.Tensor), True),
        ("merge", merge, MergeConfig, True),
        ("source_image", source_image, Image.Image, True),
    )
    for name, value, types, optional in expected:
        if not (isinstance(value, types) or (optional and value is None)):
            raise DiT4EditError(f"{name} must be {_type_names(types)}{' or None' if optional else ''}, "
                                f"got {type(value).__name__}")


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _parameter_values(module: torch.nn.Module, name: str, parameter: torch.Tensor) -> torch.Tensor | None:
    """A parameter's values; under accelerate's offloading (weights on the meta device) the copy its hook keeps."""
    if parameter.device.type != "meta":
        return parameter
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    weights = getattr(getattr(owner, "_hf_hook", None), "weights_map", None)
    try:
        return weights[leaf] if weights is not None else None
    except KeyError:
        return None


@contextlib.contextmanager
def _quiet_loaders():
    """While loading: only errors from diffusers, transformers and huggingface_hub (their warnings and retries
    would print lines before our one-line error); the previous levels come back afterwards."""
    import warnings

    names = ("diffusers", "transformers", "huggingface_hub")
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
