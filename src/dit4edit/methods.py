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
    "dpm-exact": InversionMethod("dpm", True, "exact DPM-Solver++(2M) inversion; ~10x the NFE of naive inversion at "
                                 "guidance 1.5, ~30x at 4.5, and often short of its tolerance there"),
    "dpm": InversionMethod("dpm", False, "naive DPM-Solver++(2M) inversion, one NFE a step (default)"),
    "ddim-exact": InversionMethod("ddim", True, "exact DDIM inversion; ~3x the NFE of naive inversion at guidance "
                                  "1.5, ~6x at 4.5"),
    "ddim": InversionMethod("ddim", False, "naive DDIM inversion, one NFE a step"),
}

#: How target tokens are aligned with source tokens (`dit4edit.prompts.align`): "replace" (same word count, each
#: differing word mapped onto the source word), "refine" (aligned pieces take the source's attention, inserted ones
#: keep their own) or "auto" (replace for the same word count, else refine).
EDIT_MODES = ("auto", "replace", "refine")
