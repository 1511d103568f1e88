"""DMD2 pieces against direct computations in the official code's own form (tianweiy/DMD2 @ 8d8fa55)."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from distill_core.progress import Progress
from distill_core.safe_files import UnsafeFileError, read_safetensors, write_safetensors
from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod
from distill_core.training.checkpoint import load_checkpoint
from distill_core.training.cli import DemoEpsNet, demo_network, eps_denoiser, velocity_denoiser
from distill_core.training.config import DistillConfig
from distill_core.training.dmd import (
    FAKE,
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
    ode_pairs,
    ode_timesteps,
    regression_loss,
    sample_dm_timesteps,
)
from distill_core.training.teacher_cache import TeacherCache
from distill_core.training.trainer import STUDENT, build_trainer, step_seed

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
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
@pytest.mark.parametrize("first", [999, 399])
def test_backward_simulation_equals_the_official_loop(space, first):
    timesteps = torch.tensor([first, 249, 149, 49]) if first != 999 else generator_timesteps(4, 1000)
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
        result = backward_simulation(generator, space, timesteps, steps, eps, supply.__next__)
        # sample_backward: pure (VP unit) noise, then x0 = G(x, t_i), x = add_noise(x0, randn, t_{i+1})
        a, b = space.coefficients(space.sigma_of(timesteps[0]))
        x = eps * float((a**2 + b**2).sqrt())
        if space.kind == "ve":  # VP unit noise is x_ve = x_vp / sqrt(alpha_cumprod)
            assert torch.allclose(x, eps / ALPHAS[timesteps[0]].sqrt(), atol=1e-12)
        with torch.no_grad():
            for index in range(steps):
                x0 = generator(x, timesteps[index].expand(2))
                sigma = space.sigma_of(timesteps[index + 1])
                x = space.noise(x0, fresh[index], float(sigma))
        assert torch.allclose(result, x, atol=1e-12)
        assert [int(t[0]) for t in calls] == timesteps[:steps].tolist() * 2


def test_backward_simulation_refuses_a_step_count_outside_the_list():
    with pytest.raises(ValueError, match=r"0\.\.3"):
        backward_simulation(lambda x, t: x, VE, generator_timesteps(4, 1000), 4, torch.zeros(1, 1), torch.zeros)



def test_ode_grid_passes_through_every_generator_timestep_from_the_top_to_zero():
    assert ode_timesteps(generator_timesteps(4, 1000), 1000, 10).tolist() == [
        999, 974, 949, 924, 899, 874, 849, 824, 799, 774, 749, 724, 699, 674, 649, 624, 599, 574, 549, 524, 499, 474,
        449, 424, 399, 374, 349, 324, 299, 274, 249, 224, 199, 174, 149, 124, 100, 75, 50, 25, 0]
    assert ode_timesteps(torch.tensor([399]), 1000, 4).tolist() == [999, 749, 500, 250, 0]  # 1 step: from the top
    assert ode_timesteps(torch.tensor([999, 3]), 1000, 10).tolist() == [*torch.linspace(999, 3, 11).round().long()
                                                                        .tolist(), 2, 1, 0]


@pytest.mark.parametrize("space", [VE, FLOW], ids=["ve", "flow"])
@pytest.mark.parametrize("first", [999, 399])
def test_ode_pairs_are_the_teachers_ddim_trajectory_from_pure_noise(space, first):
    """DMD's pairs (train_sd_ode.py, ``denoising``): the teacher's deterministic DDIM run from pure noise at the
    top; generator step 0 sees the noise, step k the trajectory at its timestep; the target is the final x0."""
    timesteps = torch.tensor([first, 249, 149, 49]) if first != 999 else generator_timesteps(4, 1000)
    net = tiny_eps_net()
    cond = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    calls = []

    def teacher(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        sigma = space.sigma_of(t).reshape(-1, 1, 1, 1)
        a, b = space.coefficients(sigma)
        with torch.no_grad():  # eps (ve) or velocity (flow) network: x0 = x - sigma * output
            return x - sigma * net(x / (a**2 + b**2).sqrt(), t.double(), cond)

    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    inputs, target = ode_pairs(teacher, space, timesteps, eps, substeps=5)
    grid = ode_timesteps(timesteps, 1000, 5).tolist()
    assert calls == grid
    # DDIM written out: x_s = a_s x0 + b_s (x - a x0) / b
    a0, b0 = space.coefficients(space.sigma_of(torch.tensor(999)))
    x = eps * float((a0**2 + b0**2).sqrt())
    states = {}
    for index, t in enumerate(grid):
        states[t] = x
        x0 = teacher(x, torch.full((3,), t))
        if index + 1 < len(grid):
            a, b = space.coefficients(space.sigma_of(torch.tensor(t)))
            a_s, b_s = space.coefficients(space.sigma_of(torch.tensor(grid[index + 1])))
            x = float(a_s) * x0 + float(b_s) * (x - float(a) * x0) / float(b)
    assert torch.allclose(target, x0, atol=1e-12, rtol=0)
    a1, b1 = space.coefficients(space.sigma_of(timesteps[0]))
    assert torch.allclose(inputs[:, 0], eps * float((a1**2 + b1**2).sqrt()), atol=1e-12, rtol=0)
    for k in range(1, 4):
        assert torch.allclose(inputs[:, k], states[int(timesteps[k])], atol=1e-12, rtol=0)
    assert inputs.shape == (3, 4, 4, 4, 4)  # (pair, generator step, latent)

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
    kernels = [conv.kernel_size[0] for conv in convs]
    assert kernels[-1] == 1 and all(k == 4 for k in kernels[:-1])
    assert head(torch.randn(3, 64, size, size)).shape == (3, 1, 1, 1)


# -- the trainer: one base network, three roles -------------------------------------------------------
def dmd_setup(data_free: bool = True, prediction: str = "eps", **overrides):
    """The CLI's demo network (float64) with a dmd trainer attached; small settings."""
    settings = {"objective": "dmd", "steps": 8, "rank": 2, "batch": 2, "lr": 1e-3, "ttur": 2, "guidance_scale": 1.5,
                "seed": 3}
    config = DistillConfig(**{**settings, **overrides})
    options = {"dtype": "float64", "num_latents": 0 if data_free else 6, "hidden": 8, "prediction": prediction}
    network = demo_network(options, config)
    return network, build_trainer(network.denoiser, network.module, network.space, config, network.data)


