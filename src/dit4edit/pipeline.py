"""DiT4EditPipeline: encode -> invert -> edit -> decode on PixArt-alpha, written out step by step."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PixArtTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import T5EncoderModel

from . import images as imgs
from .control import AttentionControl, AttentionController, install
from .errors import DiT4EditError
from .layout import SOURCE, BatchLayout
from .merging import MergeConfig, token_merging
from .solvers import INVERSIONS, Schedule, sampler_for
from .tokenizer import MAX_TOKENS

REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
#: The embedded default model (a small PixArt-architecture pipeline trained on the synthetic world).
EMBEDDED_MODEL = Path(__file__).parent / "models" / "shapes"


def default_model() -> str:
    """The folder of the embedded model; a `DiT4EditError` when this install has none."""
    if (EMBEDDED_MODEL / "model_index.json").is_file():
        return str(EMBEDDED_MODEL)
    raise DiT4EditError("no --model given and this install has no embedded model; pass a PixArt-alpha folder or hub id")
INVERSION_METHODS = tuple(INVERSIONS)


@dataclass
class Inversion:
    """An inverted (or generated) image: the latent trajectory and everything needed to edit it again.

    `trajectory[0]` is the noisiest latent, `trajectory[-1]` the encoded input; an edit started from
    `trajectory[0]` with the same prompt, steps and guidance regenerates the input (exactly, for exact methods).
    """

    trajectory: torch.Tensor  # (N + 1, C, h, w)
    source_prompt: str
    num_inference_steps: int
    guidance_scale: float
    method: str  # one of INVERSION_METHODS, or "generated"
    original_size: tuple[int, int]  # (width, height) of the input image
    nfe: int = 0
    residuals: list[float] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def latent(self) -> torch.Tensor:
        return self.trajectory[0]

    @property
    def input_latent(self) -> torch.Tensor:
        return self.trajectory[-1]

    @property
    def sampler(self) -> str:
        """The sampler that regenerates this trajectory: "ddim" for ddim inversions, else "dpm"."""
        return "ddim" if self.method.startswith("ddim") else "dpm"

    def save(self, path: str | os.PathLike) -> Path:
        """Save as safetensors (trajectory in float32, metadata as JSON), written atomically."""
        path = Path(path)
        meta = dict(
            source_prompt=self.source_prompt,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            method=self.method,
            original_size=list(self.original_size),
            nfe=self.nfe,
            residuals=self.residuals,
            extra=self.extra,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"trajectory": self.trajectory.float().contiguous().cpu()}, str(tmp),
                  metadata={"dit4edit": json.dumps(meta)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Inversion:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DiT4EditError(f"inversion file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["dit4edit"])
            trajectory = load_file(str(path))["trajectory"]
        except Exception as error:  # safetensors raises several types for a bad file
            raise DiT4EditError(f"{path} is not a dit4edit inversion file ({type(error).__name__})") from None
        meta["original_size"] = tuple(meta["original_size"])
        return cls(trajectory=trajectory.to(torch.float64), **meta)


@dataclass
class EditResult:
    images: list[Image.Image]  # one per target prompt, at the input's original size
    reconstruction: Image.Image  # the source branch decoded: what the edit keeps
    latents: torch.Tensor  # (1 + targets, C, h, w) final latents, source first
    controller: AttentionController | None = None  # holds the recorded attention maps, when any


#: What `edit` does by default: DiT4Edit's unified attention control with its documented defaults.
DEFAULT_CONTROL = AttentionControl()
#: Patch merging by default: the paper's ratio 0.8 (stride 3x3), on grids of 1024 tokens (512² images) and up.
DEFAULT_MERGE = MergeConfig()


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

    def __init__(self, tokenizer, text_encoder: T5EncoderModel, vae: AutoencoderKL,
                 transformer: PixArtTransformer2DModel, scheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler)

    # --- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> DiT4EditPipeline:
        """`DiffusionPipeline.from_pretrained` with a one-line `DiT4EditError` for anything that is not a
        PixArt-style pipeline (missing folder, no model_index.json, missing components, unreadable weights).
        Every component loads as `dtype` (default float32): transformers would otherwise keep the stored dtype of
        the text encoder (float16 in half-precision checkpoints), which is slow and lossy on a CPU."""
        name = str(pretrained_model_name_or_path)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or torch.float32
        kwargs[_dtype_kwarg()] = dtype
        folder = Path(name).expanduser()
        if folder.exists():
            _check_model_folder(folder)
        elif name.startswith((".", "/", "~")) or name.count("/") != 1:  # a hub id is "owner/name"
            raise DiT4EditError(f"model folder not found: {name}")
        try:
            pipe = super().from_pretrained(name, **kwargs)
        except DiT4EditError:
            raise
        except Exception as error:
            raise DiT4EditError(f"cannot load model {name}: {_one_line(error)}") from None
        if not isinstance(pipe.transformer, PixArtTransformer2DModel):
            raise DiT4EditError(f"{name} is not a PixArt model: its transformer is {type(pipe.transformer).__name__}")
        return pipe

    # --- prompts, latents, images ----------------------------------------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings and 0/1 masks as PixArt computes them: 120 tokens, no caption cleaning.
        Returns `(prompt_embeds (B, 120, D), prompt_attention_mask (B, 120))`."""
        tokens = self.tokenizer(list(prompts), max_length=MAX_TOKENS, padding="max_length", truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self._execution_device)
        embeds = self.text_encoder(tokens.input_ids.to(self._execution_device), attention_mask=mask)[0]
        return embeds.to(self._dtype), mask

    def check_prompt(self, prompt: str, what: str = "prompt") -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise DiT4EditError(f"the {what} is empty")
        count = len(self.tokenizer(prompt, add_special_tokens=True).input_ids)
        if count > MAX_TOKENS:
            raise DiT4EditError(f"the {what} is {count} T5 tokens long; PixArt reads at most {MAX_TOKENS}")
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
        if not isinstance(image, Image.Image):
            image = imgs.load_image(image, max_pixels)
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
        if not 1 <= num_inference_steps <= 1000:
            raise DiT4EditError(f"steps must be between 1 and 1000, got {num_inference_steps}")
        return Schedule.from_scheduler(self.scheduler, num_inference_steps)

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
        num_inference_steps: int = 30,
        guidance_scale: float = 4.5,
        method: str = "dpm-exact",
        tol: float = 1e-5,
        max_pixels: int = imgs.MAX_PIXELS,
        disable_progress: bool | None = None,
    ) -> Inversion:
        """Invert `image` under `source_prompt`: the latent trajectory that the matching sampler (2M for dpm*,
        DDIM for ddim*) turns back into the image. Invert at the guidance the edit will use, or edit with
        `pin_source=True` (the default), which makes the source branch follow the stored trajectory anyway."""
        if method not in INVERSIONS:
            raise DiT4EditError(f"unknown inversion method {method!r} (choose from {', '.join(INVERSIONS)})")
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
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 30,
        guidance_scale: float = 4.5,
        generator: torch.Generator | None = None,
        disable_progress: bool | None = None,
    ) -> tuple[Image.Image, Inversion]:
        """Generate from `prompt` with DPM-Solver++(2M) and keep the trajectory, so the image can be edited
        without inversion ("generate, then edit")."""
        self.check_prompt(prompt)
        size = imgs.work_size((width, height))
        imgs.check_size(size)
        schedule = self._schedule(num_inference_steps)
        factor = self.vae_scale_factor
        shape = (1, self.transformer.config.in_channels, size[1] // factor, size[0] // factor)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        x = noise.to(self._execution_device, self._solver_dtype())
        denoise = self.make_denoiser([prompt], guidance_scale, schedule, size)
        trajectory = sampler_for("dpm")(denoise, x, schedule, disable=self._progress(disable_progress))
        inversion = Inversion(trajectory=torch.cat(trajectory).cpu(), source_prompt=prompt,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              method="generated", original_size=(width, height))
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
    ) -> EditResult:
        """Denoise the source branch and one branch per target prompt in one batch from the inverted latent.

        `control` is DiT4Edit's unified attention control (`AttentionControl`; None = plain inversion-then-denoise).
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
        """
        targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
        if not targets:
            raise DiT4EditError("no target prompt given")
        for k, prompt in enumerate(targets):
            self.check_prompt(prompt, "target prompt" if len(targets) == 1 else f"target prompt {k + 1}")
        guidance = inversion.guidance_scale if guidance_scale is None else guidance_scale
        if rows not in ("3", "4"):
            raise DiT4EditError(f'rows must be "3" or "4", got {rows!r}')
        if rows == "3" and not pin_source:
            raise DiT4EditError("the 3-row layout has no unconditional source row: it needs pin_source=True")
        layout = BatchLayout.for_scale(len(targets), guidance, rows)
        schedule = self._schedule(inversion.num_inference_steps)
        trajectory = inversion.trajectory.to(self._execution_device, self._solver_dtype())
        latent_hw = tuple(trajectory.shape[-2:])
        size = (latent_hw[1] * self.vae_scale_factor, latent_hw[0] * self.vae_scale_factor)
        grid = self._token_grid(latent_hw)
        merges = merge is not None and merge.applies(grid)
        if merges:
            merge.block_indices(len(self.transformer.transformer_blocks))  # a range outside the model: one-line error
        controller = self.make_controller(control, inversion, targets, mask, record_words, layout)
        denoise = self.make_denoiser([inversion.source_prompt, *targets], guidance, schedule, size,
                                     step_kwargs=controller is not None or merges, layout=layout)
        x = trajectory[:1].expand(layout.branches, -1, -1, -1).clone()  # (branches, C, h, w), source first

        def on_step(i: int, x_next: torch.Tensor) -> torch.Tensor:
            if pin_source:
                x_next = layout.with_source(x_next, trajectory[i + 1 : i + 2])
            if controller is not None:
                x_next = controller.local_blend(x_next, i)
            return x_next

        installed = install(self.transformer, controller) if controller is not None else contextlib.nullcontext()
        merging = (token_merging(self.transformer, merge, grid, plan_row=layout.row(SOURCE, cond=True))
                   if merges else contextlib.nullcontext())  # one plan from the source's conditional row
        with installed, merging:
            final = sampler_for(inversion.sampler)(denoise, x, schedule, callback=on_step,
                                                   disable=self._progress(disable_progress))[-1]
        decoded = self.decode_latents(final, inversion.original_size)
        self.maybe_free_model_hooks()
        return EditResult(images=decoded[SOURCE + 1 :], reconstruction=decoded[SOURCE], latents=final.cpu(),
                          controller=controller)

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
            record_words=record_words, layout=layout,
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
    def sdedit(self, image, target_prompt: str, strength: float = 0.6, num_inference_steps: int = 30,
               guidance_scale: float = 4.5, generator: torch.Generator | None = None,
               max_pixels: int = imgs.MAX_PIXELS, disable_progress: bool | None = None) -> Image.Image:
        """SDEdit (Meng et al. 2022), the baseline: noise the input latent to `strength` of the schedule and
        denoise it with the target prompt (2M). No inversion, no attention control."""
        if not 0.0 < strength <= 1.0:
            raise DiT4EditError(f"strength must be in (0, 1], got {strength}")
        self.check_prompt(target_prompt, "target prompt")
        work, original_size = self.prepare_image(image, max_pixels)
        schedule = self._schedule(num_inference_steps)
        start = min(num_inference_steps - 1, round(num_inference_steps * (1.0 - strength)))
        tail = schedule.tail(start)
        latent = self.encode_image(work).to(self._solver_dtype())
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent)
        x = tail.alphas[0].item() * latent + tail.sigmas[0].item() * noise
        denoise = self.make_denoiser([target_prompt], guidance_scale, tail, work.size)
        final = sampler_for("dpm")(denoise, x, tail, disable=self._progress(disable_progress))[-1]
        image = self.decode_latents(final, original_size)[0]
        self.maybe_free_model_hooks()
        return image

    @torch.no_grad()
    def reconstruct(self, image, source_prompt: str, num_inference_steps: int = 30, guidance_scale: float = 4.5,
                    method: str = "dpm-exact", tol: float = 1e-5, max_pixels: int = imgs.MAX_PIXELS,
                    disable_progress: bool | None = None) -> tuple[Image.Image, dict]:
        """Invert, then regenerate with the same prompt, guidance and matching sampler; report how close it came.

        Returns the regenerated image and `latent_nmse` (regenerated vs encoded input, ||a-b||^2/||b||^2), `nfe`,
        `psnr` (output vs input image) and `vae_psnr` (VAE round trip alone, the floor of any edit)."""
        work, original_size = self.prepare_image(image, max_pixels)
        original = imgs.load_image(image, max_pixels) if not isinstance(image, Image.Image) else imgs.to_rgb(image)
        inversion = self.invert(work, source_prompt, num_inference_steps, guidance_scale, method, tol,
                                max_pixels, disable_progress)
        schedule = self._schedule(num_inference_steps)
        denoise = self.make_denoiser([source_prompt], guidance_scale, schedule, work.size)
        start = inversion.latent.unsqueeze(0).to(self._execution_device, self._solver_dtype())
        regenerated = sampler_for(inversion.sampler)(denoise, start, schedule,
                                                     disable=self._progress(disable_progress))[-1]
        target = inversion.input_latent.unsqueeze(0).to(regenerated)
        nmse = ((regenerated - target).norm() ** 2 / target.norm() ** 2).item()
        output = self.decode_latents(regenerated, original_size)[0]
        vae_only = self.decode_latents(target, original_size)[0]
        self.maybe_free_model_hooks()
        stats = dict(method=method, steps=num_inference_steps, guidance=guidance_scale, latent_nmse=nmse,
                     nfe=inversion.nfe, psnr=imgs.psnr(output, original), vae_psnr=imgs.psnr(vae_only, original))
        return output, stats

    @torch.no_grad()
    def __call__(self, image, source_prompt: str, target_prompt: str | Sequence[str], num_inference_steps: int = 30,
                 guidance_scale: float = 4.5, inversion_method: str = "dpm-exact",
                 control: AttentionControl | None = DEFAULT_CONTROL, mask=None,
                 merge: MergeConfig | None = DEFAULT_MERGE, pin_source: bool = True,
                 max_pixels: int = imgs.MAX_PIXELS, disable_progress: bool | None = None) -> EditResult:
        """Invert `image` under `source_prompt`, then edit it towards `target_prompt` (see `invert`, `edit`)."""
        inversion = self.invert(image, source_prompt, num_inference_steps, guidance_scale, inversion_method,
                                max_pixels=max_pixels, disable_progress=disable_progress)
        return self.edit(inversion, target_prompt, guidance_scale, pin_source, control, mask, merge,
                         disable_progress=disable_progress)


def _dtype_kwarg() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name warns); use the one this install prefers."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"



def _check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise DiT4EditError(f"model path is not a folder: {folder}")
    index = folder / "model_index.json"
    if not index.is_file():
        raise DiT4EditError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        entries = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DiT4EditError(f"{index} is not valid JSON") from None
    missing = [name for name in REQUIRED_COMPONENTS if name not in entries or not (folder / name).is_dir()]
    if missing:
        raise DiT4EditError(f"{folder} is not a PixArt-style pipeline: missing {', '.join(missing)}")


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
