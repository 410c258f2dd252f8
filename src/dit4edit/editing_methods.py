"""Editing methods by name: what each installs on the same pipeline and attention layer, and how it steps.

A method is data (`EditMethod`: the attention-control changes it implies on top of the model's, whether it
inverts, whether the targets take the source's error) plus, only where the shared edit loop does not fit, a small
function. `request.run` dispatches on the name; nothing here copies the edit loop. The published defaults, given
for Stable Diffusion 1.x UNets (16 attention layers, 50 DDIM steps), are translated to the transformer: step
fractions stay fractions of the schedule, "the decoder's later layers" become the deeper transformer blocks.

Importable without torch (the command line checks `--method` before loading a model).

InstructPix2Pix, the paper's sixth baseline, needs an instruction-trained model; no transformer checkpoint here has
one, so it is not run (its published PIE-Bench numbers, on another backbone, are in the benchmark notes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import DiT4EditError
from .result import EditResult

#: SDEdit's default strength (the fraction of the schedule it noises to), as in `pipe.sdedit`.
SDEDIT_STRENGTH = 0.6


@dataclass(frozen=True)
class EditMethod:
    """One editing method as data.

    control: `AttentionControl` field changes on top of the model's control (the user's changes apply on top of
        these); None = the method installs no attention control.
    direct_inversion: every target also takes the pinned source branch's error of each step (PnP Inversion).
    inverts: the method needs an inversion of the input (False: it never calls `pipe.invert`).
    run: `run(pipe, request, resolved, targets, record_words, disable_progress, inversion) -> (EditResult,
        Inversion or None)` for a method that leaves the shared invert-then-edit path (`inversion`: a saved or kept
        one to use, else None); None = the shared path.
    joint: the method runs on joint-attention models (SD3, FLUX); False where it needs what only self- and
        cross-attention layers have (its self-attention modes, cross-attention maps to guide), so it is refused
        there in one line rather than run as something else.
    """

    summary: str
    control: Mapping[str, Any] | None = field(default_factory=lambda: MappingProxyType({}))
    direct_inversion: bool = False
    inverts: bool = True
    run: Callable | None = None
    joint: bool = True


# --- the methods that step differently -------------------------------------------------------------------------


def virtual_inversion(pipe, image, source: str, steps: int, guidance: float, seed: int, max_pixels: int):
    """InfEdit's virtual inversion (Xu et al. 2024, "Inversion-Free Image Editing with Natural Language"): no model
    call, the known clean latent x0 of the input and one seeded noise e give every point of the schedule,
    `x_i = a_i x0 + s_i e` (so `trajectory[-1]` is x0 itself, the schedule ending at s_N = 0). Returned as an
    `Inversion` marked "generated": a trajectory the sampler did not invert."""
    import torch

    from .inversion_file import GENERATED, Inversion

    work, original_size = pipe.prepare_image(image, max_pixels)
    schedule = pipe._schedule(steps, pipe.latent_size(work.size))
    x0 = pipe.encode_image(work).to(pipe._solver_dtype())[0]  # (C, h, w)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(x0)
    a, s = schedule.alphas.to(x0)[:, None, None, None], schedule.sigmas.to(x0)[:, None, None, None]
    trajectory = a * x0 + s * noise  # (N + 1, C, h, w)
    return Inversion(trajectory=trajectory.cpu(), source_prompt=source, num_inference_steps=steps,
                     guidance_scale=guidance, method=GENERATED, original_size=original_size, nfe=0,
                     model=pipe.model_record())


def sample_ddcm(denoise, x, schedule, callback=None, disable: bool = True, *, layout, trajectory):
    """Denoising diffusion consistent sampling with virtual inversion (InfEdit, Xu et al. 2024, Alg. 1), for any
    data-prediction denoiser and VP schedule.

    The source branch never drifts: at point i it is `a_i x0 + s_i e_i` with the clean source latent x0 known
    (`trajectory[-1]`), e_0 the virtual inversion's noise and e_{i+1} the noise the source's prediction implies,
    `(x_src - a_i D_src) / s_i`. Each target's prediction is corrected by the source's error, `D_tgt + (x0 - D_src)`
    (consistency: where the prompts agree the target's prediction is x0), and steps with the source's noise:
    `x_tgt' = a_{i+1} (D_tgt + x0 - D_src) + s_{i+1} e_{i+1}`. An identity edit thus ends exactly at x0. The
    callback (local blend) sees each new batch, as with the other samplers."""
    from tqdm.auto import trange

    x0 = trajectory[-1:]  # (1, C, h, w)
    xs = [x]
    for i in trange(schedule.num_steps, disable=disable):
        denoised = denoise(x, i)  # (branches, C, h, w)
        a, s = schedule.alphas[i].item(), schedule.sigmas[i].item()
        a_next, s_next = schedule.alphas[i + 1].item(), schedule.sigmas[i + 1].item()
        source, d_source = layout.source(x)[None], layout.source(denoised)[None]  # (1, C, h, w)
        noise = (source - a * d_source) / s  # the source's implied noise e_{i+1}
        corrected = denoised + (x0 - d_source)  # (branches, C, h, w); the source row becomes x0
        x = a_next * corrected + s_next * noise
        if callback is not None:
            changed = callback(i, x)
            x = x if changed is None else changed
        xs.append(x)
    return xs


def _run_infedit(pipe, request, resolved, targets, record_words, disable_progress, inversion=None):
    from functools import partial

    inversion = virtual_inversion(pipe, request.image, request.source, resolved.steps, resolved.guidance,
                                  resolved.seed, resolved.max_pixels)
    result = pipe.edit(inversion, targets, guidance_scale=resolved.guidance, pin_source=False,
                       control=resolved.control, mask=resolved.mask, merge=resolved.merge, record_words=record_words,
                       disable_progress=disable_progress, rows=resolved.rows, source_image=request.image,
                       sampler=partial(sample_ddcm))
    return result, inversion


def _run_sdedit(pipe, request, resolved, targets, record_words, disable_progress, inversion=None):
    import torch


    images, latents = [], []
    for target in targets:  # the same seed for every target: the prompts alone differ
        generator = torch.Generator().manual_seed(resolved.seed)
        image, latent = pipe.sdedit(request.image, target, resolved.strength, resolved.steps, resolved.guidance,
                                    generator, resolved.max_pixels, disable_progress, return_latent=True)
        images.append(image)
        latents.append(latent)
    work, size = pipe.prepare_image(request.image, resolved.max_pixels)
    reconstruction = pipe.decode_latents(pipe.encode_image(work), size)[0]  # what SDEdit keeps at best: the VAE's
    # No attention control, so no attention maps to record (`record_words` asks for none here).
    return EditResult(images=images, reconstruction=reconstruction, latents=torch.cat(latents).cpu()), None


class CrossAttentionGuidance:
    """Pix2Pix-Zero's cross-attention guidance (Parmar et al. 2023, Sec. 3.2) on the transformer: one gradient step
    per denoising step moves each target latent so that its cross-attention maps approach the reconstruction's
    (the pinned source branch's maps at the same point), `x_tgt <- x_tgt - weight * d/dx_tgt sum_blocks
    ||M_tgt - M_src||^2`, with M the head-averaged word maps `(N, L)` of every block's cross-attention over the
    tokens both prompts have (compared position by position, as Pix2Pix-Zero compares the maps of one prompt with
    and without its edit direction). Pix2Pix-Zero's weight was 0.1 (`xa_guidance`).

    Cost: one extra forward and backward pass of the conditional rows per step, with explicit attention maps in
    the cross-attention layers (`rows x heads x N x L` floats each, kept for the backward pass), so the activation
    memory of one training step of the transformer at that batch. Measured on the embedded model (30 steps, 128 px,
    shared CPU): 5.1 s an edit against Prompt-to-Prompt's 2.5 s, the inversion aside."""

    def __init__(self, pipe, prompts, schedule, size, weight: float = 0.1):
        self.pipe, self.schedule, self.weight = pipe, schedule, weight
        self.embeds, self.mask = pipe.encode_prompt(prompts)  # (branches, L, D), (branches, L)
        self.columns = self.mask.bool().all(0)  # (L,) tokens every prompt has
        self.added = pipe._micro_conditions(size, len(prompts))

    def loss(self, x, i: int):
        """`(loss, d loss / d x)` at point i for `(branches, C, h, w)` latents, the source first; the gradient is
        zero on the source row (its maps are the reference)."""
        import torch

        transformer = self.pipe.transformer
        maps: list = []
        saved = dict(transformer.attn_processors)
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            try:
                transformer.set_attn_processor({name: _CrossMaps(maps) if name.endswith("attn2.processor") else p
                                                for name, p in saved.items()})
                device, dtype = self.pipe._execution_device, self.pipe._dtype
                timestep = self.schedule.timesteps[i].to(device).expand(len(x))
                transformer(x.to(device, dtype), encoder_hidden_states=self.embeds,
                            encoder_attention_mask=self.mask, timestep=timestep, added_cond_kwargs=self.added,
                            return_dict=False)
            finally:
                transformer.set_attn_processor(saved)
            loss = sum(((m[1:] - m[:1].detach()) ** 2)[..., self.columns].sum() for m in maps)  # (B, N, L) each
            (grad,) = torch.autograd.grad(loss, x)
        grad[0] = 0  # the source row is the reference
        return float(loss), grad

    def __call__(self, x, i: int):
        return x - self.weight * self.loss(x, i)[1]


class _CrossMaps:
    """diffusers' classic attention processor for a cross-attention layer, its head-averaged maps kept in `store`
    (differentiable)."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        import torch

        batch, tokens, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B * H, N, d)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B * H, L, d)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * H, N, L)
        self.store.append(probs.view(batch, attn.heads, tokens, -1).mean(1))  # (B, N, L)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))  # (B, N, H * d)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def sample_xa_guided(denoise, x, schedule, callback=None, disable: bool = True, *, layout, trajectory, sampler: str,
                     guide):
    """The inversion's `sampler` with `guide(x, i)` (`CrossAttentionGuidance`) applied to the latents at every
    point before its step is taken."""
    from .solvers import SAMPLERS

    def on_step(i, x_next):
        if callback is not None:
            changed = callback(i, x_next)
            x_next = x_next if changed is None else changed
        return guide(x_next, i + 1) if i + 1 < schedule.num_steps else x_next

    return SAMPLERS[sampler](denoise, guide(x, 0), schedule, callback=on_step, disable=disable)


def _run_pix2pix_zero(pipe, request, resolved, targets, record_words, disable_progress, inversion=None):
    from functools import partial

    latent_hw = tuple(inversion.trajectory.shape[-2:])
    size = (latent_hw[1] * pipe.vae_scale_factor, latent_hw[0] * pipe.vae_scale_factor)
    guide = CrossAttentionGuidance(pipe, [inversion.source_prompt, *targets], pipe._schedule(resolved.steps, latent_hw), size)
    result = pipe.edit(inversion, targets, guidance_scale=resolved.guidance, pin_source=True, control=resolved.control,
                       mask=resolved.mask, merge=resolved.merge, record_words=record_words,
                       disable_progress=disable_progress, rows=resolved.rows, source_image=request.image,
                       sampler=partial(sample_xa_guided, sampler=inversion.sampler, guide=guide))
    return result, inversion


def flowedit(pipe, image, source_prompt: str, target_prompt: str, num_inference_steps: int = 28, n_max: int = 24,
         source_guidance: float = 1.5, target_guidance: float = 5.5, generator=None, max_pixels: int | None = None,
         disable_progress: bool | None = None):
    """FlowEdit (Kulikov et al. 2024), inversion-free, on the flow families: from the input latent, integrate
    the difference of the target's and the source's velocities over the last `n_max` of the family's
    `num_inference_steps` steps (s from high to 0), the source point a fresh noising of the input at each
    step and the target point the edited latent shifted by the same noise. Published settings: FLUX 28 steps,
    n_max 24, guidance 1.5 / 5.5; SD3 50 steps, n_max 33, guidance 3.5 / 13.5. No attention control."""
    from . import checks
    from . import images as imgs
    from .backbones.flow import velocity  # deferred: torch, and only the flow families use it

    if pipe.backbone.prediction != "flow":
        raise DiT4EditError(f"FlowEdit runs on the flow families (SD3, FLUX), not {pipe.backbone.family}")
    steps = checks.steps(num_inference_steps)
    n_max = checks.integer(n_max, "n_max", 1, steps)
    checks.number(source_guidance, "source_guidance", 0.0)
    checks.number(target_guidance, "target_guidance", 0.0)
    pipe.check_prompt(source_prompt, "source prompt")
    pipe.check_prompt(target_prompt, "target prompt")
    work, original_size = pipe.prepare_image(image, imgs.MAX_PIXELS if max_pixels is None else max_pixels)
    latent_hw = pipe.latent_size(work.size)
    schedule = pipe.backbone.schedule(steps, latent_hw, 1.0)  # the family's own points, s from 1 to 0
    source = pipe.encode_image(work).to(pipe._solver_dtype())  # (1, C, h, w)
    denoise_source = pipe.make_denoiser([source_prompt], source_guidance, schedule)
    denoise_target = pipe.make_denoiser([target_prompt], target_guidance, schedule)
    edited = source.clone()
    for i in pipe.progress_bar(range(steps - n_max, steps)) if not pipe._progress(disable_progress) \
            else range(steps - n_max, steps):
        s, s_next = schedule.sigmas[i].item(), schedule.sigmas[i + 1].item()
        noise = pipe.backbone.noise(1, latent_hw, generator).to(source)
        noisy_source = (1 - s) * source + s * noise  # (1, C, h, w)
        noisy_target = edited + noisy_source - source
        v_source = velocity(noisy_source, denoise_source(noisy_source, i), s)
        v_target = velocity(noisy_target, denoise_target(noisy_target, i), s)
        edited = edited + (s_next - s) * (v_target - v_source)
    checks.finite(edited, "FlowEdit's latent")
    result = pipe.decode_latents(edited, original_size)[0]
    pipe.maybe_free_model_hooks()
    return result


# --- the table -------------------------------------------------------------------------------------------------

#: What a baseline sets back to its paper's default where a model's settings (its `dit4edit.json`) tune DiT4Edit:
#: changed words take the source word's map for the whole cross-attention window, and no local blend unless the
#: user names words (`--local-blend`). Block ranges and thresholds stay the model's.
_AS_PUBLISHED = {"cross_replace_changed": None, "local_blend_changed": False}

#: Every method by name; `--method` picks one (default "dit4edit").
EDIT_METHODS: Mapping[str, EditMethod] = MappingProxyType({
    # What ships: Prompt-to-Prompt cross-attention control plus the source's self-attention output before S and
    # mutual self-attention from S on, in the deeper half of the blocks (DiT4Edit, arXiv 2411.03286, Sec. 3.2);
    # the model's settings as they are.
    "dit4edit": EditMethod("DiT4Edit: Prompt-to-Prompt cross-attention control + source/mutual self-attention"),
    # Prompt-to-Prompt (Hertz et al. 2023) as its cross-attention control alone: the target takes the source's
    # word maps in the first 80% of the steps (P2P's default cross_replace_steps 0.8); self-attention untouched.
    "p2p": EditMethod("Prompt-to-Prompt: cross-attention control only, self-attention untouched",
                      MappingProxyType({"self_mode_early": "target", "mutual": "none", "cross_replace_steps": 0.8,
                                        **_AS_PUBLISHED}), joint=False),
    # MasaCtrl (Cao et al. 2023): mutual self-attention alone, the target's queries on the source's keys and values
    # from step S (its step 4 of 50: S = 0.08) in the deeper layers (its layers 10-16 of the UNet's 16, the decoder's
    # later ones: here the model's controlled blocks, by default the deeper half); no cross-attention control.
    # Its mask-guided variant: `--local-blend WORD` restricts the edit to where the named object attends.
    "masactrl": EditMethod("MasaCtrl: mutual self-attention from step S in the deeper blocks, no cross control",
                           MappingProxyType({"self_mode_early": "target", "mutual": "source",
                                             "self_replace_steps": 0.08, "cross_replace_steps": 0.0,
                                             "cross_replace_changed": 0.0, "cross_replace_words": {},
                                             "local_blend_changed": False}), joint=False),
    # PnP Inversion (Ju et al. 2024) on Prompt-to-Prompt, its benchmark's settings: direct inversion (every target
    # takes the pinned source's error of each step), cross-attention replaced in the first 40% of the steps and the
    # source's self-attention maps in the first 60% (P2P's self-attention replacement), in the controlled blocks.
    "pnp-inversion": EditMethod("PnP Inversion: Prompt-to-Prompt with direct inversion",
                                MappingProxyType({"self_mode_early": "p2p", "mutual": "none",
                                                  "self_replace_steps": 0.6, "cross_replace_steps": 0.4,
                                                  **_AS_PUBLISHED}),
                                direct_inversion=True, joint=False),
    # InfEdit (Xu et al. 2024): virtual inversion and denoising diffusion consistent sampling (`sample_ddcm`), no
    # inversion call, with its unified attention control (Prompt-to-Prompt cross-attention + mutual
    # self-attention; InfEdit's demo windows, 0.7 of the schedule for both: the source's self-attention maps before
    # 0.7, mutual self-attention after). On an ordinary checkpoint it runs the model's steps on its DPM-Solver++
    # schedule (the points only: each step is the consistent step above, first order). The model's local-blend and
    # word-window settings stay as they are (InfEdit's control has a local blend of its own).
    "infedit": EditMethod("InfEdit: virtual inversion, consistent sampling, unified attention control",
                          MappingProxyType({"self_mode_early": "p2p", "mutual": "source",
                                            "self_replace_steps": 0.7, "cross_replace_steps": 0.7}),
                          inverts=False, run=_run_infedit),
    # Pix2Pix-Zero (Parmar et al. 2023): the target branch denoises under the source embedding plus the edit
    # direction, target minus source (with one prompt pair that is the target prompt's embedding, token by token),
    # from the source's inversion, with cross-attention guidance toward the reconstruction's maps
    # (`CrossAttentionGuidance`, weight 0.1); no attention control of its own. Pinned source = the reconstruction.
    "pix2pix-zero": EditMethod("Pix2Pix-Zero: text-embedding edit direction + cross-attention guidance",
                               None, run=_run_pix2pix_zero, joint=False),
    # SDEdit (Meng et al. 2022): noise the input to `strength` of the schedule (default 0.6), denoise under the
    # target prompt. No inversion, no attention control.
    "sdedit": EditMethod("SDEdit: noise to a strength, denoise under the target", None, inverts=False,
                         run=_run_sdedit),
})


def method(name) -> EditMethod:
    """The method called `name`, or a one-line `DiT4EditError` listing the known ones."""
    if not isinstance(name, str) or name not in EDIT_METHODS:
        raise DiT4EditError(f"method must be one of {', '.join(EDIT_METHODS)}, got {name!r}")
    return EDIT_METHODS[name]
