"""Rectified flows (SD3, FLUX) as diffusions, and their own Euler sampler.

A flow model's point `x_s = (1 - s) x0 + s eps` is the diffusion point with `alpha = 1 - s`, `sigma = s`; from the
velocity `v = eps - x0` it predicts, the data prediction is `denoised = x - s v` (and `eps = x + (1 - s) v`). So
DPM-Solver++ and its inversions (`dit4edit.solvers`) run on a flow unchanged, on `lambda = log((1 - s) / s)`.

The models' own sampler, diffusers' `FlowMatchEulerDiscreteScheduler`, is Euler on `s`:
`x_{i+1} = x_i + (s_{i+1} - s_i) v_i`. With `v = (x - denoised) / s` this is *exactly* DPM-Solver++'s first-order
step (DDIM) on the same points: both give `x_{i+1} = (1 - s_{i+1}) denoised_i + s_{i+1} eps_i`, so
`dit4edit.solvers.sample_ddim` on a flow schedule is the model's sampler and `invert_ddim_exact` its exact
inversion.
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from ..solvers import Denoiser, Schedule, StepCallback


#: The noisiest point an invertible flow schedule starts from: at `s = 1` (`alpha = 0`, `lambda = -inf`) the
#: diffusion form of a step divides by zero, so inversions stop just short of pure noise.
INVERTIBLE_SIGMA_MAX = 0.999


def flow_schedule(scheduler, num_steps: int, sigmas=None, mu: float | None = None,
                  sigma_max: float = 1.0) -> Schedule:
    """The points diffusers' `FlowMatchEulerDiscreteScheduler` (a copy of `scheduler`'s configuration) visits in
    `num_steps` steps with the given `sigmas` / `mu` (FLUX passes both; SD3 neither, its shift is in the config):
    `alpha = 1 - s`, `sigma = s` over the N + 1 sigmas (the last is 0), model timesteps `s * 1000` as the scheduler
    gives them (SD3 takes them so; FLUX's backbone divides by 1000). Orders are DPM-Solver++(2M)'s with a
    clean end: first and last step first order.

    `sigma_max` below 1 moves a first point above it down to it (its model timestep along): the model's own
    sampler starts at `s = 1`, but DPM-Solver++ in the diffusion form and the inverters of `dit4edit.solvers`
    need `alpha > 0` at every point (`INVERTIBLE_SIGMA_MAX`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # deferred: diffusers loads slowly

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    euler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    kwargs = {} if mu is None else {"mu": mu}
    euler.set_timesteps(num_steps, sigmas=sigmas, **kwargs)
    s = euler.sigmas.to(torch.float64)  # (N + 1,), the last 0
    timesteps = euler.timesteps.clone()
    if s[0] > sigma_max:
        s[0] = sigma_max
        timesteps[0] = sigma_max * euler.config.num_train_timesteps
    orders = tuple(1 if i in (0, num_steps - 1) else 2 for i in range(num_steps))
    return Schedule(timesteps=timesteps, alphas=1.0 - s, sigmas=s, orders=orders)


def velocity(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow velocity `v = (x - denoised) / s` behind a data prediction at a point with `s > 0`."""
    return (x - denoised) / sigma


def sample_euler(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, callback: StepCallback | None = None,
                 disable: bool = True) -> list[torch.Tensor]:
    """Euler on `s` (diffusers' `FlowMatchEulerDiscreteScheduler.step`), as the flow models sample; returns the
    trajectory like `dit4edit.solvers.sample_dpmpp_2m`, whose signature it shares."""
    trajectory = [x]
    s = schedule.sigmas
    for i in trange(schedule.num_steps, disable=disable, desc="denoising"):
        v = velocity(x, denoise(x, i), s[i].item())
        x = x + (s[i + 1] - s[i]).item() * v
        if callback is not None:
            replaced = callback(i, x)
            x = x if replaced is None else replaced
        trajectory.append(x)
    return trajectory
