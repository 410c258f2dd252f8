"""Exact inversion of DPM-Solver++(2M) and DDIM: the sampler's own step equations solved for the noisier points.

Sampling runs `x_{i+1} = step_i(x_i, D(x_i), D(x_{i-1}))` from the noise to the image; exact inversion finds the
points `x_0..x_{N-1}` that this recursion maps onto a given image latent `x_N`, so that sampling from `x_0`
regenerates the image up to the solver tolerance (Hong et al., "On Exact Inversion of DPM-Solvers", CVPR 2024).

Design note (numbers from BENCHMARKS.md and the history of this module):

- Why not per step. DDIM's step i depends on x_i alone, so walking back from x_N one step at a time works
  (`ExactInverter.run`, ddim-exact): each step is solved by multisecant steps (`Secants`, `BlockModel`) whose model
  starts with the cleaner point's last secant pairs (`CARRY_PAIRS`), and stops when it stalls (`STALL_ITERS`; not
  the clean-end step, whose residual the round trip inherits: stopping it early cost up to 5 dB); this
  took about a third fewer NFE than one scalar secant gain per step, for the same reconstruction. 2M's step i also
  uses D at point i - 1, which is unknown when walking back, so its N equations form one coupled boundary-value
  problem.
- Tried and dropped. Gauss-Seidel sweeps of per-step solves with the D_{i-1} term frozen (Hong et al.'s scheme): the
  backward chain amplifies the frozen term's error, spectral radius ~30 on the embedded model at guidance 4.5, and
  ~15x the NFE of naive inversion even where it converges (analytic denoiser). Newton with one scalar dD/dx per point
  (a tridiagonal Jacobian; 4.0-4.7x naive NFE on the analytic denoiser): under strong classifier-free guidance dD/dx
  has eigenvalues of both signs spread over two orders of magnitude, the scalar model's error compounds along the
  chain, and on the trained model it stalled at ~1e-2 residuals and reconstructed worse than naive inversion
  (-0.2 to -28.5 dB against the VAE round trip over 8 scenes). Anderson acceleration of the sweeps saved no NFE on
  the tiny model; a tight warm start cost a third more NFE for the same result.
- What runs (`ExactInverter.solve_coupled`, dpm-exact). (1) Warm start: the first-order exact inversion, loosely
  (`WARM_START_TOL`). (2) Quasi-Newton sweeps with a multisecant model of dD/dx per point (`Secants`,
  `BlockModel`): every evaluation made at a point is a secant pair there; the model reproduces the last
  `SECANT_MEMORY` pairs and is a scalar elsewhere. The model's block-tridiagonal system is solved by GMRES (`gmres`,
  no NFE), preconditioned by the model's own first-order backward chain; one evaluation per point then tests the
  step (N - 1 NFE a sweep). (3) Safeguards: a sweep is accepted only if the residuals' norm falls (else the step
  shrinks by `REJECT_SHRINK`; the rejected evaluations still refine the models), the trajectory with the smallest
  largest residual is returned (never worse than the warm start), and the sweeps stop when `STALL_SWEEPS` sweeps
  gained less than `1 - STALL_GAIN`. (4) 2M under strong guidance amplifies step residuals along the way (~1e4 on
  the embedded model), so on reaching the tolerance a forward run from x_0 must land on x_N within `FORWARD_MARGIN`
  times what the last step explains, else the target tightens by that factor (at most `FORWARD_TIGHTENINGS` times).
  Result on the trained model: -0.00 to -0.01 dB against the VAE round trip over 8 scenes, 395-865 NFE (mean ~580)
  at 30 steps, against 30 NFE for naive inversion.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm, trange

from .schedule import Denoiser, InversionResult, Schedule, dpm_step, step_coefficients

#: A first-order last step at a clean end (x_N = D(x_{N-1}), nearly singular on a trained model) stops once below
#: this relative residual when its secant iteration slows down.
LAST_STEP_TOL = 2.5e-3
#: ddim-exact stops there at most this many times its tolerance (a tighter tol asks for a tighter clean end).
LAST_STEP_TOL_SCALE = 25.0
#: That step has no exact solution when the input latent lies off what the model can denoise to; its residual is
#: then the input's own distance from there, and counts as converged up to this (above it, see `converged`).
LAST_STEP_ACCEPT = 0.25
#: The forward check's allowance over the last step's own residual, and how often the target may tighten by it.
FORWARD_MARGIN = 3.0
FORWARD_TIGHTENINGS = 3
#: The warm start solves each first-order step only this far; the coupled sweeps do the rest.
WARM_START_TOL = 1e-2
#: Stop when the best largest residual fell by less than 30% over this many sweeps.
STALL_SWEEPS = 10
STALL_GAIN = 0.7
#: GMRES on the modelled system: iterations, and its relative tolerance, a share of how far the target is, clipped.
GMRES_ITERS = 30
GMRES_RTOL_SHARE = 0.1
GMRES_RTOL_MIN, GMRES_RTOL_MAX = 1e-8, 1e-2
GMRES_BREAKDOWN = 1e-14
#: Step length after an accepted step (x this, up to `damping`) and after a rejected one (coupled sweeps, one point).
ACCEPT_GROWTH = 2.0
REJECT_SHRINK = 0.7
POINT_REJECT_SHRINK = 0.5
#: Per-step solves (ddim-exact, the last step) aim at this share of the tolerance; "slow" = less than halving.
PER_STEP_TOL_SHARE = 0.25
SLOW_RATE = 0.5
#: Secant pairs kept per point, and the relative singular value below which the multisecant model ignores a direction.
SECANT_MEMORY = 12
#: ddim-exact starts each point's model with this many secant pairs of the cleaner point (`Secants.carry`).
CARRY_PAIRS = 4
#: A per-point solve stops when this many evaluations cut its residual by less than `1 - STALL_RATE` (it cannot
#: get further: the denoiser's precision, or no solution).
STALL_ITERS = 6
STALL_RATE = 0.9
SECANT_RCOND = 1e-6


class ExactInverter:
    """Solves x_{i+1} = step_i(x_i, D(x_i), D(x_{i-1})) for x_0..x_{N-1} given x_N.

    `solve_coupled` is the 2M solver (`invert_dpm_exact`), `run` the per-step one (`invert_ddim_exact`). `damping`
    scales every quasi-Newton step (1 = full steps); it shrinks after a rejected step and grows back after an
    accepted one."""

    def __init__(self, denoise: Denoiser, x: torch.Tensor, schedule: Schedule, tol: float, max_iters: int,
                 damping: float = 1.0):
        if tol <= 0 or max_iters < 1 or not 0 < damping <= 1:
            raise ValueError(f"need tol > 0, max_iters >= 1, 0 < damping <= 1; got {tol}, {max_iters}, {damping}")
        self.denoise, self.schedule = denoise, schedule
        self.tol, self.max_iters, self.damping = tol, max_iters, damping
        n = schedule.num_steps
        self.xs: list[torch.Tensor | None] = [None] * n + [x]
        self.ds: list[torch.Tensor | None] = [None] * n
        self.gains: dict[int, float] = {}  # secant estimate of dD/dx per point
        self.fitted: dict[int, float] = {}  # the multisecant models' scalar gains (solve_coupled)
        self.nfe = 0
        self.forward_passed: bool | None = None  # solve_coupled's last forward check, None if it ran none

    def residual(self, i: int) -> float:
        """Relative residual of step equation i with the current (cached) points."""
        f = self._step(i, self.xs[i], self.ds[i]) - self.xs[i + 1]
        return (f.norm() / self.xs[i + 1].norm()).item()

    def run(self, max_sweeps: int, disable: bool) -> InversionResult:
        n = self.schedule.num_steps
        secants = Secants(n)
        for _ in trange(max_sweeps, disable=disable or max_sweeps == 1, desc="exact inversion sweeps"):
            changed = False
            for i in trange(n - 1, -1, -1, disable=disable or max_sweeps > 1, desc="inverting", leave=False):
                if self.xs[i] is None or self.residual(i) > self.tol:
                    self._solve_step(secants, i)
                    changed = True
            if not changed:
                break
        return self._result()

    def solve_coupled(self, max_sweeps: int, disable: bool) -> InversionResult:
        """All N step equations of a multistep schedule at once (see `invert_dpm_exact`). One progress bar: the
        N warm-start steps, then up to `max_sweeps` sweeps; it ends full when the sweeps stop early."""
        bar = tqdm(total=self.schedule.num_steps + max_sweeps, disable=disable, desc="exact inversion: warm start")
        try:
            return self._solve_coupled(max_sweeps, bar)
        finally:
            bar.total = bar.n  # converged before max_sweeps: the run is finished, show it full
            bar.refresh()
            bar.close()

    def _solve_coupled(self, max_sweeps: int, bar) -> InversionResult:
        n, schedule = self.schedule.num_steps, self.schedule
        secants = Secants(n)
        # Warm start: first-order exact inversion, loosely (the sweeps correct it; its evaluations seed the models).
        first = schedule.first_order()
        for i in range(n - 1, -1, -1):
            bar.update()
            if i == n - 1 and schedule.orders[i] == 1:
                # A first-order last step depends on x_{N-1} alone: solve it once, here, by ddim-exact's damped
                # secant. At a clean end it reads x_N = D(x_{N-1}) with dD/dx nearly singular for a trained model:
                # the secant crawls (~10% a step), and each further digit moves x_{N-1} a long way along D's
                # near-null directions, which the coupled equations behind it must then follow (seen to stall
                # them). So once below LAST_STEP_TOL, a slowly converging solve stops there.
                self._solve(i, floor=LAST_STEP_TOL)
                continue
            target = self.xs[i + 1]
            ratio, beta, _ = step_coefficients(first, i)
            d_guess = self.ds[i + 1] if i + 1 < n else self._eval(target, i)
            y = (target - beta * d_guess) / ratio if ratio > 0 else self._clean_end_guess(i, target, d_guess)
            self.xs[i], self.ds[i] = y, self._eval(y, i)
            secants.add(i, self.xs[i], self.ds[i])
            self._solve_point(secants, i, ratio, beta, target, max(self.tol, WARM_START_TOL))
        m = n - 1 if schedule.orders[n - 1] == 1 else n  # unknowns x_0..x_{m-1}; x_m is fixed from here on
        if m == 0:
            return self._result()
        coefs = [step_coefficients(schedule, i) for i in range(m)]

        def residuals(xs: list[torch.Tensor], ds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            """Step equations 0..m-1, (m, ...), and their relative norms (m,), as `residual` measures them."""
            out, scale = [], []
            for i, (ratio, beta, c) in enumerate(coefs):
                d = (1.0 + c) * ds[i] - c * ds[i - 1] if c else ds[i]
                nxt = xs[i + 1] if i + 1 < m else self.xs[m]
                out.append(ratio * xs[i] + beta * d - nxt)
                scale.append(nxt.norm())
            f = torch.stack(out)
            return f, f.flatten(1).norm(dim=1) / torch.stack(scale).clamp_min(1e-300)

        f, rel = residuals(self.xs, self.ds)
        best, best_state = rel.max().item(), (self.xs[:m], self.ds[:m])  # largest step residual: the criterion
        merit = rel.norm().item()  # acceptance: all residuals together (the largest alone stalls on one step)
        target = self.tol
        damp, history = self.damping, [best]
        bar.set_description("exact inversion")
        for _ in range(max_sweeps):
            if best <= target:
                self.forward_passed = self._forward_ok(*best_state)
                if self.forward_passed or target <= self.tol * FORWARD_MARGIN**-FORWARD_TIGHTENINGS:
                    break
                target /= FORWARD_MARGIN  # the sampler amplifies these residuals: solve further
            if len(history) > STALL_SWEEPS and history[-1] > STALL_GAIN * history[-1 - STALL_SWEEPS]:
                break  # stalled: at the denoiser's precision, or the models cannot get further
            bar.update()
            models = [self._model(secants, i, self.xs[i], self.ds[i]) for i in range(m)]
            # no more accurate than reaching the target needs
            rtol = min(GMRES_RTOL_MAX, max(GMRES_RTOL_MIN, GMRES_RTOL_SHARE * target / best))
            step = gmres(lambda e: _coupled_apply(models, coefs, e), lambda v: _chain_solve(models, coefs, v),
                         -f.flatten(1), iters=GMRES_ITERS, rtol=rtol).view_as(f)
            xs = [self.xs[i] + damp * step[i] for i in range(m)]
            ds = [self._eval(xs[i], i) for i in range(m)]
            for i in range(m):
                secants.add(i, xs[i], ds[i])
            f_new, rel = residuals(xs + self.xs[m:], ds)
            if math.isfinite(rel.norm().item()) and rel.norm().item() < merit:
                self.xs[:m], self.ds[:m], f, merit = xs, ds, f_new, rel.norm().item()
                damp = min(self.damping, ACCEPT_GROWTH * damp)
                if rel.max().item() < best:
                    best, best_state = rel.max().item(), (xs, ds)
            else:  # reject: back to the last accepted point, shorter step; the new pairs still refine the models
                damp *= REJECT_SHRINK
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
        return defect <= FORWARD_MARGIN * max(self.residual(n - 1), self.tol)

    def _result(self) -> InversionResult:
        residuals = [self.residual(i) for i in range(self.schedule.num_steps)]
        return InversionResult(trajectory=list(self.xs), residuals=residuals, nfe=self.nfe,
                               converged=self.converged(residuals))

    def converged(self, residuals: list[float]) -> bool:
        """Every step residual within the tolerance (a first-order last step at a clean end within
        `LAST_STEP_ACCEPT`, see there), all finite, and no failed forward check."""
        n, schedule = self.schedule.num_steps, self.schedule
        clean_end = schedule.orders[n - 1] == 1 and schedule.sigmas[n].item() == 0.0
        limits = [self.tol] * n
        if clean_end:
            limits[n - 1] = max(self.tol, LAST_STEP_ACCEPT)
        within = all(math.isfinite(r) and r <= limit for r, limit in zip(residuals, limits))
        return within and self.forward_passed is not False

    def _solve_step(self, secants: Secants, i: int) -> None:
        """One first-order step equation, ratio x_i + beta D(x_i) = x_{i+1}, for x_i (ddim-exact): from the naive
        guess by multisecant steps whose model starts with the cleaner point's last `CARRY_PAIRS` secant pairs (dD/dx
        changes slowly along the schedule). A step at a clean end (ratio 0) goes to `_solve`, whose slow-convergence floor
        (`LAST_STEP_TOL`) scales down with the tolerance."""
        ratio, beta, _ = step_coefficients(self.schedule, i)
        if ratio == 0 or self.xs[i] is not None:
            self._solve(i, floor=min(LAST_STEP_TOL, LAST_STEP_TOL_SCALE * self.tol) if ratio == 0 else 0.0)
            return
        target = self.xs[i + 1]
        d_guess = self.ds[i + 1] if i + 1 < len(self.ds) else self._eval(target, i)
        self.xs[i] = (target - beta * d_guess) / ratio
        self.ds[i] = self._eval(self.xs[i], i)
        secants.add(i, self.xs[i], self.ds[i])
        if i + 1 < len(self.ds):
            secants.carry(i + 1, i, CARRY_PAIRS)
        self._solve_point(secants, i, ratio, beta, target, self.tol * PER_STEP_TOL_SHARE)

    def _solve_point(self, secants: Secants, i: int, ratio: float, kappa: float, target: torch.Tensor, itol: float):
        """Solve ratio y + kappa D_i(y) = target from the current x_i by multisecant steps (at most max_iters NFE;
        fewer when it stalls, see `STALL_ITERS`)."""
        y, d = self.xs[i], self.ds[i]
        norm = target.norm().clamp_min(1e-300)
        f = ratio * y + kappa * d - target
        res, damp = (f.norm() / norm).item(), self.damping
        history = [res]
        for _ in range(self.max_iters):
            if res <= itol or (len(history) > STALL_ITERS and res > STALL_RATE * history[-1 - STALL_ITERS]):
                break
            model = self._model(secants, i, y, d)
            y_new = y + damp * model.solve(ratio, kappa, -f)
            d_new = self._eval(y_new, i)
            secants.add(i, y_new, d_new)
            f_new = ratio * y_new + kappa * d_new - target
            res_new = (f_new.norm() / norm).item()
            if math.isfinite(res_new) and res_new < res:
                y, d, f, res = y_new, d_new, f_new, res_new
                damp = min(self.damping, ACCEPT_GROWTH * damp)
            else:
                damp *= POINT_REJECT_SHRINK
            history.append(res)
        self.xs[i], self.ds[i] = y, d

    def _model(self, secants: Secants, i: int, x: torch.Tensor, d: torch.Tensor) -> BlockModel:
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
            return BlockModel(1.0 / a[i].item(), None, None)
        eps_gain = (1.0 - a[near].item() * self.fitted[near]) / s[near].item()
        return BlockModel(max((1.0 - s[i].item() * eps_gain) / a[i].item(), 0.0), None, None)

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
        fixed-point iteration of exact inversion) and refined by the secant <dD, dy> / <dy, dy> after each
        evaluation. For a denoiser that acts like a scalar near the solution this converges in two or three
        evaluations instead of a linear fixed-point rate. Below `floor` it also stops once an evaluation no longer
        halves the residual (slow convergence: an ill-conditioned step, see `solve_coupled`).
        """
        target = self.xs[i + 1]
        ratio, beta, c = step_coefficients(self.schedule, i)
        gain = self._gain(i)
        if self.xs[i] is None:  # first visit: the DDIM-inversion guess from D at the cleaner neighbour
            d_guess = self.ds[i + 1] if i + 1 < len(self.ds) else self._eval(target, i)
            y = (target - beta * d_guess) / ratio if ratio > 0 else self._clean_end_guess(i, target, d_guess)
            d = self._eval(y, i)
        else:
            y, d = self.xs[i], self.ds[i]
        f = self._step(i, y, d) - target
        inner_tol, eta = self.tol * PER_STEP_TOL_SHARE, self.damping
        res, slow = (f.norm() / target.norm()).item(), False
        best = (res, y, d)
        for _ in range(self.max_iters):  # no stall stop here: its residual is the round trip's (measured)
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
                eta *= POINT_REJECT_SHRINK  # damp when a step overshoots
            slow = res_new > SLOW_RATE * res
            y, d, f, res = y_new, d_new, f_new, res_new
            if res < best[0]:  # (a NaN never is)
                best = (res, y, d)
        self.gains[i] = gain
        self.xs[i], self.ds[i] = best[1], best[2]  # an overshooting last iterate does not stick

    def _clean_end_guess(self, i: int, target: torch.Tensor, d_guess: torch.Tensor) -> torch.Tensor:
        # At a clean end (s_N = 0) the step is x_N = D(x_{N-1}): guess x_{N-1} = a x_N + s eps(x_N).
        a, s = self.schedule.alphas[i], self.schedule.sigmas[i]
        eps = (target - a * d_guess) / s
        return a * target + s * eps


