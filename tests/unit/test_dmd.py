"""DMD2 pieces against direct computations in the official code's own form (tianweiy/DMD2 @ 8d8fa55)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill_core.training.cli import DemoEpsNet
from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod
from distill_core.training.dmd import (
    backward_simulation,
    check_generator_timesteps,
    classifier_head,
    distribution_matching_gradient,
    distribution_matching_loss,
    dm_timestep_range,
    fake_score_loss,
    gan_classifier_loss,
    gan_generator_loss,
    generator_input,
    generator_timesteps,
    sample_dm_timesteps,
)

ALPHAS = scaled_linear_alphas_cumprod()
VE = NoiseSpace.from_alphas_cumprod(ALPHAS)
FLOW = NoiseSpace.flow(3.0)


def tiny_eps_net() -> DemoEpsNet:
    torch.manual_seed(0)
    return DemoEpsNet(channels=4, hidden=8, cond_dim=8).double()


def vp_x0_from_eps(x_vp: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DMD2 ``get_x0_from_noise``: ``(x - sqrt(1 - a_t) eps) / sqrt(a_t)`` in the diffusers VP convention."""
    a = ALPHAS[t].reshape(-1, 1, 1, 1)
    return (x_vp - (1 - a).sqrt() * eps) / a.sqrt()


