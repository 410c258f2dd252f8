"""Rectified flows as diffusions: the flow schedule, Euler on s (the models' sampler) = first-order DPM-Solver++,
and DPM-Solver++(2M) with its exact inversion from `dit4edit.solvers` on a flow backbone's data prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import relative_error


def tiny_backbone(family):
    from dit4edit.backbones import backbone_for
    from dit4edit.backbones.tiny import tiny_pipeline

    torch.set_num_threads(1)
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    return backbone_for(pipe, max_sequence_length=32)  # a short T5 sequence: the tests need no long prompts


def test_flow_schedule_is_the_schedulers_points():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dit4edit.backbones.flow import flow_schedule

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = flow_schedule(sd3, 6)
    sd3.set_timesteps(6)
    assert torch.equal(schedule.sigmas, sd3.sigmas.double()) and torch.equal(schedule.timesteps, sd3.timesteps)
    assert torch.equal(schedule.alphas + schedule.sigmas, torch.ones(7, dtype=torch.float64))
    assert schedule.orders == (1, 2, 2, 2, 2, 1)
    assert schedule.sigmas[1] > 5 / 6  # the shift keeps SD3 noisier than a linear grid
    # FLUX: explicit sigmas and a resolution-dependent shift mu.
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sigmas = np.linspace(1.0, 1 / 4, 4)
    low, high = flow_schedule(flux, 4, sigmas=sigmas, mu=0.5), flow_schedule(flux, 4, sigmas=sigmas, mu=1.15)
    assert (high.sigmas[1:-1] > low.sigmas[1:-1]).all()  # more tokens, noisier
    # An invertible schedule starts just short of pure noise, its model timestep along.
    clipped = flow_schedule(sd3, 6, sigma_max=0.999)
    assert clipped.sigmas[0] == 0.999 and clipped.timesteps[0] == pytest.approx(999.0)
    assert torch.equal(clipped.sigmas[1:], schedule.sigmas[1:])


def test_euler_on_s_is_first_order_dpm_solver_and_diffusers_step():
    """Euler on s equals DDIM (first-order DPM-Solver++) on alpha = 1 - s, sigma = s, and diffusers' scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dit4edit.backbones.flow import flow_schedule, sample_euler, velocity
    from dit4edit.solvers import sample_ddim
    from dit4edit.tiny import gaussian_denoiser

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = flow_schedule(scheduler, 7)
    denoise = gaussian_denoiser(schedule, c=0.5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    euler = sample_euler(denoise, x, schedule)
    assert relative_error(sample_ddim(denoise, x, schedule)[-1], euler[-1]) < 1e-12
    scheduler.set_timesteps(7)
    latents = x.float()
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(latents.double(), denoise(latents.double(), i), schedule.sigmas[i].item()).float()
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    assert relative_error(latents, euler[-1]) < 1e-6


def test_dpm_solver_on_a_flow_converges_at_second_order():
    """For Gaussian data x0 ~ N(0, c^2) the probability-flow ODE maps x at point 0 to
    x * std(N) / std(0), std(i) = sqrt(a_i^2 c^2 + s_i^2), exactly. On SD3's shifted grid, doubling the steps
    cuts Euler's error by ~2 (first order) and DPM-Solver++(2M)'s by ~4 (second order)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dit4edit.backbones.flow import flow_schedule, sample_euler
    from dit4edit.solvers import sample_dpmpp_2m
    from dit4edit.tiny import gaussian_denoiser

    c = 1.0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = {}
    for steps in (20, 40):
        schedule = flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), steps, sigma_max=0.999)
        std = (schedule.alphas**2 * c**2 + schedule.sigmas**2).sqrt()
        exact = x * (std[-1] / std[0]).item()
        denoise = gaussian_denoiser(schedule, c)
        errors[steps] = [relative_error(sampler(denoise, x, schedule)[-1], exact)
                         for sampler in (sample_euler, sample_dpmpp_2m)]
    euler_gain, dpm_gain = errors[20][0] / errors[40][0], errors[20][1] / errors[40][1]
    assert 1.6 < euler_gain < 2.5, errors
    assert dpm_gain > 3.2, errors
    assert errors[40][1] < errors[40][0]


@pytest.mark.parametrize("family,guidance", [("sd3", 4.0), ("flux", 3.5)])
def test_exact_inversion_regenerates_its_input(family, guidance):
    """DPM-Solver++(2M) from `dit4edit.solvers` sampling on a flow backbone's data prediction and flow schedule
    (SD3 with classifier-free guidance, FLUX-dev with its guidance input); its exact inversion (and exact DDIM =
    Euler's) regenerates the input latent, where the naive inversion drifts."""
    from dit4edit.backbones.flow import INVERTIBLE_SIGMA_MAX
    from dit4edit.solvers import invert_ddim_exact, invert_dpm, invert_dpm_exact, sample_ddim, sample_dpmpp_2m

    backbone = tiny_backbone(family)
    schedule = backbone.schedule(8, (16, 16), sigma_max=INVERTIBLE_SIGMA_MAX)
    denoise = backbone.denoiser(["a red circle on a white background"], schedule, guidance_scale=guidance)
    channels = backbone.latent_channels
    image = torch.randn(1, channels, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    naive = invert_dpm(denoise, image, schedule)
    naive_error = relative_error(sample_dpmpp_2m(denoise, naive.latent, schedule)[-1], image)
    assert naive_error > 1e-2
    exact = invert_dpm_exact(denoise, image, schedule)
    assert relative_error(sample_dpmpp_2m(denoise, exact.latent, schedule)[-1], image) < 1e-4
    euler = invert_ddim_exact(denoise, image, schedule)
    assert relative_error(sample_ddim(denoise, euler.latent, schedule)[-1], image) < 1e-4
    assert relative_error(exact.latent, image) > 0.5  # the inverted latent is noise, not the input
