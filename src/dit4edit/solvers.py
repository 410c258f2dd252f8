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

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from tqdm.auto import trange

from .errors import DiT4EditError
from .methods import INVERSION_METHODS

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class Schedule:
    """The N steps of a sampler: model timesteps, the (a, s) of the N + 1 points, and each step's order."""

    timesteps: torch.Tensor  # (N,) model timestep of points 0..N-1
    alphas: torch.Tensor  # (N + 1,) float64
    sigmas: torch.Tensor  # (N + 1,) float64
    orders: tuple[int, ...]  # (N,) 1 or 2

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def lambdas(self) -> torch.Tensor:
        return self.alphas.log() - self.sigmas.log()  # +inf at a clean end

    def tail(self, start: int) -> Schedule:
        """The steps from point `start` on (SDEdit starts mid-schedule); its first step is first order."""
        if not 0 <= start < self.num_steps:
            raise ValueError(f"start must be in [0, {self.num_steps}), got {start}")
        orders = (1,) + self.orders[start + 1 :]
        return Schedule(self.timesteps[start:], self.alphas[start:], self.sigmas[start:], orders)

    def first_order(self) -> Schedule:
        """The same points with every step first order: DPM-Solver++(1), which is DDIM."""
        return replace(self, orders=(1,) * self.num_steps)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> Schedule:
        """The schedule `scheduler`, a diffusers `DPMSolverMultistepScheduler` (DPM-Solver++(2M), as PixArt ships),
        runs for `num_steps`: its timesteps and sigmas (spacing, Karras/exponential sigmas and the noise schedule
        of its config all apply). The sampler and inverters here are written for exactly that solver, so any other
        scheduler, algorithm, order or prediction type is refused with a `DiT4EditError`. Orders follow diffusers:
        the first step is first order; the last one too when the final sigma is zero, when `euler_at_final` is set,
        or when `lower_order_final` is set and there are fewer than 15 steps.
        """
        from diffusers import DPMSolverMultistepScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        check_scheduler(scheduler)
        config = dict(scheduler.config)
        config.pop("variance_type", None)  # PixArt's learned variance: the sampler reads only eps
        dpm = DPMSolverMultistepScheduler.from_config(config)
        dpm.set_timesteps(num_steps)
        sigma = dpm.sigmas.to(torch.float64)  # diffusers' sigma = s / a, with the final one appended
        alphas = 1.0 / torch.sqrt(sigma**2 + 1.0)
        sigmas = sigma * alphas
        cfg = dpm.config
        last_first_order = (
            sigmas[-1].item() == 0.0
            or cfg.euler_at_final
            or (cfg.lower_order_final and num_steps < 15)
        )
        orders = [1 if i == 0 or (i == num_steps - 1 and last_first_order) else 2 for i in range(num_steps)]
        return cls(timesteps=dpm.timesteps.clone(), alphas=alphas, sigmas=sigmas, orders=tuple(orders))


def check_scheduler(scheduler) -> None:
    """A one-line `DiT4EditError` unless `scheduler` is a DPM-Solver++(2M) on an eps-predicting model: the only
    scheduler whose steps `sample_dpmpp_2m` (and DDIM, its first-order case) reproduce."""
    from diffusers import DPMSolverMultistepScheduler

    name = type(scheduler).__name__
    if not isinstance(scheduler, DPMSolverMultistepScheduler):
        raise DiT4EditError(f"pipe.scheduler is a {name}; dit4edit samples and inverts with DPM-Solver++(2M) "
                            f"only: use DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)")
    config = scheduler.config
    wanted = {"algorithm_type": "dpmsolver++", "solver_order": 2, "prediction_type": "epsilon"}
    wrong = {key: config.get(key) for key, value in wanted.items() if config.get(key) != value}
    if wrong:
        settings = ", ".join(f"{key}={value!r}" for key, value in wrong.items())
        raise DiT4EditError(f"pipe.scheduler has {settings}; dit4edit runs DPM-Solver++(2M) on eps predictions "
                            f"only ({', '.join(f'{k}={v!r}' for k, v in wanted.items())})")


@dataclass
class InversionResult:
    trajectory: list[torch.Tensor]  # [x_0 (noisiest), ..., x_N (the input)]
    residuals: list[float] | None  # per step ||x_{i+1} - step_i(x_i)|| / ||x_{i+1}||; None where not measured
    nfe: int  # denoiser evaluations spent

    @property
    def latent(self) -> torch.Tensor:
        """The inverted (noisiest) latent."""
        return self.trajectory[0]


# --- one step --------------------------------------------------------------------------------------------------


def step_coefficients(schedule: Schedule, i: int) -> tuple[float, float, float]:
    """(x coefficient, D coefficient, history weight c) of step i: x_{i+1} = ratio x_i + beta ((1+c) D_i - c D_{i-1})."""
    a, s, lam = schedule.alphas, schedule.sigmas, schedule.lambdas
    h = (lam[i + 1] - lam[i]).item()
    ratio = (s[i + 1] / s[i]).item()
    beta = a[i + 1].item() * -math.expm1(-h)  # a_t (1 - e^{-h}); equals a_t at a clean end (h = inf)
    c = 0.0
    if schedule.orders[i] == 2:
        h_prev = (lam[i] - lam[i - 1]).item()
        c = h / (2.0 * h_prev)  # 1 / (2 r), r = h_prev / h
    return ratio, beta, c


def dpm_step(schedule: Schedule, i: int, x: torch.Tensor, denoised: torch.Tensor, denoised_prev=None) -> torch.Tensor:
    """DPM-Solver++(2M) step i (Lu et al. 2022, Alg. 2; order 1 is DDIM), from point i to point i + 1."""
    ratio, beta, c = step_coefficients(schedule, i)
    if c:
        denoised = (1.0 + c) * denoised - c * denoised_prev
    return ratio * x + beta * denoised


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
    """Naive DPM-Solver++(2M) inversion: 2M run in reverse time, model at the known latent (diffusers'
    `DPMSolverMultistepInverseScheduler` does the same). It drifts, worst at few steps."""
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
    "On Exact Inversion of DPM-Solvers", CVPR 2024, first-order case; see `dit4edit.exact_inversion`)."""
    from .exact_inversion import ExactInverter

    inverter = ExactInverter(denoise, x, schedule.first_order(), tol, max_iters, damping)
    return inverter.run(max_sweeps=1, disable=disable)


def invert_dpm_exact(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, tol: float = 1e-6, max_iters: int = 30,
                     damping: float = 1.0, max_sweeps: int = 40, disable: bool = True, **_) -> InversionResult:
    """Exact DPM-Solver++(2M) inversion: the sampler's N coupled step equations solved together to `tol` by
    multisecant quasi-Newton sweeps with GMRES (see `dit4edit.exact_inversion` for the design and what was dropped)."""
    from .exact_inversion import ExactInverter

    inverter = ExactInverter(denoise, x, schedule, tol, max_iters, damping)
    return inverter.solve_coupled(max_sweeps, disable)


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
