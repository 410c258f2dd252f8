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

# invert_dpm_exact (see _ExactInverter.solve_coupled): a slowly converging clean-end last step stops once below
# _LAST_STEP_TOL; and once the step residuals reach tol, a forward run from x_0 must land on x_N within
# _FORWARD_MARGIN times what the last step alone explains, else the sweeps go on to tol / _FORWARD_MARGIN (at most
# three times).
_LAST_STEP_TOL = 2.5e-3
_FORWARD_MARGIN = 3.0


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
    max_sweeps: int = 40,
    disable: bool = True,
    **_,
) -> InversionResult:
    """Exact DPM-Solver++(2M) inversion: the sampler's own N step equations solved together to `tol`.

    Why not per step: 2M step i uses D at point i - 1 (noisier, unknown when walking back), so the step equations
    form one coupled system, a boundary-value problem (x_N fixed at one end, a first-order first step at the
    other). Freezing the D_{i-1} term (Hong et al.) leaves an error the sampler then amplifies. Under strong
    classifier-free guidance dD/dx has eigenvalues of both signs spread over two orders of magnitude, and the
    simple schemes diverge: Gauss-Seidel sweeps of per-step solves (the backward chain amplifies the frozen
    term's error; spectral radius ~30 on the embedded model at guidance 4.5) and Newton with one scalar dD/dx per
    point (the model's error compounds along the chain).

    This solver: (1) warm start: the first-order exact inversion, solved loosely; a first-order last step depends
    on x_{N-1} alone and is solved there once, by ddim-exact's secant. (2) Quasi-Newton sweeps on the other
    equations with a multisecant model of dD/dx per point: every evaluation made at a point is a secant pair
    there, the model reproduces the recent pairs and is a scalar elsewhere. The model's block-tridiagonal system
    is solved by GMRES (no NFE), preconditioned by the model's own first-order backward chain; one evaluation per
    point then tests the step (N - 1 NFE a sweep; the Denoiser takes one point per call). (3) Safeguards: a sweep
    is accepted only if it lowers the residuals' norm, else the step is shortened (the rejected evaluations still
    refine the models); the trajectory with the smallest largest residual is returned, so the result is never
    worse than the warm start; the sweeps stop at `max_sweeps` or when 10 sweeps gained less than 30% (the
    denoiser's float32 precision, ~1e-6 here, or a problem the models cannot crack). (4) The 2M sampler under strong guidance amplifies step residuals along the way (by
    ~1e4 on the embedded model), so reaching tol is checked once by running the sampler from x_0 (N NFE); if it
    misses x_N by more than the last step explains, the sweeps go on to a tighter tolerance.
    """
    return _ExactInverter(denoise, x, schedule, tol, max_iters, eta).solve_coupled(max_sweeps, disable)


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
        self.fitted: dict[int, float] = {}  # the multisecant models' scalar gains (solve_coupled)
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

    def solve_coupled(self, max_sweeps: int, disable: bool) -> InversionResult:
        """All N step equations of a multistep schedule at once (see `invert_dpm_exact`)."""
        n, schedule = self.schedule.num_steps, self.schedule
        secants = _Secants(n)
        # Warm start: first-order exact inversion, loosely (the sweeps correct it; its evaluations seed the models).
        first = schedule.first_order()
        for i in trange(n - 1, -1, -1, disable=disable, desc="warm start", leave=False):
            if i == n - 1 and schedule.orders[i] == 1:
                # A first-order last step depends on x_{N-1} alone: solve it once, here, by ddim-exact's damped
                # secant. At a clean end it reads x_N = D(x_{N-1}) with dD/dx nearly singular for a trained model:
                # the secant crawls (~10% a step), and each further digit moves x_{N-1} a long way along D's
                # near-null directions, which the coupled equations behind it must then follow (seen to stall
                # them). So once below _LAST_STEP_TOL, a slowly converging solve stops there.
                self._solve(i, floor=_LAST_STEP_TOL)
                continue
            target = self.xs[i + 1]
            ratio, beta, _ = _coefficients(first, i)
            d_guess = self.ds[i + 1] if i + 1 < n else self._eval(target, i)
            y = (target - beta * d_guess) / ratio if ratio > 0 else self._clean_end_guess(i, target, d_guess)
            self.xs[i], self.ds[i] = y, self._eval(y, i)
            secants.add(i, self.xs[i], self.ds[i])
            self._solve_point(secants, i, ratio, beta, target, max(self.tol, 1e-2))
        m = n - 1 if schedule.orders[n - 1] == 1 else n  # unknowns x_0..x_{m-1}; x_m is fixed from here on
        if m == 0:
            return self._result()
        coefs = [_coefficients(schedule, i) for i in range(m)]
        scale = torch.stack([x.norm() for x in self.xs[1 : m + 1]]).clamp_min(1e-300)

        def residuals(xs: list[torch.Tensor], ds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            """Step equations 0..m-1, (m, ...), and their relative norms (m,)."""
            out = []
            for i, (ratio, beta, c) in enumerate(coefs):
                d = (1.0 + c) * ds[i] - c * ds[i - 1] if c else ds[i]
                out.append(ratio * xs[i] + beta * d - (xs[i + 1] if i + 1 < m else self.xs[m]))
            f = torch.stack(out)
            return f, f.flatten(1).norm(dim=1) / scale

        f, rel = residuals(self.xs, self.ds)
        best, best_state = rel.max().item(), (self.xs[:m], self.ds[:m])  # largest step residual: the criterion
        merit = rel.norm().item()  # acceptance: all residuals together (the largest alone stalls on one step)
        target = self.tol
        damp, history = self.eta, [best]
        for _ in trange(max_sweeps, disable=disable, desc="exact inversion"):
            if best <= target:
                if target <= self.tol * _FORWARD_MARGIN**-3 or self._forward_ok(*best_state):
                    break
                target /= _FORWARD_MARGIN  # the sampler amplifies these residuals: solve further
            if len(history) > 10 and history[-1] > 0.7 * history[-11]:
                break  # stalled for 10 sweeps: at the denoiser's precision, or the models cannot get further
            models = [self._model(secants, i, self.xs[i], self.ds[i]) for i in range(m)]
            rtol = min(1e-2, max(1e-8, 0.1 * target / best))  # no more accurate than reaching the target needs
            step = _gmres(lambda e: _coupled_apply(models, coefs, e), lambda v: _chain_solve(models, coefs, v),
                          -f.flatten(1), iters=30, rtol=rtol).view_as(f)
            xs = [self.xs[i] + damp * step[i] for i in range(m)]
            ds = [self._eval(xs[i], i) for i in range(m)]
            for i in range(m):
                secants.add(i, xs[i], ds[i])
            f_new, rel = residuals(xs + self.xs[m:], ds)
            if math.isfinite(rel.norm().item()) and rel.norm().item() < merit:
                self.xs[:m], self.ds[:m], f, merit = xs, ds, f_new, rel.norm().item()
                damp = min(self.eta, 2.0 * damp)
                if rel.max().item() < best:
                    best, best_state = rel.max().item(), (xs, ds)
            else:  # reject: back to the last accepted point, shorter step; the new pairs still refine the models
                damp *= 0.7
            history.append(best)
        self.xs[:m], self.ds[:m] = best_state
        return self._result()

    def _forward_ok(self, xs: list[torch.Tensor], ds: list[torch.Tensor]) -> bool:
        """Run the sampler from x_0 (N - 1 NFE, D at x_0 is known): does it land on x_N about as well as the last
        step alone allows? The step residuals are relative to each step; 2M under strong guidance amplifies them
        along the way."""
        n = self.schedule.num_steps
        x, d, d_prev = xs[0], ds[0], None
        for i in range(n):
            if i:
                d = self._eval(x, i)
            x, d_prev = dpm_step(self.schedule, i, x, d, d_prev), d
        defect = ((x - self.xs[n]).norm() / self.xs[n].norm()).item()
        return defect <= _FORWARD_MARGIN * max(self.residual(n - 1), self.tol)

    def _result(self) -> InversionResult:
        residuals = [self.residual(i) for i in range(self.schedule.num_steps)]
        return InversionResult(trajectory=list(self.xs), residuals=residuals, nfe=self.nfe)

    def _solve_point(self, secants: _Secants, i: int, ratio: float, kappa: float, target: torch.Tensor, itol: float):
        """Solve ratio y + kappa D_i(y) = target from the current x_i by multisecant steps (at most max_iters NFE)."""
        y, d = self.xs[i], self.ds[i]
        norm = target.norm().clamp_min(1e-300)
        f = ratio * y + kappa * d - target
        res, damp = (f.norm() / norm).item(), self.eta
        for _ in range(self.max_iters):
            if res <= itol:
                break
            model = self._model(secants, i, y, d)
            y_new = y + damp * model.solve(ratio, kappa, -f)
            d_new = self._eval(y_new, i)
            secants.add(i, y_new, d_new)
            f_new = ratio * y_new + kappa * d_new - target
            res_new = (f_new.norm() / norm).item()
            if math.isfinite(res_new) and res_new < res:
                y, d, f, res = y_new, d_new, f_new, res_new
                damp = min(self.eta, 2.0 * damp)
            else:
                damp *= 0.5
        self.xs[i], self.ds[i] = y, d

    def _model(self, secants: _Secants, i: int, x: torch.Tensor, d: torch.Tensor) -> _BlockModel:
        """Point i's multisecant model; where it has no pairs yet, its scalar gain comes from the nearest point
        that has one, carried over as an eps gain (dD/dx = (1 - s deps/dx) / a; deps/dx varies slowly along the
        schedule), else the eps-frozen 1/a."""
        model = secants.model(i, x, d)
        if model is not None:
            self.fitted[i] = model.gain
            return model
        a, s = self.schedule.alphas, self.schedule.sigmas
        near = min(self.fitted, key=lambda j: (abs(j - i), j), default=None)
        if near is None or s[near] == 0:
            return _BlockModel(1.0 / a[i].item(), None, None)
        eps_gain = (1.0 - a[near].item() * self.fitted[near]) / s[near].item()
        return _BlockModel(max((1.0 - s[i].item() * eps_gain) / a[i].item(), 0.0), None, None)

    def _gain(self, i: int) -> float:
        return self.gains.get(i, 1.0 / self.schedule.alphas[i].item())

    def _step(self, i: int, x_i: torch.Tensor, d_i: torch.Tensor) -> torch.Tensor:
        d_prev = self.ds[i - 1] if self.schedule.orders[i] == 2 else None
        return dpm_step(self.schedule, i, x_i, d_i, d_prev)

    def _eval(self, y: torch.Tensor, i: int) -> torch.Tensor:
        self.nfe += 1
        return self.denoise(y, i)

    def _solve(self, i: int, floor: float = 0.0) -> None:
        """Solve step equation i for x_i by a damped secant iteration, warm-started from the current x_i.

        F(y) = step_i(y, D(y)) - x_{i+1}. Its derivative is `ratio + beta (1 + c) dD/dy`; dD/dy is modelled as one
        scalar per point, starting from its eps-frozen value 1/a_i (Newton with eps held fixed, the plain
        fixed-point iteration of REFERENCE §1.1) and refined by the secant <dD, dy> / <dy, dy> after each
        evaluation. For a denoiser that acts like a scalar near the solution this converges in two or three
        evaluations instead of a linear fixed-point rate. Below `floor` it also stops once an evaluation no longer
        halves the residual (slow convergence: an ill-conditioned step, see `solve_coupled`).
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
        res, slow = (f.norm() / target.norm()).item(), False
        for _ in range(self.max_iters):
            if res <= inner_tol or (res <= floor and slow):
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
            slow = res_new > 0.5 * res
            y, d, f, res = y_new, d_new, f_new, res_new
        self.gains[i] = gain
        self.xs[i], self.ds[i] = y, d

    def _clean_end_guess(self, i: int, target: torch.Tensor, d_guess: torch.Tensor) -> torch.Tensor:
        # At a clean end (s_N = 0) the step is x_N = D(x_{N-1}): guess x_{N-1} = a x_N + s eps(x_N).
        a, s = self.schedule.alphas[i], self.schedule.sigmas[i]
        eps = (target - a * d_guess) / s
        return a * target + s * eps


class _BlockModel:
    """dD/dx at one point: `gain * v + c @ (u.T @ v)`, u orthonormal; reproduces the recent secant pairs."""

    def __init__(self, gain: float, c: torch.Tensor | None, u: torch.Tensor | None):
        self.gain, self.c, self.u = gain, c, u

    def apply(self, v: torch.Tensor) -> torch.Tensor:  # v flat
        out = self.gain * v
        return out if self.u is None else out + self.c @ (self.u.T @ v)

    def solve(self, ratio: float, kappa: float, rhs: torch.Tensor) -> torch.Tensor:
        """(ratio I + kappa J) e = rhs, by Woodbury on the low-rank part."""
        flat = rhs.flatten()
        gamma = ratio + kappa * self.gain
        if self.u is None:
            return (flat / gamma).view_as(rhs)
        small = gamma * torch.eye(self.u.shape[1], dtype=flat.dtype, device=flat.device) + kappa * (self.u.T @ self.c)
        e = (flat - kappa * self.c @ torch.linalg.solve(small, (self.u.T @ flat)[:, None])[:, 0]) / gamma
        return e.view_as(rhs)


class _Secants:
    """The last `memory` evaluations (y, D(y)) at each point, and the multisecant models built from them."""

    def __init__(self, n: int, memory: int = 12, rcond: float = 1e-6):
        self.hist: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
        self.memory, self.rcond = memory, rcond

    def add(self, i: int, y: torch.Tensor, d: torch.Tensor) -> None:
        self.hist[i].append((y, d))
        del self.hist[i][: -self.memory]

    def model(self, i: int, x: torch.Tensor, d: torch.Tensor) -> _BlockModel | None:
        """Multisecant model at (x, d): J (y_k - x) = D(y_k) - d for the stored pairs (least squares where they are
        nearly dependent), a scalar gain (their least-squares fit, at least 0) on the rest. None without pairs."""
        pairs = [(y - x, e - d) for y, e in self.hist[i] if y is not x]
        pairs = [(s.flatten(), z.flatten()) for s, z in pairs if s.abs().max() > 0]
        if not pairs:
            return None
        s = torch.stack([p[0] for p in pairs], 1)
        z = torch.stack([p[1] for p in pairs], 1)
        ok = s.isfinite().all(0) & z.isfinite().all(0)
        if not ok.any():
            return None
        s, z = s[:, ok], z[:, ok]
        gain = (s * z).sum().item() / (s * s).sum().item()
        norms = s.norm(dim=0)
        try:  # pseudo-inverse of S by SVD of its normalised columns
            u, sv, vh = torch.linalg.svd(s / norms, full_matrices=False)
        except RuntimeError:  # did not converge: keep the scalar part
            u, sv = None, None
        if not math.isfinite(gain):
            return None
        gain = max(gain, 0.0)
        if sv is None or not (sv > self.rcond * sv[0]).any():
            return _BlockModel(gain, None, None)
        keep = sv > self.rcond * sv[0]
        u, sv, vh = u[:, keep], sv[keep], vh[keep]
        # S = U diag(sv) Vh diag(norms)  =>  S^+ = diag(1/norms) Vh^T diag(1/sv) U^T
        return _BlockModel(gain, ((z - gain * s) / norms) @ vh.T / sv, u)


def _coupled_apply(models: list[_BlockModel], coefs: list, e: torch.Tensor) -> torch.Tensor:
    """The modelled Jacobian of step equations 0..m-1 applied to point corrections e (m, D); e_m = 0."""
    m = len(models)
    out = torch.empty_like(e)
    jac = [models[i].apply(e[i]) for i in range(m)]
    for i, (ratio, beta, c) in enumerate(coefs):
        v = ratio * e[i] + beta * (1.0 + c) * jac[i]
        if c:
            v = v - beta * c * jac[i - 1]
        if i + 1 < m:
            v = v - e[i + 1]
        out[i] = v
    return out


def _chain_solve(models: list[_BlockModel], coefs: list, v: torch.Tensor) -> torch.Tensor:
    """Preconditioner: the first-order backward chain (ratio + beta J_i) e_i - e_{i+1} = v_i, from the clean end."""
    out = torch.empty_like(v)
    nxt = torch.zeros_like(v[0])
    for i in range(len(models) - 1, -1, -1):
        ratio, beta, _ = coefs[i]
        out[i] = nxt = models[i].solve(ratio, beta, v[i] + nxt)
    return out


def _gmres(apply, precondition, b: torch.Tensor, iters: int, rtol: float) -> torch.Tensor:
    """Right-preconditioned GMRES for apply(x) = b (no restarts; the systems here are small and cheap)."""
    beta = b.norm()
    if beta == 0:
        return torch.zeros_like(b)
    basis, dirs = [b / beta], []
    hess = torch.zeros(iters + 1, iters, dtype=b.dtype, device=b.device)
    coef = torch.zeros(0, dtype=b.dtype, device=b.device)
    for j in range(iters):
        z = precondition(basis[j])
        dirs.append(z)
        w = apply(z)
        for k in range(j + 1):
            hess[k, j] = (w * basis[k]).sum()
            w = w - hess[k, j] * basis[k]
        hess[j + 1, j] = w.norm()
        rhs = torch.zeros(j + 2, 1, dtype=b.dtype, device=b.device)
        rhs[0] = beta
        coef = torch.linalg.lstsq(hess[: j + 2, : j + 1].cpu(), rhs.cpu()).solution[:, 0].to(b.device)
        left = (rhs[:, 0] - hess[: j + 2, : j + 1] @ coef).norm() / beta
        if left <= rtol or hess[j + 1, j] <= 1e-14 * beta:
            break
        basis.append(w / hess[j + 1, j])
    return sum(coef[k] * dirs[k] for k in range(len(coef)))



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
