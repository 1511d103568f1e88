"""Trajectory Consistency Distillation sampling (diffusers ``TCDScheduler``), used by Hyper-SD.

Strategic stochastic sampling: from ``(x, x0)`` at timestep ``t`` move deterministically (DDIM) to
``s = floor((1 - gamma) t_next)``, then forward-diffuse from ``s`` back up to ``t_next`` with fresh
noise. ``gamma = 0`` is DDIM; ``gamma = 1`` is LCM-like (predict, then fully re-noise).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .sampling_utils import NoiseSampler, check_unit_interval, gamma_step, run_steps
from .spaces import NoiseSpace


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
    gamma: float = 0.3,
) -> Tensor:
    """TCD sampling over ``sigmas`` (k-diffusion sampler shape); ``gamma`` is diffusers' ``eta``.

    Step from ``sigma`` to ``sigma_next > 0``: ``t_next`` = table timestep of ``sigma_next``,
    ``s = floor((1 - gamma) t_next)`` (in float32, exactly as diffusers), ``x_s = a_s x0 + b_s eps_hat``
    with ``eps_hat`` implied by ``(x, x0)``, then ``x_next`` = ``x_s`` forward-diffused to
    ``sigma_next`` with noise ``s_noise * z`` (noise is drawn only when ``gamma > 0``). A final
    ``sigma_next = 0`` returns ``x0``. diffusers instead ends at timestep 0 (it keeps
    ``sqrt(1 - alpha_cumprod[0]) eps_hat``); SIGMAS ending ``[..., sigma_of(0)]`` reproduce that exactly.

    Noise: ``noise_sampler(sigma, sigma_next)`` (default seeded from ``extra_args["seed"]``, see
    :func:`~distill_core.sampling_utils.run_steps`).

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
