"""The step loop and pieces shared by Stride's few-step samplers (LCM, TCD, TDD, hybrid sampling).

The samplers have the k-diffusion shape ``fn(model, x, sigmas, extra_args, callback, disable, ...)``:
``model(x, sigma_batch, **extra_args)`` returns the denoised ``x0`` and ``callback`` is called once
per step (ComfyUI uses it for progress, previews and Cancel). What differs between methods is only
the update from ``(x, x0)`` at ``sigma`` to the latent at ``sigma_next``; :func:`run_steps` runs the
shared loop around such an update.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

import torch
from torch import Tensor
from tqdm.auto import trange

from ..spaces import NoiseSpace, all_finite  # noqa: F401  (all_finite: the samplers' per-step check)

NoiseSampler = Callable[[Tensor, Tensor], Tensor]
"""``noise_sampler(sigma, sigma_next)`` returns unit Gaussian noise shaped like the latent."""

StepUpdate = Callable[[int, Tensor, Tensor, float, float, Callable[[], Tensor]], tuple[Tensor, Tensor]]
"""``update(i, x, denoised, sigma, sigma_next, draw_noise) -> (x0_used, x_next)`` for one step."""

# Sigmas that reach a sampler were often rounded to float32 on the way (ComfyUI keeps its sigma
# tables in float32): that moves a table timestep by up to ~2e-5. Timesteps this close to an
# integer are treated as that integer, so that floor() and table look-ups see the intended value.
TIMESTEP_SNAP_TOLERANCE = 1e-3


def default_noise_sampler(x: Tensor, seed: int | None = None) -> NoiseSampler:
    """Fresh ``torch.randn`` noise like ``x``; seeded like ComfyUI 0.3.75's ``default_noise_sampler``
    (inside ComfyUI the nodes pass the host's own noise sampler instead).

    With a ``seed`` the noise comes from a private ``torch.Generator`` on ``x.device`` seeded once
    (so a run is reproducible and independent of other RNG use); without one it comes from
    torch's global RNG.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed))

    def sample_noise(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample_noise


@overload
def snapped_timestep(space: NoiseSpace, sigma: float) -> float: ...
@overload
def snapped_timestep(space: NoiseSpace, sigma: Tensor) -> Tensor: ...
def snapped_timestep(space: NoiseSpace, sigma: Tensor | float) -> Tensor | float:
    """The training timestep of ``sigma`` (float64), snapped to an integer when within round-off of one.

    A Python float gives a float (the per-step path, no tensors); a tensor gives a tensor.
    """
    if isinstance(sigma, float):
        t = space.scalar_timestep_of(sigma)
        return float(round(t)) if abs(t - round(t)) < TIMESTEP_SNAP_TOLERANCE else t
    timesteps = space.timestep_of(sigma)
    nearest = timesteps.round()
    return torch.where((timesteps - nearest).abs() < TIMESTEP_SNAP_TOLERANCE, nearest, timesteps)


def check_unit_interval(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 <= value <= 1``."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def run_steps(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None,
    callback: Callable[[dict[str, Any]], None] | None,
    disable: bool | None,
    update: StepUpdate,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """The k-diffusion loop: call the model at each sigma, apply ``update``, report via ``callback``.

    ``update`` gets the step's sigmas as floats and a ``draw_noise()`` that returns
    ``s_noise * noise_sampler(sigmas[i], sigmas[i + 1])``; the default noise sampler is
    :func:`default_noise_sampler` seeded with ``extra_args["seed"]`` when given (ComfyUI passes
    the sampling seed there), torch's global RNG otherwise. ``callback`` receives the latent
    before the step and the ``x0`` the update actually used.
    """
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, extra_args.get("seed"))
    batch_ones = x.new_ones([x.shape[0]])
    values = sigmas.tolist()
    for i in trange(len(sigmas) - 1, disable=disable):

        def draw_noise(i: int = i) -> Tensor:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            return noise if s_noise == 1.0 else noise * s_noise

        denoised = model(x, sigmas[i] * batch_ones, **extra_args)
        x0_used, x_next = update(i, x, denoised, values[i], values[i + 1], draw_noise)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0_used})
        x = x_next
    return x
