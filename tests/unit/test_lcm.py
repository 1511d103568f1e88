"""LCM sampling: step-by-step agreement with diffusers' LCMScheduler, boundary condition, flow spaces."""
from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from distill_core.sampling.lcm import lcm_boundary_denoised, lcm_boundary_scalings, sample_lcm
from distill_core.sampling.schedules import lcm_timesteps
from distill_core.spaces import NoiseSpace
from tests.unit.diffusion_toys import SHAPE, clean_target_model, seeded_noise, toy_eps, ve_denoiser

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def diffusers_lcm(steps: int) -> LCMScheduler:
    """SD's LCMScheduler (epsilon, no clipping/thresholding) with its alpha table promoted to float64."""
    scheduler = LCMScheduler(**SD_BETAS, prediction_type="epsilon", clip_sample=False, thresholding=False)
    scheduler.set_timesteps(steps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    return scheduler


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_every_latent_matches_diffusers(steps):
    scheduler = diffusers_lcm(steps)
    alphas_cumprod = scheduler.alphas_cumprod
    space = NoiseSpace.from_alphas_cumprod(alphas_cumprod)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == lcm_timesteps(steps)

    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    generator = torch.Generator().manual_seed(11)
    expected, latent = [], x_vp
    for t in timesteps:  # an int timestep keeps diffusers' boundary scalings in float64
        latent = scheduler.step(toy_eps(latent, t), t, latent, generator=generator).prev_sample
        expected.append(latent)

    sigmas = space.sigmas_for_timesteps(timesteps)
    seen = []
    final = sample_lcm(
        ve_denoiser(space), x_vp / alphas_cumprod[timesteps[0]].sqrt(), sigmas,
        callback=lambda info: seen.append(info["x"]), disable=True, space=space, noise_sampler=seeded_noise(11),
    )
    ours = [*seen[1:], final]
    assert len(ours) == steps
    for latent_ve, sigma, reference in zip(ours, sigmas[1:].tolist(), expected, strict=True):
        latent_vp = latent_ve / (1 + sigma**2) ** 0.5
        assert (latent_vp - reference).abs().max() < 1e-9


def test_boundary_scalings_equal_diffusers():
    scheduler = diffusers_lcm(4)
    for t in [0, 1, 19, 259, 999]:
        c_skip, c_out = lcm_boundary_scalings(t)
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_skip) == pytest.approx(ref_skip, rel=1e-12)
        assert float(c_out) == pytest.approx(ref_out, rel=1e-12)
    assert float(lcm_boundary_scalings(0)[0]) == 1.0  # at t = 0 the output is the input


def test_boundary_in_variance_preserving_scale_per_sample():
    """c_skip multiplies x / sqrt(a^2 + b^2) (the VP latent), also per batch element and on flow."""
    x = torch.randn(SHAPE, dtype=torch.float64)
    x0 = torch.randn(SHAPE, dtype=torch.float64)
    sd_space = NoiseSpace.from_alphas_cumprod(LCMScheduler(**SD_BETAS).alphas_cumprod.double())
    for space in (sd_space, NoiseSpace.flow(3.0)):
        sigmas = space.sigma_of(torch.tensor([2.0, 7.0], dtype=torch.float64))
        batched = lcm_boundary_denoised(space, x, x0, sigmas)
        for i, sigma in enumerate(sigmas.tolist()):
            c_skip, c_out = lcm_boundary_scalings(float(space.timestep_of(sigma).round()))
            a, b = space.coefficients(sigma)
            expected = c_out * x0[i] + c_skip * x[i] / (a**2 + b**2).sqrt()
            assert (batched[i] - expected).abs().max() < 1e-12
            assert (lcm_boundary_denoised(space, x[i:i + 1], x0[i:i + 1], sigma)[0] - expected).abs().max() < 1e-12
        assert (batched - x0).abs().max() > 1e-3  # c_skip is not negligible at t = 2 and 7


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_steps_renoise_the_true_x0_exactly(shift):
    """With an exact model on a flow space every latent is (1 - s) x0 + s z with the step's fresh noise z."""
    space = NoiseSpace.flow(shift)
    sigmas = space.sigmas_for_timesteps(lcm_timesteps(4))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noises = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(3)]
    draws = iter(noises)
    seen = []
    final = sample_lcm(
        clean_target_model(x0), space.noise(x0, torch.randn(SHAPE, dtype=torch.float64), sigmas[0]), sigmas,
        callback=lambda info: seen.append(info), disable=True, space=space,
        noise_sampler=lambda s, s_next: next(draws), boundary=False,
    )
    assert torch.equal(final, x0)
    for info, sigma, noise in zip(seen[1:], sigmas[1:-1].tolist(), noises, strict=True):
        assert (info["x"] - ((1 - sigma) * x0 + sigma * noise)).abs().max() < 1e-14
    assert all(torch.equal(info["denoised"], x0) for info in seen)


def test_callback_seed_and_s_noise():
    space = NoiseSpace.from_alphas_cumprod(LCMScheduler(**SD_BETAS).alphas_cumprod.double())
    sigmas = space.sigmas_for_timesteps(lcm_timesteps(4))
    model = ve_denoiser(space)
    x = torch.randn(SHAPE, dtype=torch.float64) * float(sigmas[0])

    def with_seed(model):
        return lambda x, sigma, seed: model(x, sigma)

    calls = []
    first = sample_lcm(with_seed(model), x, sigmas, {"seed": 5}, callback=calls.append, disable=True, space=space)
    again = sample_lcm(with_seed(model), x, sigmas, {"seed": 5}, disable=True, space=space)
    other = sample_lcm(with_seed(model), x, sigmas, {"seed": 6}, disable=True, space=space)
    assert [c["i"] for c in calls] == [0, 1, 2, 3]
    assert torch.equal(first, again) and not torch.allclose(first, other)
    # s_noise = 0 keeps no fresh noise: every step re-noises with zeros
    quiet = []
    sample_lcm(model, x, sigmas, callback=quiet.append, disable=True, space=space, s_noise=0.0)
    assert torch.equal(quiet[1]["x"], quiet[0]["denoised"])