def randomise_loras(trainer) -> None:
    """Non-zero up factors, so every role's network differs from the teacher."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in trainer.params:
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)


def merged_copy(module, loraset):
    """A separate copy of the network (without the LoRA hooks) with ``loraset``'s low-rank products in its weights."""
    copy_ = copy.deepcopy(module)
    for submodule in copy_.modules():
        submodule._forward_hooks.clear()
    with torch.no_grad():
        for name, adapter in (loraset.adapters.items() if loraset is not None else []):
            layer = copy_.get_submodule(name)
            up, down = adapter.lora_up.weight.flatten(1), adapter.lora_down.weight.flatten(1)
            layer.weight += (adapter.alpha / adapter.rank) * (up @ down).reshape(layer.weight.shape)
    for param in copy_.parameters():
        param.requires_grad_(False)
    return copy_


def role_networks(network, trainer):
    """Denoisers of the teacher, generator and fake score as separate merged copies (no hooks)."""
    wrap = eps_denoiser if network.space.kind == "ve" else velocity_denoiser
    return {role: wrap(merged_copy(network.module, loraset), network.space)
            for role, loraset in {"teacher": None, STUDENT: trainer.adapters[STUDENT],
                                  FAKE: trainer.adapters[FAKE]}.items()}


def test_all_loras_off_is_the_teacher_bit_for_bit_and_roles_switch_adapters():
    network, trainer = dmd_setup()
    randomise_loras(trainer)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([14.6, 1.0, 0.1], dtype=torch.float64)
    cond = torch.cat(network.data.conds[:3])
    untouched = copy.deepcopy(network.module)
    for submodule in untouched.modules():
        submodule._forward_hooks.clear()
    with torch.no_grad():
        plain = eps_denoiser(untouched, network.space)(x, sigma, cond)
        with trainer.roles():
            off = network.denoiser(x, sigma, cond)
        assert torch.equal(off, plain)
        references = role_networks(network, trainer)
        for role in (STUDENT, FAKE):
            with trainer.roles(role):
                hooked = network.denoiser(x, sigma, cond)
            assert torch.allclose(hooked, references[role](x, sigma, cond), atol=1e-12, rtol=0)
            assert (hooked - plain).abs().max() > 1e-3
    trainer.detach()
    with torch.no_grad():
        assert torch.equal(network.denoiser(x, sigma, cond), plain)


