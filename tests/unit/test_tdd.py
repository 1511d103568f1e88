"""TDD sampling: DPM-Solver++(1) + re-noise against an independent VP reference, x0 clipping, flow spaces."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import DDPMScheduler

from distill_core.methods import TDD_ETA
from distill_core.reference.mixture import GaussianMixture
from distill_core.sampling.schedules import tdd_timesteps
from distill_core.sampling.tdd import dynamic_threshold, sample_tdd
from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod
from tests.unit.diffusion_toys import (
    SHAPE,
    clean_target_model,
    noise_decomposition,
    seeded_noise,
    toy_eps,
    ve_denoiser,
)

ALPHAS_CUMPROD = scaled_linear_alphas_cumprod()


def diffusers_threshold(ratio: float, max_value: float):
    """diffusers' own dynamic thresholding (``_threshold_sample``) with the given settings."""
    scheduler = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    return scheduler._threshold_sample


def reference_tdd(x_vp, timesteps, eta, seed, clip_steps=0, threshold=None):
    """TDD in the VP convention, written from the formulas: every latent after each step.

    x0 = (x - sigma_t eps) / alpha_t (thresholded for the first clip_steps steps); DPM-Solver++(1)
    from t to s = floor((1 - eta) t_next) with lambda = log(alpha / sigma); then
    x = sqrt(a_next / a_s) x + sqrt(1 - a_next / a_s) z; the last step solves to sigma 0 (x0).
    """
    generator = torch.Generator().manual_seed(seed)
    latents, x = [], x_vp
    for i, t in enumerate(timesteps):
        alpha_t, sigma_t = ALPHAS_CUMPROD[t].sqrt(), (1 - ALPHAS_CUMPROD[t]).sqrt()
        x0 = (x - sigma_t * toy_eps(x, t)) / alpha_t
        if i < clip_steps:
            x0 = threshold(x0)
        if i == len(timesteps) - 1:
            x = x0
        else:
            t_next = timesteps[i + 1]
            s = math.floor((1 - eta) * t_next)
            alpha_s, sigma_s = ALPHAS_CUMPROD[s].sqrt(), (1 - ALPHAS_CUMPROD[s]).sqrt()
            h = (alpha_s / sigma_s).log() - (alpha_t / sigma_t).log()
            x = (sigma_s / sigma_t) * x - alpha_s * (torch.exp(-h) - 1) * x0
            if eta > 0:
                ratio = ALPHAS_CUMPROD[t_next] / ALPHAS_CUMPROD[s]
                x = ratio.sqrt() * x + (1 - ratio).sqrt() * torch.randn(SHAPE, generator=generator, dtype=torch.float64)
        latents.append(x)
    return latents


def run_ours(x_vp, timesteps, seed, **options):
    space = NoiseSpace.from_alphas_cumprod(ALPHAS_CUMPROD)
    sigmas = space.sigmas_for_timesteps(timesteps)
    seen = []
    final = sample_tdd(
        ve_denoiser(space), x_vp / ALPHAS_CUMPROD[timesteps[0]].sqrt(), sigmas,
        callback=lambda info: seen.append(info["x"]), disable=True, space=space, noise_sampler=seeded_noise(seed),
        **options,
    )
    return [x / (1 + s**2) ** 0.5 for x, s in zip([*seen[1:], final], sigmas[1:].tolist(), strict=True)]


@pytest.mark.parametrize("steps", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("special_jump", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.2, 0.5])
def test_every_update_equals_dpm_solver_plus_renoise(steps, special_jump, eta):
    timesteps = tdd_timesteps(steps, special_jump)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    expected = reference_tdd(x_vp, timesteps, eta, seed=13)
    ours = run_ours(x_vp, timesteps, seed=13, eta=eta)
    assert len(ours) == steps
    assert max((a - b).abs().max().item() for a, b in zip(ours, expected, strict=True)) < 1e-9


