"""The names a user picks from, each defined once and importable without torch (the command line and the web app
check choices before loading anything heavy): the inversion methods and the Prompt-to-Prompt edit modes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InversionMethod:
    """sampler: the sampler whose steps the inversion undoes, and which regenerates its trajectory: "dpm"
    (DPM-Solver++(2M)) or "ddim". exact: the sampler's step equations solved to a tolerance (else the naive
    inversion, which evaluates the model at the known, cleaner latent and drifts)."""

    sampler: str
    exact: bool
    summary: str


#: Inversion methods by name; `dit4edit.solvers.INVERSIONS` maps each to its function.
INVERSION_METHODS = {
    "dpm-exact": InversionMethod("dpm", True, "exact DPM-Solver++(2M) inversion (default)"),
    "dpm": InversionMethod("dpm", False, "naive DPM-Solver++(2M) inversion"),
    "ddim-exact": InversionMethod("ddim", True, "exact DDIM inversion"),
    "ddim": InversionMethod("ddim", False, "naive DDIM inversion"),
}

#: How target tokens are aligned with source tokens (`dit4edit.prompts.align`): "replace" (same word count, each
#: differing word mapped onto the source word), "refine" (aligned pieces take the source's attention, inserted ones
#: keep their own) or "auto" (replace for the same word count, else refine).
EDIT_MODES = ("auto", "replace", "refine")


@dataclass(frozen=True)
class EditMethod:
    """An editing method on the same backbone, inversion and attention layers: what it changes of the model's
    attention control (`control`: `AttentionControl` fields set on top of the model's own, before the user's
    changes), whether the targets take the pinned source's error of each step (`direct_inversion`), and whether it
    inverts the image at all (`inverts`; SDEdit noises it instead)."""

    summary: str
    control: tuple[tuple[str, object], ...] = ()
    direct_inversion: bool = False
    inverts: bool = True


#: Editing methods by name (`--method`); "dit4edit" is the default.
EDIT_METHODS = {
    # DiT4Edit (arXiv 2411.03286): the model's unified attention control as it is.
    "dit4edit": EditMethod("DiT4Edit: Prompt-to-Prompt cross-attention plus source / mutual self-attention in the "
                           "deeper blocks (default)"),
    # Prompt-to-Prompt (Hertz et al. 2022): cross-attention control only; self-attention untouched in every step.
    "p2p": EditMethod("Prompt-to-Prompt: cross-attention control only",
                      control=(("self_mode_early", "target"), ("mutual", "none"))),
    # MasaCtrl (Cao et al. 2023): mutual self-attention only, from step 4 of 50 (S = 0.08) in the deeper blocks (the
    # transformer's counterpart of the UNet decoder's later layers); no cross-attention control. A local blend on a
    # named object's words stands for its mask-guided variant.
    "masactrl": EditMethod("MasaCtrl: mutual self-attention from step S (4 of 50) in the deeper blocks only",
                           control=(("self_mode_early", "target"), ("mutual", "source"), ("self_replace_steps", 0.08),
                                    ("cross_replace_steps", 0.0), ("cross_replace_changed", 0.0))),
    # PnP Inversion (Ju et al. 2024): Prompt-to-Prompt with direct inversion (the source branch's error of each
    # step added to the targets).
    "pnp-inversion": EditMethod("PnP Inversion: Prompt-to-Prompt with direct inversion",
                                control=(("self_mode_early", "target"), ("mutual", "none")), direct_inversion=True),
    # SDEdit (Meng et al. 2022): noise the input to a strength (`strength`, default 0.6) and denoise it under the
    # target prompt; no inversion and no attention control.
    "sdedit": EditMethod("SDEdit: noise to a strength, denoise under the target (no inversion, no control)",
                         inverts=False),
}
