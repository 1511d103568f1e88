"""Deterministic toy models shared by the few-step sampler tests (no weights, float64).

One toy noise predictor ``toy_eps(x_vp, t)`` is seen in two conventions: diffusers schedulers get
it as an epsilon model on variance-preserving latents; Stride samplers get the same function as a
k-diffusion denoiser on VE latents (``x_ve = x_vp / sqrt(alpha_cumprod_t)``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distill_core.spaces import NoiseSpace

SHAPE = (2, 3, 5, 5)


def toy_eps(x_vp: Tensor, timestep: Tensor | int) -> Tensor:
    """A fixed nonlinear function of the VP latent and the (integer) timestep."""
    t = torch.as_tensor(timestep, dtype=x_vp.dtype)
    mixed = 0.8 * x_vp + 0.3 * x_vp.roll(1, dims=-1) - 0.2 * x_vp.flip(1)
    return torch.tanh(mixed) * (0.5 + t / 2000) + 0.2 * torch.sin(x_vp + t / 300)


def ve_denoiser(space: NoiseSpace):
    """``toy_eps`` as a k-diffusion denoiser on the VE latents of ``space`` (integer timesteps)."""

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        s = float(sigma[0])
        t = int(space.timestep_of(s).round())
        eps = toy_eps(x / (1 + s**2) ** 0.5, t)
        return x - s * eps

    return model


def seeded_noise(seed: int, shape=SHAPE):
    """A noise sampler drawing ``torch.randn(shape, float64)`` from its own generator, like diffusers."""
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=generator, dtype=torch.float64)


def clean_target_model(x0: Tensor):
    """A denoiser that always returns the true clean sample ``x0`` (exact model of a known point)."""
    return lambda x, sigma: x0.clone()


def noise_decomposition(x_next: Tensor, clean: Tensor, eps_hat: Tensor, z: Tensor) -> tuple[float, float, float]:
    """Fit ``x_next - clean = alpha * eps_hat + beta * z`` by least squares; return alpha, beta, max residual."""
    basis = torch.stack([eps_hat.flatten(), z.flatten()], dim=1)
    target = (x_next - clean).flatten()
    coef = torch.linalg.lstsq(basis, target.unsqueeze(1)).solution.flatten()
    residual = (basis @ coef - target).abs().max().item()
    return coef[0].item(), coef[1].item(), residual
