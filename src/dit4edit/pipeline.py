"""DiT4EditPipeline: encode -> invert -> edit -> decode, written out step by step, on any model family behind the
backbone seam (`dit4edit.backbones`): prompts, the denoiser, the schedule, the token grid, latent scaling and noise
come from `pipe.backbone`."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from . import checks
from .backbones import Backbone, backbone_for
from . import images as imgs
from .compiling import blocks_compiled, compile_blocks
from .control import AttentionControl, AttentionController, install
from .control.controller import quiet_dry_run
from .control.joint import JointController, install_joint, joint_controller_for
from .errors import DiT4EditError
from .layout import SOURCE, BatchLayout
from .inversion_file import GENERATED, Inversion, check_model, model_record
from .merging import token_merging
from .masks import latent_mask, load_mask, paste_outside, pixel_mask
from .hub import dtype_kwarg, hub_prompt_length, one_line, quiet_loaders
from .model_folder import (EMBEDDED_MODEL, ModelDefaults, check_component_shapes,
                           check_folder, default_model, local_folder)
from .backbones.pixart import preprocess as _prepared  # the text the PixArt controller aligns
from .prompts import PIXART_ALPHA_TOKENS
from .result import EditResult
from .request import UNCHANGED, EditRequest, Resolved, Settings, resolve, run
from .solvers import INVERSIONS, SAMPLERS, Schedule

__all__ = ["DiT4EditPipeline", "EditResult", "Inversion", "EMBEDDED_MODEL", "default_model"]

logger = logging.getLogger(__name__)


#: A local-blend mask covering at least this fraction of the image blends (almost) nothing: the user is told.
BLEND_EVERYWHERE = 0.95


class DiT4EditPipeline(DiffusionPipeline):
    """Training-free text-guided editing on diffusion transformers (DiT4Edit, arXiv 2411.03286).

    Loads any PixArt-alpha / Sigma, Stable Diffusion 3 / 3.5 or FLUX.1 checkpoint in diffusers layout (a hub id such
    as `PixArt-alpha/PixArt-XL-2-512x512`, or a local folder) with `from_pretrained`; the family's backbone
    (`self.backbone`, from `dit4edit.backbones`) is how every method here reaches the network.

    Memory: diffusers' `enable_model_cpu_offload()` (one model on the GPU at a time) and
    `enable_sequential_cpu_offload()` (one layer at a time) work with every method here, as do
    `vae.enable_tiling()` and `vae.enable_slicing()`; each method sends offloaded models back to the CPU when it
    returns. `compile_blocks()` compiles the transformer blocks with `torch.compile`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    #: The text encoders of the joint-attention families (SD3: two CLIPs and T5; FLUX: CLIP and T5).
    _optional_components = ["text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    #: Settings used where a caller passes None: the model folder's `dit4edit.json`, else the library's.
    defaults: ModelDefaults = ModelDefaults()

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler,
                 max_sequence_length: int = PIXART_ALPHA_TOKENS, text_encoder_2=None, tokenizer_2=None,
                 text_encoder_3=None, tokenizer_3=None):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler)
        extra = dict(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                     tokenizer_3=tokenizer_3)
        self.register_modules(**extra)  # None in a PixArt folder (diffusers saves no None optional component)
        if text_encoder_2 is not None:
            self.model_cpu_offload_seq = "->".join(
                ["text_encoder", "text_encoder_2", *(["text_encoder_3"] if text_encoder_3 is not None else []),
                 "transformer", "vae"])
        self._vocabulary_warned: set[str] = set()  # prompts already warned about (see `check_prompt`)
        self.register_to_config(max_sequence_length=int(max_sequence_length))

    @property
    def backbone(self) -> Backbone:
        """The model family's backbone (`dit4edit.backbones.backbone_for`), rebuilt when the transformer changes."""
        backbone = self.__dict__.get("_backbone")
        if backbone is None or backbone.transformer is not self.transformer:
            backbone = backbone_for(self, self.max_sequence_length)
            self.__dict__["_backbone"] = backbone
        return backbone

    @property
    def max_sequence_length(self) -> int:
        """How many T5 tokens the model reads per prompt (padding included): a setting of the model, saved in its
        `model_index.json` (120 for PixArt-alpha, 300 for PixArt-Sigma)."""
        return self.config.max_sequence_length

    # --- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> DiT4EditPipeline:
        """`DiffusionPipeline.from_pretrained` with a one-line `DiT4EditError` for anything that is not a
        pipeline of a family dit4edit runs (missing folder, bad model_index.json, missing components or weights,
        pickled weights, a transformer no backbone runs, components that do not fit together; see `model_folder`).
        Weights load from safetensors only. Every component loads as `dtype` (default float32): transformers would otherwise
        keep the stored dtype of the text encoder (float16 in half-precision checkpoints), which is slow and lossy
        on a CPU. A folder's `dit4edit.json` becomes `pipe.defaults`."""
        name = str(pretrained_model_name_or_path)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or torch.float32
        kwargs[dtype_kwarg()] = dtype
        if kwargs.setdefault("use_safetensors", True) is not True:
            raise DiT4EditError("dit4edit loads safetensors weights only (use_safetensors=True)")
        folder = local_folder(name)
        info = check_folder(folder) if folder is not None else None
        defaults = info.defaults if info is not None else ModelDefaults()
        try:
            with quiet_loaders():
                if "max_sequence_length" not in kwargs:  # the model's prompt length (Sigma: 300 T5 tokens)
                    kwargs["max_sequence_length"] = (info.max_sequence_length if info is not None
                                                     else hub_prompt_length(name, kwargs))
                pipe = super().from_pretrained(str(folder) if folder is not None else name, **kwargs)
        except DiT4EditError:
            raise
        except Exception as error:
            raise DiT4EditError(f"cannot load model {name}: {one_line(error)}") from error  # --debug shows it
        family = pipe.backbone.family  # a one-line error for a transformer no backbone runs
        if family == "pixart":
            check_component_shapes(dict(pipe.transformer.config), dict(pipe.vae.config),
                                   pipe.text_encoder.config.to_dict(), name)
        pipe.defaults = defaults
        return pipe

    def model_record(self) -> dict:
        """What identifies this model in a saved inversion (`inversion_file.model_record`): a fingerprint and a
        probe of its weights, its latent channels and VAE scale, and its name (never a local path)."""
        name = str(self.config.get("_name_or_path") or "") if hasattr(self, "config") else ""
        return {**model_record(self.transformer, self.vae, name), "family": self.backbone.family}

    def check_inversion(self, inversion: Inversion) -> Inversion:
        """One-line error unless `inversion` is a valid `Inversion` (`Inversion.check`) whose trajectory fits this
        model and which this model made (`inversion_file.check_model`)."""
        if not isinstance(inversion, Inversion):
            raise DiT4EditError(f"inversion must be an Inversion, got {type(inversion).__name__}")
        if not isinstance(inversion.model, (dict, type(None))):
            raise DiT4EditError(f"the inversion's model record must be an object, got {type(inversion.model).__name__}")
        ours = self.model_record()
        family = (inversion.model or {}).get("family", ours["family"])  # records from before families: unchecked
        if family != ours["family"]:
            raise DiT4EditError(f"the inversion was made by a {checks.printable(str(family))} model; this is a "
                                f"{ours['family']} model: invert the image again with this model")
        check_model(inversion.model, ours)  # another model's inversion: say that first
        inversion.check()
        expected = (inversion.num_inference_steps + 1, self.backbone.latent_channels,
                    *self.latent_size(inversion.original_size))
        if tuple(inversion.trajectory.shape) != expected:
            raise DiT4EditError(f"the inversion's trajectory is {tuple(inversion.trajectory.shape)}; its settings and "
                                f"this model need {expected}")
        return inversion

    # --- prompts, latents, images ----------------------------------------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompts as the model's text sequence, encoded as the family's diffusers pipeline encodes them
        (`Backbone.encode_prompts`; PixArt: lower-cased and stripped, then `max_sequence_length` T5 tokens).
        Returns `(prompt_embeds (B, L, D), prompt_attention_mask (B, L) or None where the family has none)`."""
        text = self.backbone.encode_prompts(prompts)
        return text.prompt_embeds.to(self._dtype), text.prompt_attention_mask

    def check_prompt(self, prompt: str, what: str = "prompt") -> str:
        """One-line error for a prompt that is not text, is empty or is over the model's `max_sequence_length` T5
        tokens; a one-line warning for words outside the model's vocabulary (`defaults.vocabulary`). Both see the
        prompt as the text encoder does (`prompts.preprocess_prompt`)."""
        checks.prompt(prompt, what)
        prompt = _prepared(prompt)
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
        """(1, C, h, w) latent of an RGB image whose sides are multiples of 16 (posterior mean, shifted and scaled
        as the family does)."""
        pixels = imgs.to_tensor(image).to(self._execution_device, self.vae.dtype)
        return self.backbone.to_latent(self.vae.encode(pixels).latent_dist.mean)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """Decode (B, C, h, w) latents; resize to `size` (width, height) when given."""
        latents = self.backbone.from_latent(latents.to(self._execution_device, self.vae.dtype))
        decoded = self.vae.decode(latents).sample
        return [imgs.resize(imgs.to_image(x), size) if size else imgs.to_image(x) for x in decoded]

    def prepare_input(self, image, max_pixels: int = imgs.MAX_PIXELS) -> Image.Image:
        """The input image (a PIL image or a file path) as RGB at its own size, its work size checked against
        `max_pixels`."""
        checks.integer(max_pixels, "max_pixels", 1)
        if isinstance(image, (str, os.PathLike)):
            return imgs.load_image(image, max_pixels)
        if not isinstance(image, Image.Image):
            raise DiT4EditError(f"the image must be a PIL image or a file path, got {type(image).__name__}")
        imgs.check_size(image.size, max_pixels)
        return imgs.to_rgb(image)

    def prepare_image(self, image, max_pixels: int = imgs.MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
        """(RGB image at the working size, original (width, height))."""
        image = self.prepare_input(image, max_pixels)
        return imgs.resize(image, imgs.work_size(image.size)), image.size

    @staticmethod
    def prepare_mask(mask, size: tuple[int, int]) -> Image.Image | torch.Tensor:
        """A user mask (a file, a PIL image, or an (h, w) tensor at latent resolution) in the form `edit` uses:
        an "L" image of the input's `size` (255 = editable) or the tensor."""
        return mask if isinstance(mask, torch.Tensor) else load_mask(mask, size)

    def latent_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the latent of an image of `size` (width, height): its work size over the VAE's factor."""
        width, height = imgs.work_size(size)
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    @property
    def num_blocks(self) -> int:
        """Transformer blocks (the block ranges of attention control and merging index them)."""
        return (len(self.transformer.transformer_blocks)  # FLUX: double-stream blocks, then single-stream ones
                + len(getattr(self.transformer, "single_transformer_blocks", ())))

    def check_edit(self, source: str, targets: Sequence[str], settings: Resolved, size: tuple[int, int],
                   mask=None) -> None:
        """Everything about an edit that depends on the model, checked before any inversion: the prompts against
        the tokenizer and vocabulary, and the attention controller built on a stand-in inversion of the right
        shape (words, block ranges, the mask)."""
        self.check_prompt(source, "source prompt")
        for k, target in enumerate(targets):
            self.check_prompt(target, "target prompt" if len(targets) == 1 else f"target prompt {k + 1}")
        stand_in = Inversion(trajectory=torch.zeros(1, self.backbone.latent_channels, *self.latent_size(size)),
                             source_prompt=source, num_inference_steps=settings.steps, guidance_scale=1.0,
                             method="stand-in", original_size=tuple(size))
        with quiet_dry_run():  # the edit builds its own controller and says what it warns about once
            self.make_controller(settings.control, stand_in, list(targets), mask, record_words=True)

    # --- the denoiser ----------------------------------------------------------------------------------------

    def make_denoiser(self, prompts: Sequence[str], guidance_scale: float, schedule: Schedule,
                      size: tuple[int, int] | None = None, step_kwargs: bool = False,
                      layout: BatchLayout | None = None):
        """`denoise(x, i) -> D`: the model's data prediction at point i for the latents x (one row per prompt, the
        source first), guidance applied as the family guides (`Backbone.denoiser`). The transformer sees the rows of
        `layout` (default `Backbone.layout`: the prompts as branches, with unconditional rows when the family uses
        classifier-free guidance and `guidance_scale > 1`). With `step_kwargs` the step index reaches the attention
        processors as `step_index=i`. `size` is unused (the backbone reads it from the latents); kept for callers."""
        layout = layout or self.backbone.layout(len(prompts) - 1, guidance_scale)
        return self.backbone.denoiser(prompts, schedule, guidance_scale, layout, step_kwargs=step_kwargs)

    def _micro_conditions(self, size: tuple[int, int], rows: int) -> dict:
        """The size conditions of a model that takes them (the PixArt 1024 models): `Backbone.micro_conditions`
        for an image of `size` (width, height); {} for a family without them."""
        conditions = getattr(self.backbone, "micro_conditions", None)
        latent_hw = (size[1] // self.vae_scale_factor, size[0] // self.vae_scale_factor)
        return {} if conditions is None else conditions(latent_hw, rows)

    @property
    def vae_scale_factor(self) -> int:
        return self.backbone.vae_scale_factor

    def default_size(self) -> int:
        """The side in pixels the transformer was built for (512 or 1024 for PixArt-alpha)."""
        sample_size = self.transformer.config.get("sample_size") or 128  # FLUX has none: FluxPipeline's 128
        return sample_size * self.vae_scale_factor

    def _schedule(self, num_inference_steps: int, latent_hw: tuple[int, int]) -> Schedule:
        """The family's schedule (`Backbone.schedule`); a flow schedule starts just short of pure noise
        (`flow.INVERTIBLE_SIGMA_MAX`), where DPM-Solver++ and the exact inversions are defined."""
        from .backbones.flow import INVERTIBLE_SIGMA_MAX  # deferred: only the flow families need it

        sigma_max = INVERTIBLE_SIGMA_MAX if self.backbone.prediction == "flow" else 1.0
        return self.backbone.schedule(checks.steps(num_inference_steps), tuple(latent_hw), sigma_max)

    def _settings(self, num_inference_steps: int | None, guidance_scale: float | None,
                  method: str | None = None, tol: float | None = None, max_pixels: int | None = None) -> Resolved:
        """These choices resolved against `self.defaults` (`request.resolve`: the one place settings resolve)."""
        return resolve(Settings(steps=num_inference_steps, guidance=guidance_scale, inversion=method, tol=tol,
                                max_pixels=max_pixels), self.defaults)

    def _solver_dtype(self) -> torch.dtype:
        return torch.float32 if self._execution_device.type == "mps" else torch.float64

    def _progress(self, disable: bool | None) -> bool:
        config = getattr(self, "_progress_bar_config", {}) or {}
        return bool(config.get("disable", False)) if disable is None else disable

    # --- invert, edit, generate ------------------------------------------------------------------------------

    @torch.no_grad()
    def invert(self, image, source_prompt: str, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, method: str | None = None, tol: float | None = None,
               max_pixels: int = imgs.MAX_PIXELS, disable_progress: bool | None = None) -> Inversion:
        """Invert `image` under `source_prompt`: the latent trajectory that the matching sampler (2M for dpm*,
        DDIM for ddim*) turns back into the image. Invert at the guidance the edit will use, or edit with
        `pin_source=True` (the default), which makes the source branch follow the stored trajectory anyway.
        Steps, guidance, method and tolerance default to the model's settings (`self.defaults`)."""
        settings = self._settings(num_inference_steps, guidance_scale, method, tol, max_pixels)
        self.check_prompt(source_prompt, "source prompt")
        work, original_size = self.prepare_image(image, settings.max_pixels)
        schedule = self._schedule(settings.steps, self.latent_size(work.size))
        latent = self.encode_image(work).to(self._solver_dtype())
        denoise = self.make_denoiser([source_prompt], settings.guidance, schedule, work.size)
        result = INVERSIONS[settings.inversion](denoise, latent, schedule, tol=settings.tol,
                                                disable=self._progress(disable_progress))
        self.maybe_free_model_hooks()
        return Inversion(
            trajectory=torch.cat(result.trajectory).cpu(),  # (N + 1, C, h, w)
            source_prompt=source_prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            method=settings.inversion, original_size=original_size, nfe=result.nfe, residuals=result.residuals,
            model=self.model_record(),
        )  # fmt: skip

    @torch.no_grad()
    def generate(self, prompt: str, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, disable_progress: bool | None = None,
                 max_pixels: int = imgs.MAX_PIXELS) -> tuple[Image.Image, Inversion]:
        """Generate from `prompt` with DPM-Solver++(2M) and keep the trajectory, so the image can be edited
        without inversion ("generate, then edit"). Height and width default to the model's native size
        (`default_size`), steps and guidance to `self.defaults`."""
        settings = self._settings(num_inference_steps, guidance_scale, max_pixels=max_pixels)
        native = self.default_size()
        width = native if width is None else checks.integer(width, "width", 1)
        height = native if height is None else checks.integer(height, "height", 1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise DiT4EditError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.check_prompt(prompt)
        imgs.check_size((width, height), settings.max_pixels)
        size = imgs.work_size((width, height))
        latent_hw = self.latent_size((width, height))
        schedule = self._schedule(settings.steps, latent_hw)
        noise = self.backbone.noise(1, latent_hw, generator)  # (1, C, h, w) float32, drawn as the family does
        x = noise.to(self._execution_device, self._solver_dtype())
        denoise = self.make_denoiser([prompt], settings.guidance, schedule, size)
        trajectory = SAMPLERS["dpm"](denoise, x, schedule, disable=self._progress(disable_progress))
        inversion = Inversion(trajectory=torch.cat(trajectory).cpu(), source_prompt=prompt,
                              num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                              method=GENERATED, original_size=(width, height), model=self.model_record())
        image = self.decode_latents(trajectory[-1], (width, height))[0]
        self.maybe_free_model_hooks()
        return image, inversion

    @torch.no_grad()
    def edit(self, inversion: Inversion, target_prompt: str | Sequence[str], guidance_scale: float | None = None,
             pin_source: bool = True, control=UNCHANGED, mask=None, merge=UNCHANGED, record_words: bool = False,
             disable_progress: bool | None = None, rows: int = 4, source_image: Image.Image | None = None,
             direct_inversion: bool = False, sampler=None) -> EditResult:
        """Denoise the source branch and one branch per target prompt in one batch from the inverted latent.

        The settings mean what `request.Settings` says (`control`: changes to the model's attention control, an
        `AttentionControl`, or None; `merge`: changes to patch merging, a `MergeConfig`, or None; `mask`: a file,
        a PIL image of the input's size or an (h, w) latent tensor; `guidance_scale`: default the inversion's).
        `source_image` (the input at its original size) is what a mask keeps outside it, pixel for pixel (default:
        the decoded source branch). `record_words` keeps every word's cross-attention maps in `result.controller`.
        To edit from an image and prompts, build an `EditRequest` and `request.run` it (or call the pipeline).
        `sampler`: a method's own step (`editing_methods`), called as `sampler(denoise, x, schedule, callback,
        disable, layout=, trajectory=)` in place of the inversion's sampler; None = the inversion's."""
        if not isinstance(target_prompt, (str, list, tuple)) or (not isinstance(target_prompt, str) and not target_prompt):
            raise DiT4EditError("target_prompt must be a prompt or a non-empty list of prompts")
        targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
        for k, prompt in enumerate(targets):
            self.check_prompt(prompt, "target prompt" if len(targets) == 1 else f"target prompt {k + 1}")
        inversion = self.check_inversion(inversion)
        settings = resolve(Settings(guidance=guidance_scale, control=control, merge=merge, pin_source=pin_source,
                                    direct_inversion=direct_inversion, rows=rows), self.defaults, inversion,
                           self.num_blocks)
        if source_image is not None:
            if not isinstance(source_image, Image.Image):
                raise DiT4EditError(f"source_image must be a PIL image, got {type(source_image).__name__}")
            if source_image.size != tuple(inversion.original_size):
                raise DiT4EditError(f"source_image is {source_image.size[0]}x{source_image.size[1]}, the "
                                    f"inversion's image is {inversion.original_size[0]}x{inversion.original_size[1]}")
        mask = None if mask is None else self.prepare_mask(mask, inversion.original_size)
        final, controller = self._denoise_edit(inversion, targets, settings, mask, record_words, disable_progress,
                                               sampler)
        decoded = self.decode_latents(final, inversion.original_size)
        images = decoded[SOURCE + 1 :]
        if mask is not None:
            keep = decoded[SOURCE] if source_image is None else imgs.to_rgb(source_image)
            outline = pixel_mask(mask, inversion.original_size)
            images = [paste_outside(image, keep, outline, radius=self.vae_scale_factor) for image in images]
        elif isinstance(controller, AttentionController):
            self._warn_blend_everywhere(controller, inversion.num_inference_steps)
        self.maybe_free_model_hooks()
        return EditResult(images=images, reconstruction=decoded[SOURCE], latents=final.cpu(), controller=controller)

    def _denoise_edit(self, inversion: Inversion, targets: list[str], settings: Resolved, mask, record_words: bool,
                      disable_progress: bool | None, sampler=None) -> tuple[torch.Tensor, AttentionController | None]:
        """The edit's denoising loop: the source and target branches in one batch (`BatchLayout`), attention
        control and patch merging installed around it; returns the final latents (source first)."""
        layout = self.backbone.layout(len(targets), settings.guidance, settings.rows)
        trajectory = inversion.trajectory.to(self._execution_device, self._solver_dtype())  # (N + 1, C, h, w)
        latent_hw = tuple(trajectory.shape[-2:])
        schedule = self._schedule(inversion.num_inference_steps, latent_hw)
        size = (latent_hw[1] * self.vae_scale_factor, latent_hw[0] * self.vae_scale_factor)
        grid = self._token_grid(latent_hw)
        merge = settings.merge
        if merge is not None and merge.merge_ff and merge.applies(grid) and blocks_compiled(self.transformer):
            raise DiT4EditError("merging the feed-forward (merge_ff) does not work on compiled transformer blocks")
        merges = merge is not None and merge.applies(grid)
        if self.joint:  # merging runs inside the joint processors, on image tokens only
            controller = self._joint_controller(settings.control, inversion, targets, mask, False, layout,
                                                merge if merges else None)
        else:
            controller = self.make_controller(settings.control, inversion, targets, mask, record_words, layout)
        denoise = self.make_denoiser([inversion.source_prompt, *targets], settings.guidance, schedule, size,
                                     step_kwargs=controller is not None or merges, layout=layout)
        x = trajectory[:1].expand(layout.branches, -1, -1, -1).clone()  # (branches, C, h, w), source first

        def on_step(i: int, x_next: torch.Tensor) -> torch.Tensor:
            if settings.direct_inversion:  # every branch takes the source's step error (the source's is pinned next)
                x_next = x_next + (trajectory[i + 1] - layout.source(x_next))  # (branches, C, h, w) + (C, h, w)
            if settings.pin_source:
                x_next = layout.with_source(x_next, trajectory[i + 1 : i + 2])
            if controller is not None:
                x_next = controller.local_blend(x_next, i)
            return x_next

        if controller is None:
            installed = contextlib.nullcontext()
        elif self.joint:
            installed = install_joint(self.transformer, controller, self.backbone.attention_layers())
        else:
            installed = install(self.transformer, controller)
        merging = (token_merging(self.transformer, merge, grid, plan_row=layout.row(SOURCE, cond=True))
                   if merges and not self.joint else contextlib.nullcontext())  # one plan from the source's cond row
        with installed, merging:
            if sampler is None:
                final = SAMPLERS[inversion.sampler](denoise, x, schedule, callback=on_step,
                                                    disable=self._progress(disable_progress))[-1]
            else:  # a method's own step (`editing_methods`)
                final = sampler(denoise, x, schedule, callback=on_step, disable=self._progress(disable_progress),
                                layout=layout, trajectory=trajectory)[-1]
        checks.finite(final, "the edit's latents")
        return final, controller

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
                               "nothing of the source; name other words or give a mask",
                               checks.printable(words), 100 * float(mask.float().mean()))

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
        if self.joint:
            return self._joint_controller(control, inversion, targets, mask, record_words, layout)
        if control is None:
            if mask is None and not record_words:
                return None
            control = AttentionControl(enabled=False)
        user_mask = None if mask is None else latent_mask(mask, inversion.original_size, latent_hw)
        return AttentionController.for_edit(
            control, self.tokenizer, _prepared(inversion.source_prompt), [_prepared(t) for t in targets],
            num_steps=inversion.num_inference_steps, num_blocks=self.num_blocks, grid=self._token_grid(latent_hw),
            patch_size=self.backbone.grid(latent_hw).patch, user_mask=user_mask, record_words=record_words,
            layout=layout, max_length=self.max_sequence_length,
        )  # fmt: skip

    @property
    def joint(self) -> bool:
        """Whether the model's attention is joint (MM-DiT: SD3 / SD3.5, FLUX) rather than self + cross."""
        return not self.backbone.layers("cross")

    def _joint_controller(self, control: AttentionControl | None, inversion: Inversion, targets: Sequence[str],
                          mask, record_words: bool, layout: BatchLayout | None,
                          merge=None) -> JointController | None:
        """The `JointController` of one edit on a joint-attention model (`control.joint.joint_controller_for`)."""
        return joint_controller_for(self, control, inversion, targets, mask, layout, merge)

    def _token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        grid = self.backbone.grid(latent_hw)
        return grid.height, grid.width

    @torch.no_grad()
    def sdedit(self, image, target_prompt: str, strength: float = 0.6, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, generator: torch.Generator | None = None,
               max_pixels: int = imgs.MAX_PIXELS, disable_progress: bool | None = None,
               return_latent: bool = False) -> Image.Image:
        """SDEdit (Meng et al. 2022), the baseline: noise the input latent to `strength` of the schedule and
        denoise it with the target prompt (2M). No inversion, no attention control. `return_latent`: return
        `(image, final latent (1, C, h, w))`."""
        settings = self._settings(num_inference_steps, guidance_scale, max_pixels=max_pixels)
        checks.number(strength, "strength", 0.0, 1.0, low_open=True)
        self.check_prompt(target_prompt, "target prompt")
        work, original_size = self.prepare_image(image, settings.max_pixels)
        schedule = self._schedule(settings.steps, self.latent_size(work.size))
        start = min(settings.steps - 1, round(settings.steps * (1.0 - strength)))
        tail = schedule.tail(start)
        latent = self.encode_image(work).to(self._solver_dtype())
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent)
        x = tail.alphas[0].item() * latent + tail.sigmas[0].item() * noise
        denoise = self.make_denoiser([target_prompt], settings.guidance, tail, work.size)
        final = SAMPLERS["dpm"](denoise, x, tail, disable=self._progress(disable_progress))[-1]
        image = self.decode_latents(final, original_size)[0]
        self.maybe_free_model_hooks()
        return (image, final) if return_latent else image

    @torch.no_grad()
    def flowedit(self, image, source_prompt: str, target_prompt: str, num_inference_steps: int = 28,
                 n_max: int = 24, source_guidance: float = 1.5, target_guidance: float = 5.5,
                 generator: torch.Generator | None = None, max_pixels: int = imgs.MAX_PIXELS,
                 disable_progress: bool | None = None) -> Image.Image:
        """FlowEdit (Kulikov et al. 2024), inversion-free, on the flow families (`editing_methods.flowedit`)."""
        from .editing_methods import flowedit  # deferred: the methods module builds on this one

        return flowedit(self, image, source_prompt, target_prompt, num_inference_steps, n_max, source_guidance,
                        target_guidance, generator, max_pixels, disable_progress)

    @torch.no_grad()
    def reconstruct(self, image, source_prompt: str, num_inference_steps: int | None = None,
                    guidance_scale: float | None = None, method: str | None = None, tol: float | None = None,
                    max_pixels: int = imgs.MAX_PIXELS, disable_progress: bool | None = None
                    ) -> tuple[Image.Image, dict]:
        """Invert, then regenerate with the same prompt, guidance and matching sampler; report how close it came.

        Returns the regenerated image and `latent_nmse` (regenerated vs encoded input, ||a-b||^2/||b||^2), `nfe`,
        `psnr` (output vs input image), `vae_psnr` (VAE round trip alone, the floor of any edit) and, for the exact
        methods, `step_residual` (the largest relative residual of the sampler's step equations, None for the naive
        ones). A small step residual with a large `latent_nmse` means the inversion is exact but sampling amplifies
        its last digits (an unstable trajectory of the model), not that the solver failed.
        Steps, guidance and method default to `self.defaults`."""
        settings = self._settings(num_inference_steps, guidance_scale, method, tol, max_pixels)
        self.check_prompt(source_prompt, "source prompt")
        original = self.prepare_input(image, settings.max_pixels)
        work = imgs.resize(original, imgs.work_size(original.size))
        inversion = self.invert(work, source_prompt, settings.steps, settings.guidance, settings.inversion,
                                settings.tol, settings.max_pixels, disable_progress)
        schedule = self._schedule(settings.steps, self.latent_size(work.size))
        denoise = self.make_denoiser([source_prompt], settings.guidance, schedule, work.size)
        start = inversion.latent.unsqueeze(0).to(self._execution_device, self._solver_dtype())
        regenerated = SAMPLERS[inversion.sampler](denoise, start, schedule,
                                                  disable=self._progress(disable_progress))[-1]
        target = inversion.input_latent.unsqueeze(0).to(regenerated)
        nmse = ((regenerated - target).norm() ** 2 / target.norm() ** 2).item()
        output = self.decode_latents(regenerated, original.size)[0]
        vae_only = self.decode_latents(target, original.size)[0]
        self.maybe_free_model_hooks()
        stats = dict(method=settings.inversion, steps=settings.steps, guidance=settings.guidance, latent_nmse=nmse,
                     nfe=inversion.nfe, psnr=imgs.psnr(output, original), vae_psnr=imgs.psnr(vae_only, original),
                     step_residual=max(inversion.residuals) if inversion.residuals else None)
        return output, stats

    @torch.no_grad()
    def __call__(self, image, source_prompt: str, target_prompt: str | Sequence[str],
                 settings: Settings | None = None, *, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, inversion_method: str | None = None,
                 disable_progress: bool | None = None, **options) -> EditResult:
        """Invert `image` under `source_prompt`, then edit it towards `target_prompt`: an `EditRequest` run by
        `request.run`, as every surface runs one. `settings` (a `request.Settings`) and `options` by name
        (`steps=10`, `self_replace_steps=0.5`, `mask="m.png"`, `no_merge=True`, ...; see `request.OPTIONS`) say
        how; what they leave open comes from the model's settings. `num_inference_steps`, `guidance_scale` and
        `inversion_method` are diffusers' names for the options `steps`, `guidance` and `inversion`."""
        named = {"steps": num_inference_steps, "guidance": guidance_scale, "inversion": inversion_method}
        options = {**{k: v for k, v in named.items() if v is not None}, **options}
        settings = (settings or Settings()).with_options(options, "option")
        request = EditRequest(targets=target_prompt, source=source_prompt, image=image, settings=settings)
        return run(self, request, disable_progress=disable_progress)[0]