@pytest.mark.parametrize("clip_steps", [1, 2])
@pytest.mark.parametrize("max_value", [1.0, 2.5])
def test_x0_clipping_only_for_the_first_steps(clip_steps, max_value):
    timesteps = tdd_timesteps(4)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    threshold = diffusers_threshold(0.995, max_value)
    expected = reference_tdd(x_vp, timesteps, 0.2, seed=3, clip_steps=clip_steps, threshold=threshold)
    ours = run_ours(x_vp, timesteps, seed=3, eta=0.2, clip_x0_steps=clip_steps, clip_max_value=max_value)
    unclipped = run_ours(x_vp, timesteps, seed=3, eta=0.2)
    assert max((a - b).abs().max().item() for a, b in zip(ours, expected, strict=True)) < 1e-9
    assert (ours[-1] - unclipped[-1]).abs().max() > 1e-3  # the clipping did change the result


@pytest.mark.parametrize("max_value", [1.0, 2.5, float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_threshold_equals_diffusers(max_value, dtype):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype) * 2
    x0[1] *= 0.3  # one sample whose quantile stays below 1 (plain clipping)
    expected = diffusers_threshold(0.9, max_value)(x0)
    ours = dynamic_threshold(x0, 0.9, max_value)
    assert ours.dtype == dtype
    assert torch.equal(ours, expected)


def test_flow_eta_zero_is_euler():
    """On a flow space eta = 0 is the Euler method (how the official FLUX TDD LoRA is sampled)."""
    space = NoiseSpace.flow(3.0)
    means = torch.randn((3, *SHAPE[1:]), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mixture = GaussianMixture(means, 0.3)
    model = lambda x, sigma: mixture.denoise(x, sigma, space)  # noqa: E731
    sigmas = space.sigmas_for_timesteps(tdd_timesteps(8))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = sample_tdd(model, x, sigmas, disable=True, space=space, eta=0.0)
    euler = x
    for sigma, sigma_next in itertools.pairwise(sigmas.tolist()):
        velocity = (euler - model(euler, torch.full((SHAPE[0],), sigma, dtype=torch.float64))) / sigma
        euler = euler + (sigma_next - sigma) * velocity
    assert (ours - euler).abs().max() < 1e-9


def test_flow_renoise_has_the_exact_marginal():
    """Exact x0 on a flow space: x_next - (1 - s) x0 = alpha eps_hat + beta z with alpha^2 + beta^2 = s^2."""
    space = NoiseSpace.flow(3.0)
    sigmas = space.sigmas_for_timesteps(tdd_timesteps(5, special_jump=True))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noises = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(4)]
    draws = iter(noises)
    seen = []
    final = sample_tdd(
        clean_target_model(x0), space.noise(x0, torch.randn(SHAPE, dtype=torch.float64), sigmas[0]), sigmas,
        callback=seen.append, disable=True, space=space, noise_sampler=lambda s, s_next: next(draws), eta=0.2,
    )
    assert torch.equal(final, x0)
    for i, noise in enumerate(noises):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        eps_hat = (seen[i]["x"] - (1 - sigma) * x0) / sigma
        alpha, beta, residual = noise_decomposition(seen[i + 1]["x"], (1 - sigma_next) * x0, eps_hat, noise)
        assert residual < 1e-12
        assert alpha**2 + beta**2 == pytest.approx(sigma_next**2, rel=1e-10)
        assert beta > 0.1 * sigma_next


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eta": -0.1}, "eta must be in"),
        ({"eta": 1.2}, "eta must be in"),
        ({"clip_x0_steps": -1}, "clip_x0_steps must be >= 0"),
        ({"clip_ratio": 1.5}, "clip_ratio must be in"),
        ({"clip_max_value": 0.5}, "clip_max_value must be at least 1"),
    ],
)
def test_invalid_options_are_refused(options, message):
    space = NoiseSpace.flow()
    with pytest.raises(ValueError, match=message):
        sample_tdd(clean_target_model(torch.zeros(SHAPE)), torch.zeros(SHAPE), space.sigmas_for_timesteps([999]),
                   space=space, **{"eta": TDD_ETA, **options})