@pytest.mark.parametrize("prediction", ["eps", "velocity"])
def test_generator_gradient_and_fake_score_loss_equal_direct_computations(prediction):
    network, trainer = dmd_setup(data_free=False, backward_simulation=False, prediction=prediction)
    randomise_loras(trainer)
    references = role_networks(network, trainer)
    space, guidance = network.space, trainer.config.guidance_scale
    batch = trainer.sample_batch(0)
    with torch.inference_mode(False):
        x = trainer.generate(batch, grad=True)
        x.retain_grad()
        loss, reported = trainer.generator_losses(x, batch)
        loss.backward()
    t_in = batch.timesteps
    with torch.no_grad():
        expected_x = references[STUDENT](batch.inputs, space.sigma_of(t_in), batch.cond)
        assert torch.allclose(x, expected_x, atol=1e-12, rtol=0)
        t = batch.dm_timesteps
        sigma = space.sigma_of(t)
        x_t = space.noise(x.detach(), batch.dm_noise, sigma.reshape(-1, 1, 1, 1))
        cond_x0 = references["teacher"](x_t, sigma, batch.cond)
        uncond_x0 = references["teacher"](x_t, sigma, batch.uncond)
        real = uncond_x0 + guidance * (cond_x0 - uncond_x0)
        fake = references[FAKE](x_t, sigma, batch.cond)
        gradient = (fake - real) / (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
        weight = 1 / space.sigma_of(t_in).reshape(-1, 1, 1, 1)
    assert torch.allclose(x.grad, weight * gradient / x.numel(), atol=1e-14, rtol=1e-9)
    assert torch.allclose(reported, 0.5 * (gradient**2).mean(), rtol=1e-9)
    # the fake score's loss on the detached sample: velocity MSE of the fake network's denoising
    fake_loss = trainer.fake_loss(x.detach(), batch)
    t_f = batch.fake_timesteps
    sigma_f = space.sigma_of(t_f).reshape(-1, 1, 1, 1)
    x_f = space.noise(x.detach(), batch.fake_noise, sigma_f)
    with torch.no_grad():
        x0_f = references[FAKE](x_f, sigma_f.reshape(-1), batch.cond)
    expected = (((x_f - x0_f) / sigma_f - (x_f - x.detach()) / sigma_f) ** 2).mean()
    assert torch.allclose(fake_loss, expected, rtol=1e-9)


def test_backward_simulation_runs_the_current_generator_from_pure_noise():
    network, trainer = dmd_setup(generator_steps=4)
    randomise_loras(trainer)
    generator_net = role_networks(network, trainer)[STUDENT]
    space, config = network.space, trainer.config
    depths = set()
    for step in range(6):
        batch = trainer.sample_batch(step)
        # the draws of sample_batch, in its order: prompts, then (shared) depth, then the rollout's noise
        draws = trainer._generator(step)
        cond_ids = torch.randint(len(trainer.conds), (config.batch,), generator=draws)
        assert torch.equal(batch.cond, torch.cat([trainer.conds[i] for i in cond_ids.tolist()]))
        depth = int(torch.randint(4, (1,), generator=torch.Generator().manual_seed(step_seed(config.seed, 0, step))))
        depths.add(depth)
        assert torch.equal(batch.timesteps, trainer.timesteps[depth].expand(config.batch))

        def noise(draws=draws):
            return torch.randn((config.batch, 4, 8, 8), generator=draws, dtype=torch.float64)

        expected = backward_simulation(lambda x, t, cond=batch.cond: generator_net(x, space.sigma_of(t), cond), space,
                                       trainer.timesteps, depth, noise(), noise)
        assert torch.allclose(batch.inputs, expected, atol=1e-12, rtol=0)
    assert len(depths) > 1


def test_regression_pairs_and_term_equal_direct_computations():
    """DMD's paired regression: the pairs are the real score's (CFG) ODE from the run's own draws, and the term
    adds ``regression_weight * mean((G(input) - target)^2)`` over pairs drawn with a generator timestep each."""
    network, trainer = dmd_setup(regression_weight=0.5, regression_pairs=3)
    randomise_loras(trainer)
    references = role_networks(network, trainer)
    space, config = network.space, trainer.config
    pairs = trainer.regression_pairs()
    draws = torch.Generator().manual_seed(step_seed(config.seed, 0, -2))
    for first, count in ((0, 2), (2, 1)):  # batches of config.batch: prompts, then unit noise
        ids = torch.randint(len(trainer.conds), (count,), generator=draws)
        eps = torch.randn((count, 4, 8, 8), generator=draws, dtype=torch.float64)
        cond, uncond = torch.cat([trainer.conds[i] for i in ids.tolist()]), torch.cat([trainer.uncond] * count)

        def teacher(x, t, cond=cond, uncond=uncond):
            c, u = (references["teacher"](x, space.sigma_of(t), prompt) for prompt in (cond, uncond))
            return u + config.guidance_scale * (c - u)

        inputs, target = ode_pairs(teacher, space, trainer.timesteps, eps)
        assert torch.equal(pairs.cond_ids[first:first + count], ids)
        assert torch.allclose(pairs.inputs[first:first + count], inputs, atol=1e-10, rtol=0)
        assert torch.allclose(pairs.targets[first:first + count], target, atol=1e-10, rtol=0)

    batch = trainer.sample_batch(0)
    drawn = batch.regression
    for row in range(config.batch):  # each drawn row is one pair at one generator step, with its prompt
        pair = next(j for j in range(3) if torch.equal(pairs.targets[j], drawn.targets[row]))
        step = trainer.timesteps.tolist().index(int(drawn.timesteps[row]))
        assert torch.equal(drawn.inputs[row], pairs.inputs[pair, step])
        assert torch.equal(drawn.cond[row:row + 1], trainer.conds[int(pairs.cond_ids[pair])])
    with torch.inference_mode(False):
        x = trainer.generate(batch, grad=True)
        loss, reported = trainer.generator_losses(x, batch)
        without, reported_without = trainer.generator_losses(x, dataclasses.replace(batch, regression=None))
    with torch.no_grad():
        prediction = references[STUDENT](drawn.inputs, space.sigma_of(drawn.timesteps), drawn.cond)
    expected = 0.5 * ((prediction - drawn.targets) ** 2).mean()
    assert torch.allclose(loss - without, expected, rtol=1e-9, atol=0)
    assert torch.allclose(reported - reported_without, expected, rtol=1e-9, atol=0)
    assert float(regression_loss(prediction, drawn.targets)) == pytest.approx(float(expected) / 0.5, rel=1e-12)


def test_regression_pairs_are_kept_in_the_teacher_cache_and_read_back_bit_for_bit(tmp_path, monkeypatch):
    cache = TeacherCache(tmp_path, "model-a")
    _, trainer = dmd_setup(regression_weight=0.5, regression_pairs=3)
    trainer.prepare_data(Progress(), cache)
    made = trainer.regression_pairs()
    assert len(os.listdir(tmp_path)) == 1
    _, again = dmd_setup(regression_weight=0.5, regression_pairs=3)
    monkeypatch.setattr(again, "_make_pairs", lambda progress: pytest.fail("the cached pairs were made again"))
    again.prepare_data(Progress(), cache)
    read = again.regression_pairs()
    assert all(torch.equal(a, b) for a, b in zip((made.inputs, made.targets, made.cond_ids),
                                                  (read.inputs, read.targets, read.cond_ids), strict=True))
    _, other = dmd_setup(regression_weight=0.5, regression_pairs=4)  # other settings: its own entry
    other.prepare_data(Progress(), cache)
    assert len(os.listdir(tmp_path)) == 2 and len(other.regression_pairs().targets) == 4

def trained_vector(trainer) -> torch.Tensor:
    return torch.cat([param.detach().reshape(-1) for param in trainer.params])


@pytest.mark.parametrize("data_free,overrides", [(True, {}), (False, {"backward_simulation": False}),
                                                 (False, {"gan_features": "conv_mid"}),
                                                 (True, {"regression_weight": 0.25, "regression_pairs": 3})],
                         ids=["backward-simulation", "with-images", "gan", "regression"])
def test_resume_gives_the_same_loras_optimizers_and_history_as_an_uninterrupted_run(tmp_path, data_free, overrides):
    _, trainer = dmd_setup(data_free, **overrides)
    whole = trainer.train()
    uninterrupted = trained_vector(trainer)
    assert set(whole.losses) == {"generator", "fake"} and len(whole.losses["fake"]) == 8
    assert [math.isnan(v) for v in whole.losses["generator"]] == [step % 2 == 1 for step in range(8)]

    checkpoint = str(tmp_path / "run.ckpt.safetensors")
    _, trainer = dmd_setup(data_free, **overrides)
    trainer.prepare_data(Progress())  # the pool or pairs first: the stop below counts training steps' polls
    polls = iter(range(100))
    first = trainer.train(should_stop=lambda: next(polls) >= 3, checkpoint_path=checkpoint)
    assert first.cancelled and first.steps_done == 3
    saved = load_checkpoint(checkpoint)
    assert set(saved.loras) == set(saved.optimizers) == {STUDENT, FAKE}
    assert set(saved.modules) == ({FAKE} if overrides.get("gan_features") else set())

    _, trainer = dmd_setup(data_free, **overrides)
    torch.manual_seed(123)  # the checkpoint restores the torch RNG
    second = trainer.train(checkpoint_path=checkpoint, resume=True)
    assert second.steps_done == 8
    assert (trained_vector(trainer) - uninterrupted).abs().max() < 1e-6
    for series in ("generator", "fake"):  # the history covers the whole run
        assert torch.allclose(torch.tensor(second.losses[series]), torch.tensor(whole.losses[series]), rtol=1e-6,
                              atol=0, equal_nan=True)
    assert os.listdir(tmp_path) == ["run.ckpt.safetensors"]


def test_the_fake_score_learns_the_generator_samples():
    _, trainer = dmd_setup(steps=60, lr=3e-3, batch=4, ttur=1000)  # one generator step, then the fake score alone

    def held_out_loss() -> float:
        with torch.no_grad():
            batches = [trainer.sample_batch(10_000 + i) for i in range(6)]
            return sum(float(trainer.fake_loss(trainer.generate(batch, False), batch)) for batch in batches) / 6

    before = held_out_loss()
    trainer.train()
    assert held_out_loss() < 0.9 * before


@pytest.mark.parametrize("settings,message", [
    ({"ttur": 0}, r"ttur .* >= 1"), ({"ttur": 2.5}, r"ttur .* whole number"),
    ({"guidance_scale": 0.0}, r"guidance_scale .* > 0"), ({"guidance_scale": -1.0}, r"guidance_scale .* > 0"),
    ({"generator_steps": 2, "generator_timesteps": [999, 1000]}, r"1\.\.999"),
    ({"generator_steps": 2, "generator_timesteps": [499, 999]}, "strictly descending"),
    ({"generator_steps": 3, "generator_timesteps": [999, 499]}, "one timestep per generator step"),
    ({"generator_steps": 1000}, r"generator steps must be in 1\.\.999"),
    ({"gan_features": "conv_mid"}, "GAN term .* real latents"), ({"gan_features": "nowhere"}, "no module named"),
    ({"regression_weight": -0.1}, r"regression_weight .* >= 0"),
    ({"regression_weight": float("nan")}, r"regression_weight .* finite"),
    ({"regression_weight": float("inf")}, r"regression_weight .* finite"),
    ({"regression_pairs": 0}, r"regression_pairs .* >= 1"), ({"regression_pairs": 2.5}, r"regression_pairs .* whole"),
])
def test_bad_dmd_settings_are_refused_and_leave_the_network_untouched(settings, message):
    data_free = settings.get("gan_features") != "nowhere"
    options = {"dtype": "float64", "hidden": 8, "num_latents": 0 if data_free else 6}
    try:
        config = DistillConfig(**{**{"objective": "dmd", "rank": 2, "batch": 2}, **settings})
    except ValueError as error:  # refused by the settings themselves
        assert re.search(message, str(error)), error
        return
    network = demo_network(options, config)
    with pytest.raises(ValueError, match=message):
        build_trainer(network.denoiser, network.module, network.space, config, network.data)
    assert all(not submodule._forward_hooks for submodule in network.module.modules())


def test_resuming_a_dmd_checkpoint_as_another_objective_or_rank_is_refused_and_changes_nothing(tmp_path):
    checkpoint = str(tmp_path / "run.ckpt.safetensors")
    network, trainer = dmd_setup(steps=2)
    trainer.train(checkpoint_path=checkpoint)
    before = os.stat(checkpoint).st_mtime_ns, read_safetensors(checkpoint)[0]
    for settings, message in [({"objective": "lcm"}, r"different settings \(objective 'dmd' there, 'lcm' here\)"),
                              ({"objective": "dmd", "rank": 4}, r"different settings \(rank 2 there, 4 here\)")]:
        config = DistillConfig(**{**{"steps": 4, "rank": 2, "batch": 2, "lr": 1e-3, "seed": 3}, **settings})
        network = demo_network({"dtype": "float64", "num_latents": 0, "hidden": 8}, config)
        fresh = build_trainer(network.denoiser, network.module, network.space, config, network.data)
        initial = trained_vector(fresh)
        with pytest.raises(ValueError, match=message):
            fresh.train(checkpoint_path=checkpoint, resume=True)
        assert torch.equal(trained_vector(fresh), initial)
    after = os.stat(checkpoint).st_mtime_ns, read_safetensors(checkpoint)[0]
    assert before[0] == after[0] and all(torch.equal(before[1][key], after[1][key]) for key in before[1])


def test_each_role_keeps_its_own_loss_scale_in_the_checkpoint(tmp_path):
    """Generator and fake score backpropagate separate losses: each has its own scaler, saved and restored."""
    checkpoint = str(tmp_path / "run.ckpt.safetensors")
    _, trainer = dmd_setup(steps=2)
    trainer.loss_scales[FAKE].scale, trainer.loss_scales[FAKE].good_steps = 2.0**10, 7
    trainer.train(checkpoint_path=checkpoint)
    assert {role: scale.enabled for role, scale in trainer.loss_scales.items()} == {STUDENT: False, FAKE: False}
    expected = {STUDENT: {"scale": 2.0**16, "good_steps": 0}, FAKE: {"scale": 2.0**10, "good_steps": 7}}
    assert load_checkpoint(checkpoint).loss_scale == expected
    _, resumed = dmd_setup(steps=3)
    resumed.train(checkpoint_path=checkpoint, resume=True)
    assert {role: scale.state() for role, scale in resumed.loss_scales.items()} == expected

    tensors, metadata = read_safetensors(checkpoint)
    write_safetensors(checkpoint, tensors, {**metadata, "loss_scale": json.dumps({STUDENT: expected[STUDENT]})})
    with pytest.raises(UnsafeFileError, match="one entry per role"):
        load_checkpoint(checkpoint)


def test_cli_runs_dmd_keeps_the_fake_score_and_refuses_one_of_another_base(tmp_path):
    def cli(settings: dict, name: str) -> subprocess.CompletedProcess:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(settings))
        return subprocess.run([sys.executable, "-m", "distill_core.training.cli", "--config", str(path)], cwd=REPO,
                              env=ONE_THREAD, capture_output=True, text=True, timeout=120)

    distill = {"objective": "dmd", "steps": 3, "rank": 2, "batch": 2, "ttur": 2}
    first = cli({"distill": distill, "output": "lora.safetensors", "fake_score_output": "fake.safetensors",
                 "log_every": 1}, "first")
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    both, fake_only = ["eta_s", "fake", "fake_smoothed", "generator", "generator_smoothed", "step"], \
        ["eta_s", "fake", "fake_smoothed", "step"]
    assert [sorted(line) for line in lines[:3]] == [both, fake_only, both]
    assert lines[0]["generator_smoothed"] == lines[0]["generator"] and lines[2]["eta_s"] == 0
    # The terminal shows what the node shows: each series raw and smoothed (the generator's last value on steps
    # without one), then the run's duration.
    shown = [line for line in first.stderr.splitlines() if line.startswith("step ")]
    assert set(shown[1].split(" · ")[1:3]) == {
        f"generator {lines[0]['generator']:.4g} (smoothed {lines[0]['generator_smoothed']:.4g})",
        f"fake {lines[1]['fake']:.4g} (smoothed {lines[1]['fake_smoothed']:.4g})"}
    assert " · done in " in shown[2]
    lora, metadata = read_safetensors(tmp_path / "lora.safetensors")
    fake, fake_metadata = read_safetensors(tmp_path / "fake.safetensors")
    assert metadata["stride.objective"] == "dmd" and lora.keys() == fake.keys()
    assert fake_metadata["stride.format"] == "stride-dmd-fake-score-1"
    again = cli({"distill": distill, "fake_score_init": "fake.safetensors"}, "again")
    assert again.returncode == 0, again.stderr
    other = cli({"distill": distill, "network_options": {"seed": 5}, "fake_score_init": "fake.safetensors",
                 "output": "other.safetensors"}, "other")
    assert other.returncode != 0 and "fake score of another base model" in other.stderr
    assert not (tmp_path / "other.safetensors").exists()


def test_two_process_gloo_ranks_end_with_identical_dmd_loras(tmp_path):
    settings = {
        "distill": {"objective": "dmd", "steps": 4, "rank": 2, "batch": 2, "lr": 1e-3, "ttur": 2},
        "network_options": {"dtype": "float64", "hidden": 8, "num_latents": 0},
        "log_every": 1,
    }
    completed = subprocess.run([sys.executable, "-m", "tests.unit.ddp_worker", str(tmp_path), json.dumps(settings)],
                               cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0, _ = read_safetensors(tmp_path / "rank0.safetensors")
    rank1, _ = read_safetensors(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and {key.split(".")[0] for key in rank0} == {STUDENT, FAKE}
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    for role in (STUDENT, FAKE):
        assert any(key.startswith(role) and key.endswith("lora_up.weight") and rank0[key].abs().max() > 0
                   for key in rank0)
