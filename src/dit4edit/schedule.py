"""The schedule and the single DPM-Solver++(2M) step that the sampler (`dit4edit.solvers`) and the exact inverter
(`dit4edit.exact_inversion`) share, in one place below both.

Notation (DPM-Solver++, Lu et al. 2022): a point `i` of the schedule holds `x_i = a_i x0 + s_i eps`, with
`a_i = sqrt(abar)`, `s_i = sqrt(1 - abar)` and `lambda_i = log(a_i / s_i)`. Points run from 0 (noisiest) to N (the
clean end, where the PixArt schedule has `s_N = 0`); step `i` goes from point `i` to point `i + 1`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .errors import DiT4EditError

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
    converged: bool | None = None  # an exact inversion reached its tolerance; None for the naive ones

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
