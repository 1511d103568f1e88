"""TCD sampling: step-by-step agreement with diffusers' TCDScheduler, its gamma limits, flow spaces."""
from __future__ import annotations

import pytest
import torch
from diffusers import TCDScheduler

from distill_core.reference.mixture import GaussianMixture
from distill_core.sampling.lcm import sample_lcm
from distill_core.sampling.schedules import tcd_timesteps
from distill_core.sampling.tcd import sample_tcd
from distill_core.spaces import NoiseSpace
from tests.unit.diffusion_toys import (
    SHAPE,
    clean_target_model,
    noise_decomposition,
    seeded_noise,
    toy_eps,
    ve_denoiser,
)

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def diffusers_tcd() -> TCDScheduler:
    """SD's TCDScheduler (epsilon, no clipping/thresholding) with its alpha table promoted to float64."""
    scheduler = TCDScheduler(**SD_BETAS, prediction_type="epsilon", clip_sample=False, thresholding=False)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    return scheduler


def run_diffusers(scheduler: TCDScheduler, x_vp: torch.Tensor, gamma: float, seed: int):
    """Every prev_sample and the final x0 prediction of diffusers' TCD loop on the toy eps model."""
    generator = torch.Generator().manual_seed(seed)
    samples, latent = [], x_vp
    for t in scheduler.timesteps.tolist():
        eps = toy_eps(latent, t)
        a_t = scheduler.alphas_cumprod[t]
        x0 = (latent - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        latent = scheduler.step(eps, t, latent, eta=gamma, generator=generator).prev_sample
        samples.append(latent)
    return samples, x0


def run_ours(space: NoiseSpace, x_vp: torch.Tensor, sigmas: torch.Tensor, gamma: float, seed: int):
    """Every latent after each of our steps, in the VP scaling of that step's sigma."""
    seen = []
    final = sample_tcd(
        ve_denoiser(space), x_vp * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas,
        callback=lambda info: seen.append(info["x"]), disable=True, space=space, noise_sampler=seeded_noise(seed),
        gamma=gamma,
    )
    return [x / (1 + s**2) ** 0.5 for x, s in zip([*seen[1:], final], sigmas[1:].tolist(), strict=True)]


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
def test_every_latent_matches_diffusers(steps, gamma):
    scheduler = diffusers_tcd()
    scheduler.set_timesteps(steps)
    space = NoiseSpace.from_alphas_cumprod(scheduler.alphas_cumprod)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == tcd_timesteps(steps)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    expected, final_x0 = run_diffusers(scheduler, x_vp, gamma, seed=21)

    # diffusers ends at timestep 0 (a little implied noise stays): SIGMAS ending at sigma(0) reproduce it
    to_timestep_zero = space.sigmas_for_timesteps([*timesteps, 0], append_zero=False)
    ours = run_ours(space, x_vp, to_timestep_zero, gamma, seed=21)
    assert len(ours) == steps
    assert max((a - b).abs().max().item() for a, b in zip(ours, expected, strict=True)) < 1e-9

    # ComfyUI's usual final sigma 0: same trajectory, and the last step returns the x0 prediction
    ours_to_zero = run_ours(space, x_vp, space.sigmas_for_timesteps(timesteps), gamma, seed=21)
    for a, b in zip(ours_to_zero[:-1], expected[:-1], strict=True):
        assert (a - b).abs().max() < 1e-9
    assert (ours_to_zero[-1] - final_x0).abs().max() < 1e-9


def test_intermediate_timestep_floors_in_float32_like_diffusers():
    """gamma 0.3 at t_next = 90: diffusers' float32 product floors to 62 (float64 would give 63)."""
    scheduler = diffusers_tcd()
    scheduler.set_timesteps(timesteps=[999, 90])
    space = NoiseSpace.from_alphas_cumprod(scheduler.alphas_cumprod)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, _ = run_diffusers(scheduler, x_vp, 0.3, seed=4)
    ours = run_ours(space, x_vp, space.sigmas_for_timesteps([999, 90, 0], append_zero=False), 0.3, seed=4)
    assert (ours[0] - expected[0]).abs().max() < 1e-9


def _models(space: NoiseSpace):
    means = torch.randn((3, *SHAPE[1:]), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mixture = GaussianMixture(means, 0.3)
    return {"toy": ve_denoiser(space), "teacher": lambda x, sigma: mixture.denoise(x, sigma, space)}


@pytest.mark.parametrize("model_name", ["toy", "teacher"])
def test_gamma_zero_is_ddim(model_name):
    alphas_cumprod = diffusers_tcd().alphas_cumprod
    space = NoiseSpace.from_alphas_cumprod(alphas_cumprod)
    model = _models(space)[model_name]
    timesteps = tcd_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigmas = space.sigmas_for_timesteps(timesteps)
    ours = sample_tcd(model, x * float(sigmas[0]), sigmas, disable=True, space=space, gamma=0.0)

    # plain deterministic DDIM in the VP convention, ending at alpha_cumprod = 1
    latent_vp = x * float(sigmas[0]) / (1 + float(sigmas[0]) ** 2) ** 0.5
    for t, t_next in zip(timesteps, [*timesteps[1:], None], strict=True):
        a_t = alphas_cumprod[t]
        sigma = ((1 - a_t) / a_t).sqrt()
        x0 = model(latent_vp / a_t.sqrt(), sigma.reshape(1).expand(SHAPE[0]))
        eps = (latent_vp - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        a_next = alphas_cumprod.new_tensor(1.0) if t_next is None else alphas_cumprod[t_next]
        latent_vp = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    assert (ours - latent_vp).abs().max() < 1e-9


@pytest.mark.parametrize("model_name", ["toy", "teacher"])
def test_gamma_one_is_lcm(model_name):
    """gamma = 1 targets timestep 0 and re-noises fully: LCM, once timestep 0 is clean.

    On SD's table timestep 0 keeps sigma 0.029 of the implied noise (diffusers' choice), so the
    identity is checked on a table whose timestep 0 is practically noise-free.
    """
    table = NoiseSpace.from_alphas_cumprod(diffusers_tcd().alphas_cumprod).sigma_table.clone()
    table[0] = 1e-12
    space = NoiseSpace("ve", table)
    model = _models(space)[model_name]
    sigmas = space.sigmas_for_timesteps(tcd_timesteps(4))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * float(sigmas[0])
    tcd, lcm = [], []
    sample_tcd(model, x, sigmas, callback=tcd.append, disable=True, space=space, noise_sampler=seeded_noise(9),
               gamma=1.0)
    sample_lcm(model, x, sigmas, callback=lcm.append, disable=True, space=space, noise_sampler=seeded_noise(9),
               boundary=False)
    for a, b in zip(tcd, lcm, strict=True):
        assert (a["x"] - b["x"]).abs().max() < 1e-9
        assert (a["denoised"] - b["denoised"]).abs().max() < 1e-9


@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.0])
def test_flow_renoise_has_the_exact_marginal(gamma):
    """Exact x0 on a flow space: x_next - (1 - s) x0 = alpha eps_hat + beta z with alpha^2 + beta^2 = s^2."""
    space = NoiseSpace.flow(3.0)
    sigmas = space.sigmas_for_timesteps(tcd_timesteps(4))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noises = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(3)]
    draws = iter(noises)
    seen = []
    final = sample_tcd(
        clean_target_model(x0), space.noise(x0, torch.randn(SHAPE, dtype=torch.float64), sigmas[0]), sigmas,
        callback=seen.append, disable=True, space=space, noise_sampler=lambda s, s_next: next(draws), gamma=gamma,
    )
    assert torch.equal(final, x0)
    latents = [info["x"] for info in seen]
    for i, noise in enumerate(noises):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        eps_hat = (latents[i] - (1 - sigma) * x0) / sigma
        alpha, beta, residual = noise_decomposition(latents[i + 1], (1 - sigma_next) * x0, eps_hat, noise)
        assert residual < 1e-12
        assert alpha**2 + beta**2 == pytest.approx(sigma_next**2, rel=1e-10)
        assert beta > 0.1 * sigma_next  # fresh noise really enters


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_gamma_outside_unit_interval_is_refused(gamma):
    space = NoiseSpace.flow()
    with pytest.raises(ValueError, match="gamma must be in"):
        sample_tcd(clean_target_model(torch.zeros(SHAPE)), torch.zeros(SHAPE), space.sigmas_for_timesteps([999]),
                   space=space, gamma=gamma)