def ve_denoiser(net: DemoEpsNet, t: torch.Tensor):
    """ComfyUI's EPS wrapper at integer timesteps: x0 = x - sigma eps(x / sqrt(1 + sigma^2), t)."""
    def denoise(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        sigma = VE.sigma_of(t).reshape(-1, 1, 1, 1)
        return x - sigma * net(x / (1 + sigma**2).sqrt(), t.double(), cond)
    return denoise


# -- timesteps --------------------------------------------------------------------------------------
def test_noise_level_range_is_int_of_the_percentages_and_both_ends_are_drawn():
    assert dm_timestep_range(1000) == (20, 980)
    drawn = sample_dm_timesteps(20_000, (20, 980), 1000, torch.Generator().manual_seed(0))
    assert int(drawn.min()) == 20 and int(drawn.max()) == 980
    assert sample_dm_timesteps(500, (0, 1000), 1000, torch.Generator().manual_seed(1)).max() == 999
    with pytest.raises(ValueError, match="0 <= min <= max <= 1"):
        dm_timestep_range(1000, 0.5, 0.2)


@pytest.mark.parametrize("steps", range(1, 11))
def test_generator_timesteps_are_the_official_denoising_step_list(steps):
    official = list(range(1000 - 1, 0, -(1000 // steps)))[:steps]  # sd_unified_model.denoising_step_list
    assert generator_timesteps(steps, 1000).tolist() == official
    assert generator_timesteps(4, 1000).tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("bad,message", [
    ([], "at least one"), ([999, 749.5], "whole"), ([1000, 500], r"1\.\.999"), ([500, 0], r"1\.\.999"),
    ([249, 499], "strictly descending"), ([999, 999], "strictly descending"),
])
def test_generator_timesteps_that_do_not_fit_the_schedule_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        check_generator_timesteps(bad, 1000)
    assert check_generator_timesteps([999, 399], 1000).tolist() == [999, 399]


# -- generator inputs -------------------------------------------------------------------------------
def test_generator_input_is_the_noised_latent_and_pure_noise_at_the_top():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2, generator=generator, dtype=torch.float64)
    eps = torch.randn(3, 4, 2, 2, generator=generator, dtype=torch.float64)
    t = torch.tensor([999, 499, 249])
    x = generator_input(VE, x0, eps, t)
    # in VP terms (diffusers add_noise, then pure_noise_mask at T - 1): x_vp = x_ve * sqrt(a_t)
    x_vp = ALPHAS[t].sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - ALPHAS[t]).sqrt().reshape(-1, 1, 1, 1) * eps
    x_vp[0] = eps[0]
    assert torch.allclose(x * ALPHAS[t].sqrt().reshape(-1, 1, 1, 1), x_vp, atol=1e-12)
    sigma_top = float(VE.sigma_of(999))  # ComfyUI EPS noise_scaling with max_denoise
    assert torch.allclose(x[0], eps[0] * (1 + sigma_top**2) ** 0.5, atol=1e-12)
    flow = generator_input(FLOW, x0, eps, t)
    sigma = FLOW.sigma_of(t).reshape(-1, 1, 1, 1)
    assert torch.equal(flow[0], eps[0])
    assert torch.allclose(flow[1:], ((1 - sigma) * x0 + sigma * eps)[1:], atol=1e-12)


@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
def test_backward_simulation_equals_the_official_loop(space):
    timesteps = generator_timesteps(4, 1000)
    calls = []

    def generator(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        assert not torch.is_grad_enabled()
        return torch.tanh(x) * 0.5 + t.double().reshape(-1, 1, 1, 1) / 1000

    for steps in range(4):
        calls.clear()
        draws = torch.Generator().manual_seed(steps)
        eps = torch.randn(2, 4, 2, 2, generator=draws, dtype=torch.float64)
        fresh = [torch.randn(2, 4, 2, 2, generator=draws, dtype=torch.float64) for _ in range(3)]
        supply = iter(fresh)
        result = backward_simulation(generator, space, timesteps, steps, eps, lambda: next(supply))
        # the official loop: x0 = G(x, t_i), x = add_noise(x0, randn, t_{i+1}) from pure noise at t_0 = 999
        a0, b0 = space.coefficients(space.sigma_of(999))
        x, expected = eps * float((a0**2 + b0**2).sqrt()), torch.zeros_like(eps)
        with torch.no_grad():
            for index in range(steps):
                expected = generator(x, timesteps[index].expand(2))
                sigma = space.sigma_of(timesteps[min(index + 1, 3)])
                x = space.noise(expected, fresh[index], float(sigma))
        assert torch.allclose(result, expected, atol=1e-12)
        assert [int(t[0]) for t in calls] == timesteps[:steps].tolist() * 2


def test_backward_simulation_refuses_a_step_count_outside_the_list():
    with pytest.raises(ValueError, match=r"0\.\.3"):
        backward_simulation(lambda x, t: x, VE, generator_timesteps(4, 1000), 4, torch.zeros(1, 1), torch.zeros)


# -- losses against the official formulas ------------------------------------------------------------
def test_distribution_matching_gradient_and_loss_equal_the_official_computation():
    """compute_distribution_matching_loss on a tiny EPS net: diffusers VP noising, eps CFG, double x0."""
    net = tiny_eps_net()
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(3, 4, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 4, 4, 4, generator=generator, dtype=torch.float64)
    cond = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    uncond = torch.zeros(3, 8, dtype=torch.float64)
    t = sample_dm_timesteps(3, dm_timestep_range(1000), 1000, generator)
    guidance = 1.75
    shift = torch.randn(3, 4, 4, 4, generator=generator, dtype=torch.float64) * 0.1  # the "fake" score differs

    with torch.no_grad():  # the official code, in VP terms
        a = ALPHAS[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        fake_eps = net(noisy, t.double(), cond) + shift
        eps_u, eps_c = net(noisy, t.double(), uncond), net(noisy, t.double(), cond)
        real_eps = eps_u + guidance * (eps_c - eps_u)
        p_real = latents - vp_x0_from_eps(noisy, real_eps, t)
        p_fake = latents - vp_x0_from_eps(noisy, fake_eps, t)
        official_grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
    official_loss = 0.5 * F.mse_loss(latents.float(), (latents - official_grad).detach().float())

    # ours, in the VE space ComfyUI runs EPS models in, with x0-space CFG
    x_t = VE.noise(latents.detach(), noise, VE.sigma_of(t).reshape(-1, 1, 1, 1))
    denoise = ve_denoiser(net, t)
    with torch.no_grad():
        x0_c, x0_u = denoise(x_t, cond), denoise(x_t, uncond)
        x0_real = x0_u + guidance * (x0_c - x0_u)
        sigma = VE.sigma_of(t).reshape(-1, 1, 1, 1)
        x0_fake = x_t - sigma * (net(x_t / (1 + sigma**2).sqrt(), t.double(), cond) + shift)
    grad = distribution_matching_gradient(latents, x0_real, x0_fake)
    assert torch.allclose(grad, official_grad, atol=1e-10, rtol=1e-8)
    loss = distribution_matching_loss(latents, grad)
    assert torch.allclose(loss.float(), official_loss, rtol=1e-6)
    (dx,) = torch.autograd.grad(loss, latents)
    assert torch.allclose(dx, grad / latents.numel(), atol=1e-15, rtol=1e-10)


def test_distribution_matching_gradient_sets_nan_to_zero():
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    grad = distribution_matching_gradient(x, torch.zeros_like(x), torch.zeros_like(x))  # 0 / 0
    assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
def test_fake_score_loss_is_the_eps_mse_in_ve_and_the_velocity_mse_in_flow(space):
    net = tiny_eps_net()
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(5, 4, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 4, 4, 4, generator=generator, dtype=torch.float64)
    cond = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    t = torch.randint(0, 1000, (5,), generator=generator)
    sigma = space.sigma_of(t).reshape(-1, 1, 1, 1)
    x_t = space.noise(x0, eps, sigma)
    prediction = net(x_t, t.double(), cond)
    if space.kind == "ve":  # compute_loss_fake: mean((eps_pred - eps)^2), x0 from eps
        official = ((prediction - eps) ** 2).mean()
        x0_pred = x_t - sigma * prediction
    else:  # a flow network predicts the velocity eps - x0; flow matching loss
        official = ((prediction - (eps - x0)) ** 2).mean()
        x0_pred = x_t - sigma * prediction
    assert torch.allclose(fake_score_loss(x0_pred, x0, sigma.reshape(-1)), official, rtol=1e-10)


def test_gan_losses_are_the_softplus_forms():
    real, fake = torch.tensor([[0.3], [-1.2]]), torch.tensor([[2.0], [-0.5]])
    assert torch.allclose(gan_generator_loss(fake), torch.log1p(torch.exp(-fake)).mean())
    assert torch.allclose(gan_classifier_loss(real, fake),
                          torch.log1p(torch.exp(fake)).mean() + torch.log1p(torch.exp(-real)).mean())


@pytest.mark.parametrize("size,strides", [(8, [2, 4, 1]), (32, [2, 2, 2, 4, 1]), (4, [4, 1])])
def test_classifier_head_has_the_official_layout(size, strides):
    """SD1.5 (8x8 bottleneck) and SDXL (32x32) heads of sd_guidance.cls_pred_branch; the demo's 4x4."""
    head = classifier_head(64, size)
    convs = [layer for layer in head if isinstance(layer, torch.nn.Conv2d)]
    assert [conv.stride[0] for conv in convs] == strides
    assert [conv.kernel_size[0] for conv in convs][-1] == 1 and all(k == 4 for k in [c.kernel_size[0] for c in convs][:-1])
    assert head(torch.randn(3, 64, size, size)).shape == (3, 1, 1, 1)
