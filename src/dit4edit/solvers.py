"""DPM-Solver++ sampling and its inversion on PixArt's VP schedule, as plain functions.

Notation (REFERENCE §1.1): a point `i` of the schedule holds `x_i = a_i x0 + s_i eps`, with `a_i = sqrt(abar)`,
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
        """The schedule diffusers' `DPMSolverMultistepScheduler` (dpmsolver++, order 2) runs for `num_steps`.

        Any scheduler config is accepted: the timesteps and sigmas come from a DPM-Solver++ scheduler built from it.
        Orders follow diffusers: the first step is first order; the last one too when the final sigma is zero,
        when `euler_at_final` is set, or when `lower_order_final` is set and there are fewer than 15 steps.
        """
        from diffusers import DPMSolverMultistepScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        config = dict(scheduler.config)
        config.update(algorithm_type="dpmsolver++", solver_order=2)
        config.pop("variance_type", None)
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


def _coefficients(schedule: Schedule, i: int) -> tuple[float, float, float]:
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
    ratio, beta, c = _coefficients(schedule, i)
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


def invert_ddim_exact(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    tol: float = 1e-6,
    max_iters: int = 30,
    eta: float = 1.0,
    disable: bool = True,
    **_,
) -> InversionResult:
    """Exact DDIM inversion: each step's backward-Euler equation solved by fixed-point iteration
    (Hong et al., "On Exact Inversion of DPM-Solvers", CVPR 2024, first-order case)."""
    return _ExactInverter(denoise, x, schedule.first_order(), tol, max_iters, eta).run(max_sweeps=1, disable=disable)


def invert_dpm_exact(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    tol: float = 1e-6,
    max_iters: int = 30,
    eta: float = 1.0,
    max_sweeps: int = 20,
    disable: bool = True,
    **_,
) -> InversionResult:
    """Exact DPM-Solver++(2M) inversion: the sampler's own N step equations solved together to `tol`.

    Why not per step: 2M step i uses D at point i - 1 (noisier, unknown when walking back), so the step equations
    form one coupled system. Hong et al. freeze that term from an estimate, which leaves an error the sampler then
    amplifies; Gauss-Seidel sweeps over the trajectory are exact but cost ~14x the NFE of naive inversion here.
    This solver starts from exact first-order inversion (about 3 NFE a step), then takes quasi-Newton steps on
    the whole trajectory: each point's dD/dx is modelled as one scalar (secant estimates from the evaluations
    already made), which makes the Jacobian a scalar tridiagonal N x N matrix; one linear solve updates all points
    at once, and one evaluation per point checks it (N NFE per sweep, batchable across points). See
    BENCHMARKS.md for the NFE this takes.
    """
    # Warm start: first-order inversion solved loosely (the sweeps correct it anyway; this saves ~1/3 of the NFE).
    inverter = _ExactInverter(denoise, x, schedule.first_order(), max(tol, 1e-3), max_iters, eta)
    inverter.run(max_sweeps=1, disable=disable)
    inverter.schedule, inverter.tol = schedule, tol
    return inverter.newton(max_sweeps=max_sweeps, disable=disable)


class _ExactInverter:
    """Solves x_{i+1} = step_i(x_i, D(x_i), D(x_{i-1})) for x_0..x_{N-1} given x_N."""

    def __init__(self, denoise: Denoiser, x: torch.Tensor, schedule: Schedule, tol, max_iters, eta):
        if tol <= 0 or max_iters < 1 or not 0 < eta <= 1:
            raise ValueError(f"need tol > 0, max_iters >= 1, 0 < eta <= 1; got {tol}, {max_iters}, {eta}")
        self.denoise, self.schedule = denoise, schedule
        self.tol, self.max_iters, self.eta = tol, max_iters, eta
        n = schedule.num_steps
        self.xs: list[torch.Tensor | None] = [None] * n + [x]
        self.ds: list[torch.Tensor | None] = [None] * n
        self.gains: dict[int, float] = {}  # secant estimate of dD/dx per point
        self.nfe = 0

    def residual(self, i: int) -> float:
        """Relative residual of step equation i with the current (cached) points."""
        f = self._step(i, self.xs[i], self.ds[i]) - self.xs[i + 1]
        return (f.norm() / self.xs[i + 1].norm()).item()

    def run(self, max_sweeps: int, disable: bool) -> InversionResult:
        n = self.schedule.num_steps
        for _ in trange(max_sweeps, disable=disable or max_sweeps == 1, desc="exact inversion sweeps"):
            changed = False
            for i in trange(n - 1, -1, -1, disable=disable or max_sweeps > 1, desc="inverting", leave=False):
                if self.xs[i] is None or self.residual(i) > self.tol:
                    self._solve(i)
                    changed = True
            if not changed:
                break
        residuals = [self.residual(i) for i in range(n)]
        return InversionResult(trajectory=list(self.xs), residuals=residuals, nfe=self.nfe)

    def newton(self, max_sweeps: int, disable: bool) -> InversionResult:
        """Quasi-Newton sweeps on all N step equations at once (see `invert_dpm_exact`)."""
        n = self.schedule.num_steps
        for _ in trange(max_sweeps, disable=disable, desc="exact inversion"):
            g = torch.stack([self._step(i, self.xs[i], self.ds[i]) - self.xs[i + 1] for i in range(n)])  # (N, ...)
            scale = torch.stack([x.norm() for x in self.xs[1:]])  # (N,) relative to each step's target
            if (g.flatten(1).norm(dim=1) / scale).max().item() <= self.tol:
                break
            delta = torch.linalg.solve(self._jacobian(), -g.flatten(1).to(torch.float64))  # (N, D)
            for i in range(n):
                y = self.xs[i] + self.eta * delta[i].to(g.dtype).view_as(self.xs[i])
                d = self._eval(y, i)
                self._update_gain(i, y - self.xs[i], d - self.ds[i])
                self.xs[i], self.ds[i] = y, d
        residuals = [self.residual(i) for i in range(n)]
        return InversionResult(trajectory=list(self.xs), residuals=residuals, nfe=self.nfe)

    def _jacobian(self) -> torch.Tensor:
        """(N, N) scalar model of d(step equations)/d(points): equation i reads
        g_i + J_i dx_i + K_i dx_{i-1} - dx_{i+1} = 0 with dx_N = 0."""
        n = self.schedule.num_steps
        jac = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            ratio, beta, c = _coefficients(self.schedule, i)
            jac[i, i] = ratio + beta * (1.0 + c) * self._gain(i)
            if c:
                jac[i, i - 1] = -beta * c * self._gain(i - 1)
            if i + 1 < n:
                jac[i, i + 1] = -1.0
        return jac

    def _gain(self, i: int) -> float:
        return self.gains.get(i, 1.0 / self.schedule.alphas[i].item())

    def _update_gain(self, i: int, dy: torch.Tensor, dd: torch.Tensor) -> None:
        secant = (dd * dy).sum().item() / max((dy * dy).sum().item(), 1e-300)
        if math.isfinite(secant) and secant > 0:
            self.gains[i] = secant

    def _step(self, i: int, x_i: torch.Tensor, d_i: torch.Tensor) -> torch.Tensor:
        d_prev = self.ds[i - 1] if self.schedule.orders[i] == 2 else None
        return dpm_step(self.schedule, i, x_i, d_i, d_prev)

    def _eval(self, y: torch.Tensor, i: int) -> torch.Tensor:
        self.nfe += 1
        return self.denoise(y, i)

    def _solve(self, i: int) -> None:
        """Solve step equation i for x_i by a damped secant iteration, warm-started from the current x_i.

        F(y) = step_i(y, D(y)) - x_{i+1}. Its derivative is `ratio + beta (1 + c) dD/dy`; dD/dy is modelled as one
        scalar per point, starting from its eps-frozen value 1/a_i (Newton with eps held fixed, the plain
        fixed-point iteration of REFERENCE §1.1) and refined by the secant <dD, dy> / <dy, dy> after each
        evaluation. For a denoiser that acts like a scalar near the solution this converges in two or three
        evaluations instead of a linear fixed-point rate.
        """
        target = self.xs[i + 1]
        ratio, beta, c = _coefficients(self.schedule, i)
        gain = self._gain(i)
        if self.xs[i] is None:  # first visit: the DDIM-inversion guess from D at the cleaner neighbour
            d_guess = self.ds[i + 1] if i + 1 < len(self.ds) else self._eval(target, i)
            y = (target - beta * d_guess) / ratio if ratio > 0 else self._clean_end_guess(i, target, d_guess)
            d = self._eval(y, i)
        else:
            y, d = self.xs[i], self.ds[i]
        f = self._step(i, y, d) - target
        inner_tol, eta = self.tol / 4, self.eta
        res = (f.norm() / target.norm()).item()
        for _ in range(self.max_iters):
            if res <= inner_tol:
                break
            slope = ratio + beta * (1.0 + c) * gain
            y_new = y - (eta / slope) * f
            d_new = self._eval(y_new, i)
            f_new = self._step(i, y_new, d_new) - target
            res_new = (f_new.norm() / target.norm()).item()
            dy, dd = y_new - y, d_new - d
            secant = (dd * dy).sum().item() / max((dy * dy).sum().item(), 1e-300)
            if math.isfinite(secant) and secant > 0:
                gain = secant
            if res_new > res:
                eta *= 0.5  # damp when a step overshoots
            y, d, f, res = y_new, d_new, f_new, res_new
        self.gains[i] = gain
        self.xs[i], self.ds[i] = y, d

    def _clean_end_guess(self, i: int, target: torch.Tensor, d_guess: torch.Tensor) -> torch.Tensor:
        # At a clean end (s_N = 0) the step is x_N = D(x_{N-1}): guess x_{N-1} = a x_N + s eps(x_N).
        a, s = self.schedule.alphas[i], self.schedule.sigmas[i]
        eps = (target - a * d_guess) / s
        return a * target + s * eps


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
INVERSIONS = {"dpm-exact": invert_dpm_exact, "dpm": invert_dpm, "ddim-exact": invert_ddim_exact, "ddim": invert_ddim}


def sampler_for(inversion: str) -> Callable:
    """The sampler that an inversion method inverts: 2M for dpm*, DDIM for ddim*."""
    return SAMPLERS[inversion.split("-")[0]]