class BlockModel:
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


class Secants:
    """The last `memory` evaluations (y, D(y)) at each point, and the multisecant models built from them."""

    def __init__(self, n: int, memory: int = SECANT_MEMORY, rcond: float = SECANT_RCOND):
        self.hist: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
        self.memory, self.rcond = memory, rcond

    def add(self, i: int, y: torch.Tensor, d: torch.Tensor) -> None:
        self.hist[i].append((y, d))
        del self.hist[i][: -self.memory]

    def carry(self, source: int, dest: int, count: int) -> None:
        """Put point `source`'s last `count` pairs, as differences from its newest one, around point `dest`'s newest
        pair, oldest first: a model of dD/dx at `dest` before any evaluation there."""
        if not self.hist[source] or not self.hist[dest]:
            return
        (y0, d0), (y1, d1) = self.hist[source][-1], self.hist[dest][-1]
        moved = [(y1 + (y - y0), d1 + (e - d0)) for y, e in self.hist[source][-1 - count : -1]]
        self.hist[dest][:0] = moved
        del self.hist[dest][: -self.memory]

    def model(self, i: int, x: torch.Tensor, d: torch.Tensor) -> BlockModel | None:
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
            return BlockModel(gain, None, None)
        keep = sv > self.rcond * sv[0]
        u, sv, vh = u[:, keep], sv[keep], vh[keep]
        # S = U diag(sv) Vh diag(norms)  =>  S^+ = diag(1/norms) Vh^T diag(1/sv) U^T
        return BlockModel(gain, ((z - gain * s) / norms) @ vh.T / sv, u)


def _coupled_apply(models: list[BlockModel], coefs: list, e: torch.Tensor) -> torch.Tensor:
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


def _chain_solve(models: list[BlockModel], coefs: list, v: torch.Tensor) -> torch.Tensor:
    """Preconditioner: the first-order backward chain (ratio + beta J_i) e_i - e_{i+1} = v_i, from the clean end."""
    out = torch.empty_like(v)
    nxt = torch.zeros_like(v[0])
    for i in range(len(models) - 1, -1, -1):
        ratio, beta, _ = coefs[i]
        out[i] = nxt = models[i].solve(ratio, beta, v[i] + nxt)
    return out


def gmres(apply, precondition, b: torch.Tensor, iters: int, rtol: float) -> torch.Tensor:
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
        if left <= rtol or hess[j + 1, j] <= GMRES_BREAKDOWN * beta:
            break
        basis.append(w / hess[j + 1, j])
    return sum(coef[k] * dirs[k] for k in range(len(coef)))
