"""Default settings of a run, in one place: the command line's flags and the web app's fields both start here.

Attention control and patch merging keep their defaults on their own configs (`AttentionControl`, `MergeConfig`).
This module imports nothing heavy, so the command line can read it before loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunSettings:
    """What a user sets for one inversion and edit.

    steps: denoising (and inversion) steps.
    guidance: classifier-free guidance scale, for the inversion and the edit.
    inversion: inversion method (a name in `dit4edit.methods.INVERSION_METHODS`).
    tol: stopping tolerance of the exact inversions.
    seed: random seed.
    """

    steps: int = 30
    guidance: float = 4.5
    inversion: str = "dpm"
    tol: float = 1e-4
    seed: int = 0


DEFAULTS = RunSettings()

#: Prompt length in T5 tokens of PixArt-alpha's pipelines (they pad and cut every prompt to it; PixArt-Sigma reads
#: 300): the length used when a model folder names none.
PIXART_ALPHA_TOKENS = 120
