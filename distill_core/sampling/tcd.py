"""Trajectory Consistency Distillation sampling (diffusers ``TCDScheduler``), used by Hyper-SD.

Strategic stochastic sampling: from ``(x, x0)`` at timestep ``t`` move deterministically (DDIM) to
``s = floor((1 - gamma) t_next)``, then forward-diffuse from ``s`` back up to ``t_next`` with fresh
noise. ``gamma = 0`` is DDIM; ``gamma = 1`` is LCM-like (predict, then fully re-noise).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..spaces import NoiseSpace
from .steps import NoiseSampler, check_unit_interval, run_steps, snapped_timestep


def shrunk_timestep(timestep: float, gamma: float, float32: bool = False) -> int:
    """``floor((1 - gamma) * timestep)``: the intermediate target of TCD / TDD steps.

    ``float32=True`` evaluates the product in float32 like diffusers' ``TCDScheduler`` (a Python float
    times an integer tensor), which floors differently from float64 at some exact products
    (e.g. gamma 0.3, timestep 90 -> 62 instead of 63). TDD's official scheduler uses numpy float64.
    """
    if float32:
        product = torch.tensor(1 - gamma, dtype=torch.float32) * torch.tensor(timestep, dtype=torch.float32)
        return int(torch.floor(product).item())
    return math.floor((1 - gamma) * timestep)


def gamma_step(
    space: NoiseSpace,
    x: Tensor,
    x0: Tensor,
    sigma: float,
    sigma_next: float,
    gamma: float,
    draw_noise: Callable[[], Tensor],
    float32_floor: bool,
) -> Tensor:
    """One TCD / TDD step: DDIM to ``s = floor((1 - gamma) t_next)``, then re-noise to ``sigma_next``.

    ``t_next`` is the training timestep of ``sigma_next`` read from the space's table and ``s``
    is looked up in the same table. ``gamma = 0`` moves straight to ``sigma_next`` (DDIM, also for
    off-grid sigmas); ``sigma_next = 0`` returns ``x0``. Noise is drawn only when ``gamma > 0`` and
    ``sigma_next > 0``, which keeps the random stream aligned with diffusers' schedulers.
    """
    if sigma_next == 0:
        return x0
    if gamma == 0:
        return space.ddim(x, x0, sigma, sigma_next)
    t_next = snapped_timestep(space, float(sigma_next))
    sigma_s = space.scalar_sigma_of(shrunk_timestep(t_next, gamma, float32=float32_floor))
    x_s = space.ddim(x, x0, sigma, sigma_s)
    return space.renoise(x_s, sigma_s, sigma_next, draw_noise())



@torch.no_grad()
def sample_tcd(
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
    gamma: float,
) -> Tensor:
    """TCD sampling over ``sigmas`` (k-diffusion sampler shape); ``gamma`` is diffusers' ``eta``.

    ``gamma`` has no default here: the authors' value is the method registry's
    (:data:`distill_core.methods.TCD_GAMMA`, read by every node and benchmark).

    Step from ``sigma`` to ``sigma_next > 0``: ``t_next`` = table timestep of ``sigma_next``,
    ``s = floor((1 - gamma) t_next)`` (in float32, exactly as diffusers), ``x_s = a_s x0 + b_s eps_hat``
    with ``eps_hat`` implied by ``(x, x0)``, then ``x_next`` = ``x_s`` forward-diffused to
    ``sigma_next`` with noise ``s_noise * z`` (noise is drawn only when ``gamma > 0``). A final
    ``sigma_next = 0`` returns ``x0``. diffusers instead ends at timestep 0 (it keeps
    ``sqrt(1 - alpha_cumprod[0]) eps_hat``); SIGMAS ending ``[..., sigma_of(0)]`` reproduce that exactly.

    Noise: ``noise_sampler(sigma, sigma_next)`` (default seeded from ``extra_args["seed"]``, see
    :func:`~distill_core.sampling.steps.run_steps`).

    Flow models: the same construction in the flow convention, with ``t_next`` and ``s`` read from
    the space's flow timestep table; every step still has the exact marginal
    ``x_next = (1 - sigma_next) x0 + sigma_next * noise`` for a model that predicts x0 exactly.
    """
    check_unit_interval("gamma", gamma)

    def update(
        i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, draw_noise: Callable[[], Tensor]
    ) -> tuple[Tensor, Tensor]:
        return denoised, gamma_step(space, x, denoised, sigma, sigma_next, gamma, draw_noise, float32_floor=True)

    return run_steps(model, x, sigmas, extra_args, callback, disable, update, noise_sampler, s_noise)
