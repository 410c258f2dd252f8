"""Solvers: parity with diffusers, and inversion round trips (analytic Gaussian denoiser, tiny random PixArt)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from dit4edit import solvers
from dit4edit.exact_inversion import ExactInverter
from dit4edit.solvers import INVERSIONS, InversionResult, Schedule, sampler_for
from dit4edit.tiny import gaussian_denoiser, pixart_scheduler


def nmse(a, b):
    return ((a - b).norm() ** 2 / b.norm() ** 2).item()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("steps", [10, 20, 30])
def test_schedule_matches_diffusers_orders(steps):
    schedule = Schedule.from_scheduler(pixart_scheduler(), steps)
    assert schedule.num_steps == steps and len(schedule.alphas) == steps + 1
    assert schedule.orders[0] == 1 and schedule.orders[-1] == 1  # final sigma is zero: last step first order
    assert set(schedule.orders[1:-1]) <= {2}
    assert schedule.sigmas[-1] == 0 and torch.allclose(schedule.alphas**2 + schedule.sigmas**2, torch.ones(1).double())


@pytest.mark.parametrize("steps", [8, 20, 30])
def test_dpmpp_2m_matches_diffusers_scheduler(steps):
    """Our 2M on the same timesteps equals diffusers' DPMSolverMultistepScheduler step by step to 1e-5."""
    scheduler = pixart_scheduler()
    scheduler.set_timesteps(steps)
    schedule = Schedule.from_scheduler(scheduler, steps)
    torch.manual_seed(0)
    weight = torch.randn(4, 4, dtype=torch.float64) * 0.5

    def eps_model(x, t):  # a nonlinear, timestep-dependent stand-in for a network
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, x)) + 0.1 * math.sin(float(t) / 100.0)

    x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    reference = x0.clone()
    for t in scheduler.timesteps:
        reference = scheduler.step(eps_model(reference, t), t, reference).prev_sample

    def denoise(x, i):
        eps = eps_model(x, schedule.timesteps[i])
        return (x - schedule.sigmas[i] * eps) / schedule.alphas[i]

    ours = solvers.sample_dpmpp_2m(denoise, x0.clone(), schedule)
    assert len(ours) == steps + 1
    assert rel(ours[-1], reference) < 1e-5


def test_ddim_is_first_order_dpm():
    schedule = Schedule.from_scheduler(pixart_scheduler(), 10)
    denoise = gaussian_denoiser(schedule, 0.5)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    ddim = solvers.sample_ddim(denoise, x, schedule)[-1]
    two_m = solvers.sample_dpmpp_2m(denoise, x, schedule)[-1]
    assert rel(ddim, two_m) > 1e-4  # the orders really differ
    # DDIM closed form on the Gaussian: x_{i+1} = a_{i+1} D + s_{i+1} eps
    y = x
    for i in range(10):
        d = denoise(y, i)
        eps = (y - schedule.alphas[i] * d) / schedule.sigmas[i]
        y = schedule.alphas[i + 1] * d + schedule.sigmas[i + 1] * eps
    assert rel(ddim, y) < 1e-12


