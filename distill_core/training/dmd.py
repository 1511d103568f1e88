"""Distribution-matching distillation (DMD2): the formulas of one training iteration.

Read from the official code, tianweiy/DMD2 at commit 8d8fa55633d47cfb81bbc7a892e7248f9518763f:

* ``main/sd_guidance.py`` ``compute_distribution_matching_loss``: at a timestep ``t ~ U{min_step..max_step}``
  (``int(0.02 T)``..``int(0.98 T)``) the generator's sample ``x`` is noised to ``x_t``; with the fake
  score's and the real (teacher, CFG) score's clean predictions ``mu_fake``, ``mu_real``::

      grad = nan_to_num((mu_fake - mu_real) / mean_{c,h,w} |x - mu_real|)
      loss = 0.5 * mean((x - sg(x - grad))^2)                        (d loss / dx = grad / numel)

  The real score uses CFG ``uncond + g (cond - uncond)`` (``real_guidance_scale`` g: 8 for SDXL,
  1.75 for SD1.5; ``predict_noise`` skips the uncond pass when ``g <= 1``); the fake score has none.
* ``compute_loss_fake``: the fake score learns the generator's detached samples by denoising at
  ``t ~ U{0..T-1}`` with the eps-prediction MSE. Here it is the MSE of the probability-flow velocity
  ``(x - x0) / sigma``: in a VE space that is exactly eps, in a flow space the flow-matching loss
  (what FastGen's DMD2 uses for flow teachers: the teacher's own prediction type).
* ``main/sd_unified_model.py``: the generator's timesteps ``range(T - 1, 0, -(T // N))`` (4 steps:
  999, 749, 499, 249); ``prepare_denoising_data`` noises the generator's input to one of them, with
  pure noise at ``T - 1``; ``sample_backward`` (backward simulation) runs the current generator
  without gradient for ``k ~ U{0..N-1}`` steps (one ``k`` for the whole batch, shared by all ranks),
  re-noising each ``x0`` with fresh noise to the next timestep, and trains on its ``x0``.
* ``compute_cls_logits`` / ``cls_pred_branch`` (the GAN term): a convolutional head on the fake score's
  bottleneck features of noised (``diffusion_gan``, ``t ~ U{0..999}``) real and generated latents;
  classifier loss ``softplus(fake) + softplus(-real)`` (weight 1e-2), generator loss
  ``softplus(-fake)`` (weight 5e-3).
* ``main/train_sd.py``: every iteration produces a generator sample and updates the fake score on it;
  the generator is updated (before that) on iterations ``i % dfake_gen_update_ratio == 0`` (5 for
  SDXL, 10 for SD1.5); both AdamW (weight decay 0.01), gradient clipping at ``max_grad_norm`` 10.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..spaces import NoiseSpace

MIN_STEP_PERCENT = 0.02
MAX_STEP_PERCENT = 0.98
GAN_GENERATOR_WEIGHT = 5e-3
GAN_CLASSIFIER_WEIGHT = 1e-2


def _column(values: Tensor, like: Tensor) -> Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


# -- timesteps ------------------------------------------------------------------------------------
def dm_timestep_range(num_timesteps: int, min_percent: float = MIN_STEP_PERCENT,
                      max_percent: float = MAX_STEP_PERCENT) -> tuple[int, int]:
    """``(min_step, max_step)`` of the distribution-matching noise level, inclusive: 1000 -> (20, 980)."""
    if not 0 <= min_percent <= max_percent <= 1:
        raise ValueError(f"noise-level range must satisfy 0 <= min <= max <= 1, got [{min_percent}, {max_percent}]")
    return int(min_percent * num_timesteps), int(max_percent * num_timesteps)


def sample_dm_timesteps(batch: int, timestep_range: tuple[int, int], num_timesteps: int,
                        generator: torch.Generator) -> Tensor:
    """``t ~ U{min_step .. min(max_step, T - 1)}`` per sample (int64)."""
    low, high = timestep_range
    return torch.randint(low, min(high + 1, num_timesteps), (batch,), generator=generator)


def generator_timesteps(steps: int, num_timesteps: int) -> Tensor:
    """DMD2's generator timesteps ``T - 1 - k (T // N)``, ``k < N``: 1 -> 999; 4 -> 999, 749, 499, 249."""
    if not 1 <= steps < num_timesteps:
        raise ValueError(f"generator steps must be in 1..{num_timesteps - 1}, got {steps}")
    return (num_timesteps - 1) - (num_timesteps // steps) * torch.arange(steps, dtype=torch.int64)


def check_generator_timesteps(timesteps: Tensor | list[int], num_timesteps: int) -> Tensor:
    """The given generator timesteps as int64, or a ``ValueError`` if they do not fit the schedule:
    whole numbers in ``1..T-1``, strictly descending, at least one."""
    values = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("generator timesteps: give at least one timestep")
    if not torch.equal(values, values.round()):
        raise ValueError(f"generator timesteps must be whole training timesteps, got {values.tolist()}")
    ints = values.long()
    if ints.min() < 1 or ints.max() > num_timesteps - 1:
        raise ValueError(f"generator timesteps must lie in 1..{num_timesteps - 1} (this model's schedule has "
                         f"{num_timesteps} training timesteps), got {ints.tolist()}")
    if ints.numel() > 1 and not bool((ints[1:] < ints[:-1]).all()):
        raise ValueError(f"generator timesteps must be strictly descending (e.g. 999, 749, 499, 249), got {ints.tolist()}")
    return ints


# -- generator inputs -----------------------------------------------------------------------------
def generator_input(space: NoiseSpace, x0: Tensor, eps: Tensor, timesteps: Tensor) -> Tensor:
    """``x0`` noised to each sample's generator timestep; pure noise at the top timestep ``T - 1``.

    Pure noise is ``sqrt(a^2 + b^2) eps`` (unit noise in variance-preserving scale, DMD2's
    ``pure_noise_mask``), which is also how ComfyUI scales the starting noise at the top sigma
    (``max_denoise``): the generator sees in training what it sees when sampled. With ``x0 = 0``
    below the top this is ComfyUI's ``b eps`` start from an empty latent.
    """
    sigma = space.sigma_of(timesteps).to(eps.device)
    a, b = space.coefficients(sigma)
    noised = space.noise(x0, eps, sigma.reshape(-1, *([1] * (eps.ndim - 1))))
    pure = eps * _column((a**2 + b**2).sqrt(), eps)
    top = (timesteps == space.num_timesteps - 1).to(eps.device).reshape(-1, *([1] * (eps.ndim - 1)))
    return torch.where(top, pure, noised)


def backward_simulation(
    generator: Callable[[Tensor, Tensor], Tensor],
    space: NoiseSpace,
    timesteps: Tensor,
    steps: int,
    eps: Tensor,
    noise: Callable[[], Tensor],
) -> Tensor:
    """The clean estimate after ``steps`` generator steps from pure noise ``eps`` (zeros for ``steps = 0``).

    ``generator(x, timestep_batch) -> x0`` is the current generator; it runs without gradient. After
    each step but the last, ``x0`` is noised with fresh ``noise()`` to the next generator timestep
    (DMD2's ``sample_backward``).
    """
    if not 0 <= steps < len(timesteps):
        raise ValueError(f"backward simulation steps must be in 0..{len(timesteps) - 1}, got {steps}")
    batch = eps.shape[0]
    x0 = torch.zeros_like(eps)
    x = generator_input(space, x0, eps, timesteps[:1].expand(batch))
    with torch.no_grad():
        for index in range(steps):
            x0 = generator(x, timesteps[index].expand(batch))
            if index + 1 < steps:
                x = generator_input(space, x0, noise(), timesteps[index + 1].expand(batch))
    return x0


# -- losses ---------------------------------------------------------------------------------------
def distribution_matching_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """``(x0_fake - x0_real) / mean |x - x0_real|`` per sample in float64, through ``torch.nan_to_num`` (NaN -> 0)."""
    x, x0_real, x0_fake = (t.detach().to(torch.float64) for t in (x, x0_real, x0_fake))
    weight = (x - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / weight)


def distribution_matching_loss(x: Tensor, gradient: Tensor) -> Tensor:
    """``0.5 * mean((x - sg(x - grad))^2)``: its gradient with respect to ``x`` is ``grad / x.numel()``."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return 0.5 * F.mse_loss(x.to(dtype), (x.detach() - gradient.to(x.device, x.dtype)).to(dtype))


def fake_score_loss(x0_pred: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Denoising loss of the fake score: ``mean(((x0_pred - x0) / sigma)^2)``, the MSE of the velocity
    ``(x - x0) / sigma`` (eps in VE spaces, eps - x0 in flow spaces), in at least float32."""
    dtype = torch.promote_types(x0_pred.dtype, torch.float32)
    return (((x0_pred.to(dtype) - x0.to(dtype)) / _column(sigma, x0_pred).to(dtype)) ** 2).mean()


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """``mean softplus(-D(fake))``: the generator's non-saturating GAN loss."""
    return F.softplus(-fake_logits).mean()


def gan_classifier_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``mean softplus(D(fake)) + mean softplus(-D(real))``: the realism classifier's loss."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


# -- the GAN head ---------------------------------------------------------------------------------
def classifier_head(channels: int, size: int, groups: int = 32) -> nn.Sequential:
    """DMD2's ``cls_pred_branch`` for ``channels x size x size`` features: (conv 4x4 stride 2, GroupNorm,
    SiLU) while the side exceeds 4, then a conv over the remaining side to 1x1 (GroupNorm, SiLU) and a
    1x1 conv to one logit. 8x8 features give SD1.5's head, 32x32 SDXL's."""
    if size < 1 or channels < 1:
        raise ValueError(f"classifier features must have a positive size, got {channels} x {size} x {size}")
    groups = groups if channels % groups == 0 else 1
    layers: list[nn.Module] = []
    while size > 4:
        layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
        size //= 2
    layers += [nn.Conv2d(channels, channels, size, stride=size), nn.GroupNorm(groups, channels), nn.SiLU(),
               nn.Conv2d(channels, 1, 1)]
    return nn.Sequential(*layers)


@contextlib.contextmanager
def captured_output(module: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, every output of ``module`` is appended to the yielded list (a forward hook)."""
    outputs: list[Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()
