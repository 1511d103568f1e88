"""Dynamic loss scaling: GradScaler's rule, exact in float32, on for float16 networks (tests/host measures its effect
on ComfyUI UNets)."""
from __future__ import annotations

import torch

from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod
from distill_core.training import loss_scale
from distill_core.training.cli import DemoEpsNet, demo_network
from distill_core.training.config import DistillConfig, TrainingData
from distill_core.training.lora import attach_lora
from distill_core.training.loss_scale import DynamicLossScale
from distill_core.training.trainer import STUDENT, DistillTrainer


def test_overflow_skips_and_halves_finite_steps_unscale_and_grow():
    scaler = DynamicLossScale(enabled=True)
    grads = [torch.tensor([float("inf"), 1.0])]
    assert scaler.unscale_(grads) == DynamicLossScale.SKIP and scaler.scale == 2.0**15
    grads = [torch.tensor([2.0**15, -(2.0**16)])]
    assert scaler.unscale_(grads) == DynamicLossScale.STEP and grads[0].tolist() == [1.0, -2.0]
    for _ in range(loss_scale.GROWTH_INTERVAL - 1):
        assert scaler.unscale_([torch.ones(1)]) == DynamicLossScale.STEP
    assert scaler.scale == 2.0**16 and scaler.good_steps == 0
    restored = DynamicLossScale(enabled=True)
    restored.load_state(scaler.state())
    assert restored.state() == scaler.state()


def test_gradients_not_finite_at_scale_one_or_without_scaling_are_divergence():
    scaler = DynamicLossScale(enabled=True)
    for _ in range(16):
        assert scaler.unscale_([torch.tensor([float("nan")])]) == DynamicLossScale.SKIP
    assert scaler.scale == 1.0 and scaler.unscale_([torch.tensor([float("nan")])]) == DynamicLossScale.DIVERGED
    off = DynamicLossScale(enabled=False)
    grads = [torch.tensor([3.0])]
    assert off.unscale_(grads) == DynamicLossScale.STEP and grads[0].item() == 3.0 and off.scaled(grads[0]) is grads[0]
    assert off.unscale_([torch.tensor([float("inf")])]) == DynamicLossScale.DIVERGED


def test_scaling_a_float32_run_changes_no_bit():
    """S is a power of two: every product in backward and the final division are exact (no overflow here)."""
    results = []
    for enabled in (False, True):
        config = DistillConfig(objective="lcm", steps=3, rank=2, batch=2, lr=1e-3)
        network = demo_network({"dtype": "float32", "num_latents": 6, "hidden": 8}, config)
        torch.manual_seed(5)
        loraset = attach_lora(network.module, config.rank)
        trainer = DistillTrainer(network.denoiser, loraset, network.space, config, network.data)
        trainer.loss_scales[STUDENT].enabled = enabled
        losses = trainer.train().losses["loss"]
        results.append((losses, torch.cat([p.detach().flatten() for p in loraset.parameters()])))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


def test_a_float32_network_is_not_scaled_and_a_float16_one_is():
    config = DistillConfig(objective="lcm", steps=1, rank=2, batch=2, lr=1e-3)
    network = demo_network({"dtype": "float32", "num_latents": 4, "hidden": 8}, config)
    trainer = DistillTrainer(network.denoiser, attach_lora(network.module, 2), network.space, config, network.data)
    trainer.train()
    assert trainer.loss_scales[STUDENT].enabled is False
    half = half_setup(side=8)
    half.train()
    assert half.loss_scales[STUDENT].enabled is True and half.loss_scales[STUDENT].good_steps == 1


def half_setup(side: int, dtype: torch.dtype = torch.float16) -> DistillTrainer:
    """A seeded conv net with float16-representable weights, run in ``dtype`` behind a float32 denoiser (as
    ComfyUI casts around its models), LCM batch 4 on ``4 x side x side`` latents, random-initialised LoRA."""
    space = NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = DemoEpsNet(4, 32, 8).half().to(dtype)  # float32 runs the same (rounded) weights

    def denoiser(x, sigma, cond):
        s = sigma.reshape(-1, 1, 1, 1).float()
        timestep = space.timestep_of(sigma.detach().cpu()).to(dtype)
        return x - s * net((x / (s**2 + 1).sqrt()).to(dtype), timestep, cond.to(dtype)).float()

    generator = torch.Generator().manual_seed(1)
    data = TrainingData([torch.randn(1, 8, generator=generator)], torch.zeros(1, 8),
                        latents=torch.randn(8, 4, side, side, generator=generator))
    config = DistillConfig(objective="lcm", steps=1, rank=4, batch=4, lr=1e-3, seed=2)
    torch.manual_seed(3)
    loraset = attach_lora(net, 4, init="random")
    return DistillTrainer(denoiser, loraset, space, config, data)


def test_a_float16_run_trains_to_the_float32_loss():
    losses = {}
    for dtype in (torch.float32, torch.float16):
        trainer = half_setup(16, dtype=dtype)
        trainer.config.steps = 6
        losses[dtype] = trainer.train().losses["loss"]
    pairs = zip(losses[torch.float32], losses[torch.float16], strict=True)
    assert all(abs(a - b) <= 0.02 * abs(a) for a, b in pairs), losses
