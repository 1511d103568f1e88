"""The probability-flow ODE solved accurately (the exact flow map of an analytic denoiser)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..spaces import NoiseSpace, sigma_batch


def solve_probability_flow(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigma: Tensor | float,
    space: NoiseSpace,
    steps: int = 200,
    final_noise_ratio: float = 2.5e-4,
    initial_noise_ratio: float = 1e3,
    sigma_end: Tensor | float = 0.0,
) -> Tensor:
    """Solve the probability-flow ODE from ``(x, sigma)`` down to sigma = 0 with a third-order
    multistep exponential integrator (DPM-Solver++ 3M without noise); with ``sigma_end > 0`` (below
    ``sigma``; a scalar or one per sample) solve only down to ``sigma_end`` and return the latent there.

    ``denoise(x, sigma_batch)`` takes float64 ``x`` and a ``(n,)`` sigma and returns ``E[x0 | x]``.
    With ``lam = log(a / b)`` the ODE is exactly ``d(x / b) / d(e^lam) = denoise``, so a step from
    ``lam_s`` to ``lam_t = lam_s + h`` is ``x_t = (b_t / b_s) x_s + a_t * integral`` of the denoiser
    weighted by ``e^(lam - lam_t)``; the denoiser is expanded to second order in ``lam`` around
    ``lam_s`` using the two previous evaluations (the first step spends one extra evaluation half
    way, so every step is at least second order). Steps are uniform in ``lam`` from the start to
    the noise ratio ``b / a = final_noise_ratio``, followed by one final denoising jump to
    sigma = 0. A start noisier than ``b / a = initial_noise_ratio`` (e.g. flow sigma = 1, where
    ``a = 0``) first takes one first-order step onto the grid (the denoiser is nearly constant
    there). Uses ``steps + 2`` denoiser calls; per-sample sigmas are allowed, samples already below
    the final ratio are just denoised.
    """
    n = x.shape[0]
    shape = x.shape
    x = x.to(torch.float64).reshape(n, -1)
    a0, b0 = space.coefficients(sigma_batch(sigma, n, x.device))
    lam0 = a0.log() - b0.log()
    stop_early = bool((torch.as_tensor(sigma_end) > 0).any())
    if stop_early:
        a_end, b_end = space.coefficients(sigma_batch(sigma_end, n, x.device))
        lam_end = (a_end.log() - b_end.log()).maximum(lam0)
    else:
        lam_end = torch.full_like(lam0, -math.log(final_noise_ratio)).maximum(lam0)
    lam_first = lam0.clamp(min=-math.log(initial_noise_ratio)).minimum(lam_end)
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=x.device).reshape(-1, 1)
    span = torch.where(lam_end > lam_first, lam_end - lam_first, torch.zeros_like(lam_first))
    grid = lam_first + span * fractions
    grid[0] = lam0
    sigmas = space.sigma_at_half_log_snr(grid)
    sigmas[0] = sigma_batch(sigma, n, x.device)
    if stop_early:
        sigmas[-1] = torch.where(lam_end > lam0, sigma_batch(sigma_end, n, x.device), sigmas[0])
    a_grid, b_grid = space.coefficients(sigmas)

    def evaluate(x_flat: Tensor, sigma_batch: Tensor) -> Tensor:
        return denoise(x_flat.reshape(shape), sigma_batch).reshape(n, -1)

    def usable(step: Tensor) -> Tensor:
        return torch.isfinite(step) & (step > 0)

    def safe(step: Tensor) -> Tensor:
        return torch.where(usable(step), step, torch.ones_like(step))

    def column(t: Tensor) -> Tensor:
        return t.unsqueeze(1)

    history: list[tuple[Tensor, Tensor]] = []  # (lam, denoised) of the last two evaluations before this step
    for i in range(steps):
        lam = grid[i]
        denoised = evaluate(x, sigmas[i])
        h = grid[i + 1] - lam
        h = torch.where(h.isnan(), torch.zeros_like(h), h)  # inf - inf: a sample already at sigma = 0
        h_safe = safe(h)
        zeros = torch.zeros_like(denoised)
        slope, half_curvature = zeros, zeros  # d denoised / d lam and half its second derivative at lam
        if i == 0 and usable(h).any():
            half_h = torch.where(usable(h), h / 2, torch.zeros_like(h))
            a_mid, b_mid = space.coefficients(space.sigma_at_half_log_snr(lam + half_h))
            x_mid = column(b_mid / b_grid[0]) * x + column(-a_mid * torch.expm1(-half_h)) * denoised
            x_mid = torch.where(column(usable(h)), x_mid, x)
            denoised_mid = evaluate(x_mid, space.sigma_at_half_log_snr(lam + half_h))
            slope = torch.where(column(usable(h)), (denoised_mid - denoised) / column(safe(half_h)), zeros)
            lam_next_history = [(lam, denoised), (lam + half_h, denoised_mid)]
        elif history:
            (lam_2, denoised_2), (lam_1, denoised_1) = history
            h1, h2 = lam - lam_1, lam_1 - lam_2
            backward = (denoised - denoised_1) / column(safe(h1))
            second = column(usable(h) & usable(h1))
            third = second & column(usable(h2))
            older = (denoised_1 - denoised_2) / column(safe(h2))
            curvature_estimate = (backward - older) / column(safe(h1) + safe(h2))
            slope = torch.where(third, backward + curvature_estimate * column(safe(h1)),
                                torch.where(second, backward, zeros))
            half_curvature = torch.where(third, curvature_estimate, zeros)
            lam_next_history = [(lam_1, denoised_1), (lam, denoised)]
        else:
            lam_next_history = [(lam, denoised), (lam, denoised)]
        weight_1 = h_safe + torch.expm1(-h_safe)  # integral of (lam' - lam) e^(lam' - lam_t) over the step
        weight_2 = h_safe**2 / 2 - weight_1  # integral of (lam' - lam)^2 / 2 e^(lam' - lam_t)
        update = column(-torch.expm1(-h)) * denoised + column(weight_1) * slope + column(2 * weight_2) * half_curvature
        ratio = torch.where(h > 0, b_grid[i + 1] / b_grid[i], torch.ones_like(h))
        x = column(ratio) * x + column(a_grid[i + 1]) * update
        history = lam_next_history
    if stop_early:
        return x.reshape(shape)
    return denoise(x.reshape(shape), sigmas[-1])
