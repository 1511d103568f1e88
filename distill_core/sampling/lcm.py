"""Latent Consistency Model sampling (multistep consistency sampling, diffusers ``LCMScheduler``).

Each step takes the model's ``x0``, optionally applies LCM's boundary condition, and re-noises the
result to the next sigma with fresh noise (none when the next sigma is 0).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, overload

import torch
from torch import Tensor

from ..spaces import NoiseSpace, per_sample
from .steps import NoiseSampler, run_steps, snapped_timestep

LCM_SIGMA_DATA = 0.5


@overload
def lcm_boundary_scalings(timestep: float, timestep_scaling: float = 10.0) -> tuple[float, float]: ...
@overload
def lcm_boundary_scalings(timestep: Tensor, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]: ...
def lcm_boundary_scalings(timestep: Tensor | float,
                          timestep_scaling: float = 10.0) -> tuple[Tensor | float, Tensor | float]:
    """``(c_skip, c_out)`` of LCM's boundary condition at training timestep(s) ``timestep``.

    With ``u = timestep_scaling * t``: ``c_skip = 0.25 / (u^2 + 0.25)``, ``c_out = u / sqrt(u^2 + 0.25)``
    (sigma_data 0.5). ``c_skip`` is below 1e-6 for t >= 50, so it only matters near the data end.
    A Python number gives floats, a tensor float64 tensors.
    """
    scaled = (float(timestep) if isinstance(timestep, (int, float)) else torch.as_tensor(timestep, dtype=torch.float64))
    scaled = scaled * timestep_scaling
    denominator = scaled**2 + LCM_SIGMA_DATA**2
    return LCM_SIGMA_DATA**2 / denominator, scaled / denominator**0.5


def unit_noise_input_scale(space: NoiseSpace, sigma: float) -> float:
    """``sqrt(1 + sigma^2) / sigma``: turns the host's starting latent ``sigma z`` into ``sqrt(1 + sigma^2) z``,
    the VE latent whose network input ``x / sqrt(1 + sigma^2)`` is the unit noise ``z`` itself.

    diffusers starts every LCMScheduler pipeline from unit noise (``init_noise_sigma = 1``) whatever the
    first timestep; ComfyUI scales the starting noise by ``sigma_0`` (by ``sqrt(1 + sigma_0^2)`` only at the
    model's ``sigma_max``). For a one-step generator conditioned on a low timestep (DMD2: 399) the two
    differ by the factor ``sqrt(1 - alpha_cumprod)`` (0.758 at 399). Defined for VE spaces only.
    """
    if space.kind != "ve":
        raise ValueError("a unit-noise network input is defined for VE (EPS / V / X0) models only")
    if sigma <= 0:
        raise ValueError(f"the first sigma must be positive, got {sigma}")
    return math.sqrt(1 + sigma**2) / sigma


def lcm_boundary_denoised(
    space: NoiseSpace, x: Tensor, x0: Tensor, sigma: Tensor | float, timestep_scaling: float = 10.0
) -> Tensor:
    """``c_out x0 + c_skip x_vp``: the boundary-conditioned consistency output.

    As in diffusers, ``c_skip`` multiplies the variance-preserving latent ``x_vp = x / sqrt(a^2 + b^2)``
    (``x = a x0 + b eps``), whatever the space's own scaling, and the timestep is the space's
    table timestep of ``sigma``. ``sigma`` may be a scalar or one value per batch element.
    """
    if isinstance(sigma, float):  # one sigma for the whole batch: the samplers' per-step path, no tensors
        c_skip, c_out = lcm_boundary_scalings(snapped_timestep(space, sigma), timestep_scaling)
        a, b = space.scalar_coefficients(sigma)
        return torch.add(x0 * c_out, x, alpha=c_skip / math.sqrt(a**2 + b**2))
    sigma = torch.as_tensor(sigma).detach().to("cpu", torch.float64)
    c_skips, c_outs = lcm_boundary_scalings(snapped_timestep(space, sigma), timestep_scaling)
    a_batch, b_batch = space.coefficients(sigma)
    skip_on_x = c_skips / (a_batch**2 + b_batch**2).sqrt()
    return x0 * per_sample(c_outs, x0) + x * per_sample(skip_on_x, x)


@torch.no_grad()
def sample_lcm(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    space: NoiseSpace,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
    boundary: bool = True,
    timestep_scaling: float = 10.0,
    unit_noise_input: bool = False,
) -> Tensor:
    """LCM multistep sampling over ``sigmas`` (k-diffusion sampler shape).

    Step: ``x0 = model(x, sigma)``; with ``boundary`` it becomes ``c_out x0 + c_skip x_vp``
    (:func:`lcm_boundary_denoised`); then ``x_next = a(sigma_next) x0 + b(sigma_next) s_noise z``
    with fresh noise ``z`` from ``noise_sampler`` (default: see :func:`run_steps`, seeded from
    ``extra_args["seed"]``), or ``x0`` when ``sigma_next == 0``. On timestep-table sigmas with a final 0 this
    equals diffusers' ``LCMScheduler`` step for step (in the VE scaling ``x_vp / sqrt(alpha_cumprod)``).

    Flow models: the same "predict x0, re-noise to the next sigma" update in the flow convention,
    ``x_next = (1 - sigma_next) x0 + sigma_next z``; the boundary condition uses the flow table's
    timestep of sigma (negligible above t ~ 50). Models whose ComfyUI model sampling already applies
    the boundary (the built-in "lcm" sampling) should use ``boundary=False``.

    ``unit_noise_input``: the starting latent ``x = sigma_0 z`` (an empty latent noised by the host) is
    rescaled by :func:`unit_noise_input_scale`, so the network's first input is the unit noise ``z``, as
    DMD2's 1-step generator was trained (pure noise at timestep 399). Only for a pure-noise start.
    """
    if unit_noise_input:
        x = x * unit_noise_input_scale(space, float(sigmas[0]))

    def update(
        i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, draw_noise: Callable[[], Tensor]
    ) -> tuple[Tensor, Tensor]:
        x0 = lcm_boundary_denoised(space, x, denoised, sigma, timestep_scaling) if boundary else denoised
        if sigma_next == 0:
            return x0, x0
        return x0, space.noise(x0, draw_noise(), sigma_next)

    return run_steps(model, x, sigmas, extra_args, callback, disable, update, noise_sampler, s_noise)