@pytest.mark.parametrize("steps", [10, 30])
def test_inversion_round_trip_on_gaussian_denoiser(steps):
    schedule = Schedule.from_scheduler(pixart_scheduler(), steps)
    denoise = gaussian_denoiser(schedule, 0.5)
    x0 = 0.5 * torch.randn(1, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = {}
    for name, invert in INVERSIONS.items():
        result = invert(denoise, x0, schedule, tol=1e-12)
        assert len(result.trajectory) == steps + 1 and result.trajectory[-1] is x0
        assert result.nfe >= steps
        errors[name] = rel(sampler_for(name)(denoise, result.latent, schedule)[-1], x0)
    assert errors["ddim-exact"] <= 1e-10
    assert errors["dpm-exact"] <= 1e-5
    assert errors["dpm"] >= 1e-3 and errors["ddim"] >= 1e-3


def test_exact_inversions_report_small_residuals_and_naive_do_not():
    schedule = Schedule.from_scheduler(pixart_scheduler(), 10)
    denoise = gaussian_denoiser(schedule, 0.5)
    x0 = 0.5 * torch.randn(1, 4, 8, 8, dtype=torch.float64)
    exact = solvers.invert_dpm_exact(denoise, x0, schedule, tol=1e-8)
    assert len(exact.residuals) == 10 and max(exact.residuals) <= 1e-8
    naive = solvers.invert_dpm(denoise, x0, schedule)
    assert naive.residuals is None and naive.nfe == 10
    assert max(solvers.step_residuals(denoise, naive.trajectory, schedule)) > 1e-4


def guided_denoiser(schedule: Schedule, spread: float, guidance: float = 4.5, dim: int = 64, seed: int = 0):
    """D from an eps model like classifier-free guidance of two random linear maps (plus a mild nonlinearity):
    eps = eps_u + g (eps_c - eps_u). Its Jacobian is non-symmetric with a spread spectrum, as on the trained model
    at guidance 4.5, which one scalar dD/dx per point cannot model."""
    gen = torch.Generator().manual_seed(seed)
    uncond = 0.8 * torch.eye(dim, dtype=torch.float64) + spread * torch.randn(dim, dim, dtype=torch.float64,
                                                                            generator=gen) / dim**0.5
    cond = uncond + spread * torch.randn(dim, dim, dtype=torch.float64, generator=gen) / dim**0.5
    weight = uncond + guidance * (cond - uncond)

    def denoise(x, i):
        v = x.flatten()
        eps = weight @ v + 0.1 * torch.tanh(v)
        return ((v - schedule.sigmas[i] * eps) / schedule.alphas[i]).view_as(x)

    return denoise


def coupled(denoise, x, schedule, tol, max_sweeps):
    """The 2M solver itself, without the fallback to naive inversion that `invert_dpm_exact` adds."""
    return ExactInverter(denoise, x, schedule, tol, 30).solve_coupled(max_sweeps, disable=True)


def test_dpm_exact_converges_under_strong_guidance():
    """The scalar-gain Newton this replaced ended here at residual 1e-2, its reconstruction off by 1e-2."""
    schedule = Schedule.from_scheduler(pixart_scheduler(), 20)
    denoise = guided_denoiser(schedule, spread=0.15)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    warm = coupled(denoise, x, schedule, 1e-8, max_sweeps=0)
    result = solvers.invert_dpm_exact(denoise, x, schedule, tol=1e-8)
    assert max(result.residuals) <= 1e-8 < 1e-3 < max(warm.residuals)
    assert rel(solvers.sample_dpmpp_2m(denoise, result.latent, schedule)[-1], x) < 1e-6
    assert result.nfe < 800


@pytest.mark.parametrize("steps, spread, sweeps", [(10, 0.25, (1, 3, 40)), (20, 0.1, range(6))])
def test_dpm_exact_returns_its_best_trajectory(steps, spread, sweeps):
    """More sweeps never end with a larger largest residual, the warm start's included. Where no sweep budget
    reaches tol (10 big steps, wide spectrum), and where a sweep is accepted for its smaller residual norm while its
    largest residual grows (20 steps: after 2 sweeps; returning the last accepted trajectory fails here)."""
    schedule = Schedule.from_scheduler(pixart_scheduler(), steps)
    denoise = guided_denoiser(schedule, spread=spread)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    warm = max(coupled(denoise, x, schedule, 1e-8, max_sweeps=0).residuals)
    previous = warm
    for count in sweeps:
        result = coupled(denoise, x, schedule, 1e-8, max_sweeps=count)
        largest = max(result.residuals)
        assert math.isfinite(largest) and largest <= previous * (1 + 1e-9) and previous <= warm * (1 + 1e-9)
        previous = largest


def round_trip(denoise, latent, schedule, x):
    return rel(solvers.sample_dpmpp_2m(denoise, latent, schedule)[-1], x)


@pytest.mark.parametrize("name", ["ddim-exact", "dpm-exact"])
def test_exact_inversion_that_cannot_converge_warns_and_is_never_worse_than_naive(tiny_pipe, caplog, name):
    """A tolerance below what a float32 model can resolve (~1e-7 relative) cannot be met. One warning line with
    the residual, and a round trip no worse than naive inversion's (the NFE include the check)."""
    from conftest import random_image

    image = random_image(64, 64)
    latent = tiny_pipe.encode_image(image).double()
    schedule = Schedule.from_scheduler(tiny_pipe.scheduler, 5)
    denoise = tiny_pipe.make_denoiser(["a red circle on a white background"], 4.5, schedule, image.size)
    naive = INVERSIONS[name.removesuffix("-exact")](denoise, latent, schedule)
    with caplog.at_level(logging.WARNING, logger="dit4edit.solvers"):
        result = INVERSIONS[name](denoise, latent, schedule, tol=1e-11)
    sampled_by = schedule if name == "dpm-exact" else schedule.first_order()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "residual" in warnings[0].getMessage() and name in warnings[0].getMessage()
    assert result.converged is False and result.nfe >= 3 * schedule.num_steps
    assert round_trip(denoise, result.latent, sampled_by, latent) <= round_trip(denoise, naive.latent, sampled_by,
                                                                                latent)


def test_an_unconverged_inversion_falls_back_to_naive_where_that_is_better(caplog):
    """`checked_or_naive` keeps whichever trajectory samples back closer to the input: a spoiled one gives way to
    naive inversion, an unconverged but good one stays; a converged one is returned untouched and unchecked."""
    schedule = Schedule.from_scheduler(pixart_scheduler(), 10)
    denoise = gaussian_denoiser(schedule, 0.5)
    x = 0.5 * torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = solvers.invert_dpm_exact(denoise, x, schedule, tol=1e-8)
    naive = solvers.invert_dpm(denoise, x, schedule)
    assert exact.converged and solvers.checked_or_naive(exact, denoise, x, schedule, 1e-8, "dpm-exact") is exact
    spoiled = InversionResult([exact.latent + 0.5 * torch.ones_like(x)] + exact.trajectory[1:], [0.3] * 10, 100,
                              converged=False)
    with caplog.at_level(logging.WARNING, logger="dit4edit.solvers"):
        kept = solvers.checked_or_naive(spoiled, denoise, x, schedule, 1e-8, "dpm-exact")
        assert torch.equal(kept.latent, naive.latent) and kept.converged is False and kept.nfe == 100 + 3 * 10
        unconverged = InversionResult(exact.trajectory, exact.residuals, 100, converged=False)
        assert solvers.checked_or_naive(unconverged, denoise, x, schedule, 1e-8, "dpm-exact").latent is exact.latent
    assert len(caplog.records) == 2 and all("using the" in r.getMessage() for r in caplog.records)
    assert "naive one" in caplog.records[0].getMessage() and "exact one" in caplog.records[1].getMessage()


def test_exact_inversion_on_tiny_pixart_with_guidance(tiny_pipe):
    """Both exact methods at least 1000x below their naive counterparts in NMSE (random tiny PixArt, CFG 4.5)."""
    from conftest import random_image

    image = random_image(64, 64)
    latent = tiny_pipe.encode_image(image).double()
    schedule = Schedule.from_scheduler(tiny_pipe.scheduler, 10)
    denoise = tiny_pipe.make_denoiser(["a red circle on a white background"], 4.5, schedule, image.size)
    errors = {}
    for name in ("ddim", "ddim-exact", "dpm", "dpm-exact"):
        result = INVERSIONS[name](denoise, latent, schedule, tol=1e-6)
        errors[name] = nmse(sampler_for(name)(denoise, result.latent, schedule)[-1], latent)
    assert errors["ddim-exact"] * 1000 <= errors["ddim"], errors
    assert errors["dpm-exact"] * 1000 <= errors["dpm"], errors


def test_bad_solver_arguments():
    schedule = Schedule.from_scheduler(pixart_scheduler(), 5)
    with pytest.raises(ValueError, match="tol"):
        solvers.invert_ddim_exact(lambda x, i: x, torch.zeros(1, 4, 2, 2), schedule, tol=0)
    with pytest.raises(ValueError, match="num_steps"):
        Schedule.from_scheduler(pixart_scheduler(), 0)


def test_schedule_tail_starts_mid_schedule_first_order():
    schedule = Schedule.from_scheduler(pixart_scheduler(), 10)
    tail = schedule.tail(4)
    assert tail.num_steps == 6 and tail.orders[0] == 1 and tail.orders[1:] == schedule.orders[5:]
    assert torch.equal(tail.sigmas, schedule.sigmas[4:]) and torch.equal(tail.timesteps, schedule.timesteps[4:])
    with pytest.raises(ValueError):
        schedule.tail(10)


def test_one_registry_of_inversion_methods():
    from dit4edit.cli import build_parser
    from dit4edit.methods import INVERSION_METHODS

    assert list(INVERSIONS) == list(INVERSION_METHODS)
    for name, method in INVERSION_METHODS.items():
        assert sampler_for(name) is solvers.SAMPLERS[method.sampler]
        assert ("exact" in INVERSIONS[name].__name__) == method.exact
    parser = build_parser()
    for name in INVERSION_METHODS:  # the command line offers exactly these
        assert parser.parse_args(["edit", "in.png", "-t", "x", "-o", "o.png", "--inversion", name]).inversion == name
    with pytest.raises(SystemExit):
        parser.parse_args(["edit", "in.png", "-t", "x", "-o", "o.png", "--inversion", "dpm-fast"])


def test_a_swapped_scheduler_is_honoured_or_refused():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from dit4edit.errors import DiT4EditError

    config = pixart_scheduler().config
    karras = Schedule.from_scheduler(DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True), 10)
    plain = Schedule.from_scheduler(pixart_scheduler(), 10)
    assert not torch.equal(karras.timesteps, plain.timesteps)  # its sigmas are used
    for scheduler, message in [
        (DDIMScheduler.from_config(config), "DDIMScheduler"),
        (DPMSolverMultistepScheduler.from_config(config, solver_order=3), "solver_order=3"),
        (DPMSolverMultistepScheduler.from_config(config, prediction_type="v_prediction"), "v_prediction"),
        (DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++"), "sde-dpmsolver"),
    ]:
        with pytest.raises(DiT4EditError, match=message):
            Schedule.from_scheduler(scheduler, 10)


def test_dpm_exact_progress_bar_ends_full(capsys):
    """One bar for warm start and sweeps; converging before max_sweeps still ends at 100%, not "11/40 28%"."""
    schedule = Schedule.from_scheduler(pixart_scheduler(), 10)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solvers.invert_dpm_exact(gaussian_denoiser(schedule, 0.5), x, schedule, tol=1e-8, disable=False)
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "warm start" not in final and final.startswith("exact inversion: 100%"), final
    assert err.count("exact inversion:") >= 1 and "warm start:" in err  # the same bar, renamed


@pytest.mark.parametrize("name", list(INVERSIONS))
def test_reported_nfe_counts_every_denoiser_call(name):
    """On the Gaussian (converges) and under strong guidance at 6 big steps (the exact ones miss 1e-12 and pay
    for the check against naive inversion): `nfe` is the number of calls the denoiser saw."""
    for steps, make in ((10, lambda s: gaussian_denoiser(s, 0.5)), (6, lambda s: guided_denoiser(s, spread=0.3))):
        schedule = Schedule.from_scheduler(pixart_scheduler(), steps)
        denoise, calls = make(schedule), []

        def counted(x, i):
            calls.append(i)
            return denoise(x, i)

        x = 0.5 * torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        result = INVERSIONS[name](counted, x, schedule, tol=1e-12)
        assert result.nfe == len(calls) >= steps
