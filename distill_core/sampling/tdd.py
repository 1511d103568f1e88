"""Target-Driven Distillation sampling (official ``TDDScheduler``, RedAIGC/Target-Driven-Distillation).

TDD's scheduler is DPM-Solver++ of order 1 with TCD-style stochasticity: from ``(x, x0)`` at ``t`` it
solves to ``s = floor((1 - eta) t_next)`` and re-noises to ``t_next``; the last step solves to
sigma 0. Optionally the predicted ``x0`` is clipped (dynamic thresholding) during the first steps.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..spaces import NoiseSpace
from .steps import NoiseSampler, check_unit_interval, run_steps
from .tcd import gamma_step

CLIP_RATIO = 0.995
"""The official TDDScheduler's ``dynamic_thresholding_ratio``: the quantile of ``|x0|`` that x0 clipping keeps."""


def dynamic_threshold(x0: Tensor, ratio: float = CLIP_RATIO, max_value: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding of ``x0``, per sample, as diffusers' ``_threshold_sample``.

    ``s`` = the ``ratio`` quantile of ``|x0|`` over each sample, clamped to ``[1, max_value]``;
    returns ``clamp(x0, -s, s) / s``. With ``max_value = 1`` (TDD's default config) this is
    plain clipping to ``[-1, 1]``.
    """
    check_unit_interval("clip ratio", ratio)
    if max_value < 1:
        raise ValueError(f"clip max value must be at least 1, got {max_value}")
    flat = x0.reshape(x0.shape[0], -1)
    compute = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(compute.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.maximum(torch.minimum(compute, s), -s) / s).to(x0.dtype).reshape(x0.shape)


@torch.no_grad()
def sample_tdd(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    space: NoiseSpace,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
    eta: float,
    clip_x0_steps: int = 0,
    clip_ratio: float = CLIP_RATIO,
    clip_max_value: float = 1.0,
) -> Tensor:
    """TDD sampling over ``sigmas`` (k-diffusion sampler shape); the clipping defaults are the official config's.

    ``eta`` has no default here: the authors' value is the method registry's (:data:`distill_core.methods.TDD_ETA`).

    Step ``i`` from ``sigma`` to ``sigma_next``: ``x0 = model(x, sigma)``, replaced by
    :func:`dynamic_threshold` ``(x0, clip_ratio, clip_max_value)`` while ``i < clip_x0_steps``
    (official ``t_l = clip_x0_steps - 1`` with ``thresholding=True``; the clipped ``x0`` also defines
    the implied noise, as in DPM-Solver++). Then DPM-Solver++(1), i.e. DDIM, to
    ``s = floor((1 - eta) t_next)`` (float64, like the official numpy code), and if ``eta > 0``
    forward diffusion from ``s`` to ``sigma_next`` with noise ``s_noise * z``. ``sigma_next = 0``
    gives ``x0``, like the official ``final_sigmas_type="zero"``. Real CFG (TDD's decoupled
    guidance, e.g. 1.7 on SDXL) comes from the host's guider around ``model``.

    Noise: ``noise_sampler(sigma, sigma_next)`` (default seeded from ``extra_args["seed"]``, see
    :func:`~distill_core.sampling.steps.run_steps`).

    Flow models: the same update in the flow convention with ``t_next``/``s`` from the flow table.
    With ``eta = 0`` it is exactly the Euler method, which is how the official FLUX TDD LoRA is sampled
    (diffusers' FluxPipeline, FlowMatchEuler); ``eta > 0`` adds TDD's re-noising on top.
    """
    check_unit_interval("eta", eta)
    check_unit_interval("clip_ratio", clip_ratio)
    if clip_x0_steps < 0:
        raise ValueError(f"clip_x0_steps must be >= 0, got {clip_x0_steps}")
    if clip_max_value < 1:
        raise ValueError(f"clip_max_value must be at least 1, got {clip_max_value}")

    def update(
        i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float, draw_noise: Callable[[], Tensor]
    ) -> tuple[Tensor, Tensor]:
        x0 = dynamic_threshold(denoised, clip_ratio, clip_max_value) if i < clip_x0_steps else denoised
        return x0, gamma_step(space, x, x0, sigma, sigma_next, eta, draw_noise, float32_floor=False)

    return run_steps(model, x, sigmas, extra_args, callback, disable, update, noise_sampler, s_noise)
