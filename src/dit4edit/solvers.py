"""DPM-Solver++ sampling and its inversion on PixArt's VP schedule, as plain functions.

Notation (DPM-Solver++, Lu et al. 2022): a point `i` of the schedule holds `x_i = a_i x0 + s_i eps`, with `a_i = sqrt(abar)`,
`s_i = sqrt(1 - abar)` and `lambda_i = log(a_i / s_i)`. Points run from 0 (noisiest) to N (the clean end, where the
PixArt schedule has `s_N = 0`); step `i` goes from point `i` to point `i + 1`.

Every function takes a denoiser `denoise(x, i) -> denoised`: the data prediction D(x) at point `i` (classifier-free
guidance already applied), so the solvers never know which network they run. Solver arithmetic happens in the
dtype of `x` (float64 in the pipeline).

Samplers return the trajectory `[x_0, ..., x_N]`. Inversions walk from `x_N` back to `x_0` and return an
`InversionResult` with the trajectory in the same order, the per-step residuals of the sampler's own step equation
and the number of denoiser evaluations (NFE) they spent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from tqdm.auto import trange

from .exact_inversion import ExactInverter
from .methods import INVERSION_METHODS
from .schedule import (  # noqa: F401  (re-exported: the solvers' public names)
    Denoiser,
    InversionResult,
    Schedule,
    StepCallback,
    check_scheduler,
    dpm_step,
    step_coefficients,
)

logger = logging.getLogger(__name__)

# --- sampling --------------------------------------------------------------------------------------------------


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    callback: StepCallback | None = None,
    disable: bool = True,
) -> list[torch.Tensor]:
    """DPM-Solver++(2M). `callback(i, x_next)` may return a replacement for x_{i+1} (source pinning, blending)."""
    trajectory, denoised_prev = [x], None
    for i in trange(schedule.num_steps, disable=disable, desc="denoising"):
        denoised = denoise(x, i)
        x = dpm_step(schedule, i, x, denoised, denoised_prev)
        if callback is not None:
            x = _or(callback(i, x), x)
        trajectory.append(x)
        denoised_prev = denoised
    return trajectory


def sample_ddim(denoise: Denoiser, x, schedule: Schedule, callback=None, disable: bool = True) -> list[torch.Tensor]:
    """DDIM (Song et al. 2021), written as first-order DPM-Solver++ on the same points."""
    return sample_dpmpp_2m(denoise, x, schedule.first_order(), callback, disable)


def _or(value, default):
    return default if value is None else value


# --- inversion -------------------------------------------------------------------------------------------------


def invert_ddim(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, disable: bool = True, **_) -> InversionResult:
    """DDIM inversion: the DDIM step run backwards with the model evaluated at the known, cleaner latent."""
    return _invert_naive(denoise, x, schedule.first_order(), disable)


def invert_dpm(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, disable: bool = True, **_) -> InversionResult:
    """Naive DPM-Solver++(2M) inversion: the sampler's grid walked backwards from the clean end, each step's model
    output taken at the known, cleaner latent. It drifts, worst at few steps.

    The update is the one diffusers' `DPMSolverMultistepInverseScheduler` makes (data-prediction 2M with the
    history term of the previous, cleaner point). What differs: that scheduler runs a grid of its own, from timestep
    0 up to the noisiest one, while this walks the sampler's own points in reverse, starting at the clean end
    (sigma 0, first order with eps read off the known latent), so that the sampler regenerates the trajectory; and
    this takes the noisiest step first order, as the sampler's first step is, where that scheduler takes it second
    order (from 15 steps on)."""
    return _invert_naive(denoise, x, schedule, disable)


def _invert_naive(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, disable: bool) -> InversionResult:
    a, s, lam = schedule.alphas, schedule.sigmas, schedule.lambdas
    n = schedule.num_steps
    trajectory = [x]
    history: list[torch.Tensor] = []  # D at the known points, cleanest first
    for i in trange(n - 1, -1, -1, disable=disable, desc="inverting"):
        known = trajectory[0]
        if i == n - 1:
            # The clean end has no model timestep: take eps at t_{i} from the known latent (usual DDIM inversion).
            eps = (known - a[i] * denoise(known, i)) / s[i]
            denoised = (known - s[n] * eps) / a[n]
            x_i = a[i] * denoised + s[i] * eps
        else:
            denoised = denoise(known, i + 1)
            h = (lam[i] - lam[i + 1]).item()  # negative: towards noise
            mixed = denoised
            if schedule.orders[i] == 2 and i + 2 < n:
                c = h / (2.0 * (lam[i + 1] - lam[i + 2]).item())
                mixed = (1.0 + c) * denoised - c * history[-1]
            x_i = (s[i] / s[i + 1]).item() * known + a[i].item() * -math.expm1(-h) * mixed
        history.append(denoised)
        trajectory.insert(0, x_i)
    return InversionResult(trajectory=trajectory, residuals=None, nfe=n)


def invert_ddim_exact(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, tol: float = 1e-6, max_iters: int = 30,
                      damping: float = 1.0, disable: bool = True, **_) -> InversionResult:
    """Exact DDIM inversion: each step's equation solved for the noisier point by a secant iteration (Hong et al.,
    "On Exact Inversion of DPM-Solvers", CVPR 2024, first-order case; see `dit4edit.exact_inversion`). Short of its
    tolerance it warns and returns the naive inversion where that reconstructs better (`checked_or_naive`)."""
    first = schedule.first_order()
    result = ExactInverter(denoise, x, first, tol, max_iters, damping).run(max_sweeps=1, disable=disable)
    return checked_or_naive(result, denoise, x, first, tol, "ddim-exact")


def invert_dpm_exact(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, tol: float = 1e-6, max_iters: int = 30,
                     damping: float = 1.0, max_sweeps: int = 40, disable: bool = True, **_) -> InversionResult:
    """Exact DPM-Solver++(2M) inversion: the sampler's N coupled step equations solved together to `tol` by
    multisecant quasi-Newton sweeps with GMRES (see `dit4edit.exact_inversion` for the design and what was dropped).
    Short of its tolerance it warns and returns the naive inversion where that reconstructs better."""
    result = ExactInverter(denoise, x, schedule, tol, max_iters, damping).solve_coupled(max_sweeps, disable)
    return checked_or_naive(result, denoise, x, schedule, tol, "dpm-exact")


def checked_or_naive(result: InversionResult, denoise: Denoiser, x: torch.Tensor, schedule: Schedule, tol: float,
                     name: str) -> InversionResult:
    """`result` if it converged; else one warning line (its largest step residual) and whichever of `result` and
    the naive inversion of the same sampler lands closer to `x` when sampled: never worse than naive. The check
    costs the naive inversion and one sampling run of each (3N NFE, counted in the returned `nfe`)."""
    if result.converged:
        return result
    naive = _invert_naive(denoise, x, schedule, disable=True)
    exact_error = _round_trip_error(denoise, result.latent, schedule, x)
    naive_error = _round_trip_error(denoise, naive.latent, schedule, x)
    keep = result if exact_error <= naive_error else naive
    worst = max(result.residuals) if result.residuals else float("nan")
    logger.warning("%s inversion did not reach tol %g (largest step residual %.3g); round trip off by %.3g "
                   "against %.3g for naive inversion: using the %s one", name, tol, worst, exact_error,
                   naive_error, "exact" if keep is result else "naive")
    return InversionResult(trajectory=keep.trajectory, residuals=keep.residuals,
                           nfe=result.nfe + naive.nfe + 2 * schedule.num_steps, converged=False)


def _round_trip_error(denoise: Denoiser, latent: torch.Tensor, schedule: Schedule, x: torch.Tensor) -> float:
    """||sample(latent) - x|| / ||x|| with the sampler that `schedule`'s orders define (N NFE); inf if not finite."""
    error = ((sample_dpmpp_2m(denoise, latent, schedule)[-1] - x).norm() / x.norm()).item()
    return error if math.isfinite(error) else math.inf


def step_residuals(denoise: Denoiser, trajectory: list[torch.Tensor], schedule: Schedule) -> list[float]:
    """Residuals of the sampler's step equations along any trajectory (costs N denoiser evaluations)."""
    ds = [denoise(x, i) for i, x in enumerate(trajectory[:-1])]
    out = []
    for i in range(schedule.num_steps):
        d_prev = ds[i - 1] if schedule.orders[i] == 2 else None
        f = dpm_step(schedule, i, trajectory[i], ds[i], d_prev) - trajectory[i + 1]
        out.append((f.norm() / trajectory[i + 1].norm()).item())
    return out


SAMPLERS = {"dpm": sample_dpmpp_2m, "ddim": sample_ddim}
_INVERTERS = {("dpm", True): invert_dpm_exact, ("dpm", False): invert_dpm,
              ("ddim", True): invert_ddim_exact, ("ddim", False): invert_ddim}
#: Every inversion method of `dit4edit.methods.INVERSION_METHODS`, by name, to its function.
INVERSIONS = {name: _INVERTERS[m.sampler, m.exact] for name, m in INVERSION_METHODS.items()}


def sampler_for(method: str) -> Callable:
    """The sampler that an inversion method inverts (and that regenerates its trajectory)."""
    return SAMPLERS[INVERSION_METHODS[method].sampler]
