"""Few-step schedules of distilled models.

Discrete-time methods (LCM, TCD, Hyper-SD, TDD, SDXL-Lightning, DMD2) are defined on descending
integer training timesteps, turned into SIGMAS with ``NoiseSpace.sigmas_for_timesteps``. Flow-matching
methods are defined directly on flow sigmas (:func:`flow_sigmas`, :func:`sd3_sigmas`). Each function
reproduces the schedule of the method's reference scheduler (diffusers or the official repository);
all assume 1000 training timesteps unless told otherwise.
"""
from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor

from ..spaces import NUM_TRAIN_TIMESTEPS, time_shift

ScheduleT = TypeVar("ScheduleT", list[int], Tensor)
"""A schedule as training timesteps (``list[int]``) or as SIGMAS (``Tensor``)."""

TDD_TRAIN_TARGETS = 250
"""TDD distils towards a grid of 250 target timesteps: 3, 7, ..., 999 (spacing 1000 / 250)."""

HYPER_SDXL_ONE_STEP_TIMESTEP = 800
"""The Hyper-SDXL 1-step UNet runs once at timestep 800 (ByteDance's ComfyUI scheduler node)."""

# TDD's non-equidistant ("special jump") schedules on the 250-target grid; other step counts keep
# the equidistant schedule (official TDDScheduler.set_timesteps, RedAIGC/Target-Driven-Distillation).
_TDD_SPECIAL_JUMP = {
    5: [999, 875, 751, 499, 251],
    6: [999, 875, 751, 627, 499, 251],
    7: [999, 875, 751, 627, 499, 375, 251],
}


class StrengthTooLowError(ValueError):
    """``strength`` leaves no timestep on the grid; ``minimum`` is the smallest strength that leaves one."""

    def __init__(self, message: str, minimum: float) -> None:
        super().__init__(message)
        self.minimum = minimum


def _check_steps(steps: int, available: int, grid_name: str) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > available:
        raise ValueError(f"steps ({steps}) cannot exceed the {available} timesteps of the {grid_name}")


def _pick_evenly(grid_descending: list[int], steps: int) -> list[int]:
    """``grid[floor(linspace(0, len(grid), steps, endpoint=False))]``, as the LCM/TCD/TDD schedulers pick."""
    spacing = len(grid_descending) / steps  # numpy's linspace multiplies i by this rounded spacing
    return [grid_descending[math.floor(i * spacing)] for i in range(steps)]


def lcm_timesteps(
    steps: int, original_steps: int = 50, strength: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> list[int]:
    """LCM's skipping-step schedule (diffusers ``LCMScheduler.set_timesteps``).

    The distillation grid is ``k - 1, 2k - 1, ..., m k - 1`` with ``k = num_train_timesteps //
    original_steps`` and ``m = int(original_steps * strength)`` (``strength < 1`` is img2img: the grid
    stops lower), read top-down; ``steps`` entries are picked at evenly spaced grid indices.
    50 original steps, 4 steps -> ``[999, 759, 499, 259]``.
    """
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps must be in [1, {num_train_timesteps}], got {original_steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    k = num_train_timesteps // original_steps
    grid = [j * k - 1 for j in range(int(original_steps * strength), 0, -1)]
    if not grid:
        raise StrengthTooLowError(f"strength {strength:g} leaves no timestep on the {original_steps}-step LCM grid: "
                                  f"it needs at least {1 / original_steps:g} (one grid step)", 1 / original_steps)
    _check_steps(steps, len(grid), f"LCM grid (original_steps={original_steps}, strength={strength})")
    return _pick_evenly(grid, steps)


def tcd_timesteps(
    steps: int,
    original_steps: int = 50,
    strength: float = 1.0,
    every_training_step: bool = False,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> list[int]:
    """TCD's schedule (diffusers ``TCDScheduler.set_timesteps``): the LCM grid by default.

    ``every_training_step=True`` is diffusers' other branch, taken whenever ``original_inference_steps``
    is passed to ``set_timesteps`` explicitly: the grid is every training timestep below
    ``int(num_train_timesteps * strength)`` (4 steps -> ``[999, 749, 499, 249]``), and diffusers
    still requires ``steps <= original_steps``.
    """
    if not every_training_step:
        return lcm_timesteps(steps, original_steps, strength, num_train_timesteps)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if steps > original_steps:
        raise ValueError(f"steps ({steps}) cannot exceed original_steps ({original_steps})")
    grid = list(range(int(num_train_timesteps * strength) - 1, -1, -1))
    if not grid:
        raise StrengthTooLowError(f"strength {strength:g} leaves no training timestep: it needs at least "
                                  f"{1 / num_train_timesteps:g}", 1 / num_train_timesteps)
    _check_steps(steps, len(grid), f"training grid (strength={strength})")
    return _pick_evenly(grid, steps)


def trailing_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """DDIM ``timestep_spacing="trailing"`` (used by the Hyper-SD N-step LoRAs): ends at the top.

    ``round(T - i T / steps) - 1`` evaluated like diffusers' ``np.arange`` (half to even);
    4 steps -> ``[999, 749, 499, 249]``. Where numpy's float ``arange`` yields one value too many
    (e.g. 61 steps) diffusers returns ``steps + 1`` timesteps; this returns the first ``steps``.
    """
    _check_steps(steps, num_train_timesteps, "training schedule")
    # numpy's arange steps by (start + step) - start, which is not always exactly -T / steps
    delta = (num_train_timesteps - num_train_timesteps / steps) - num_train_timesteps
    return [round(num_train_timesteps + i * delta) - 1 for i in range(steps)]


def hyper_sdxl_one_step_timesteps() -> list[int]:
    """The Hyper-SDXL 1-step UNet's schedule: a single step at timestep 800 (SIGMAS [sigma(800), 0])."""
    return [HYPER_SDXL_ONE_STEP_TIMESTEP]


def tdd_timesteps(steps: int, special_jump: bool = False) -> list[int]:
    """TDD's schedule on its 250-target grid (official ``TDDScheduler.set_timesteps``).

    Equidistant: grid ``4 j - 1`` (j = 250 .. 1) picked at evenly spaced indices, 4 steps ->
    ``[999, 751, 499, 251]``, 8 -> ``[999, 875, 751, 627, 499, 375, 251, 127]``. ``special_jump``
    swaps in the non-equidistant schedules for 5, 6 and 7 steps (5 -> ``[999, 875, 751, 499, 251]``);
    other step counts are unchanged. TDD was trained for 4-8 steps.
    """
    grid = [4 * j - 1 for j in range(TDD_TRAIN_TARGETS, 0, -1)]
    _check_steps(steps, len(grid), "TDD 250-target grid")
    if special_jump and steps in _TDD_SPECIAL_JUMP:
        return list(_TDD_SPECIAL_JUMP[steps])
    return _pick_evenly(grid, steps)


def flow_sigmas(steps: int, shift: float, end: float | None = None) -> Tensor:
    """The few-step flow-matching schedule: ``steps`` uniform raw times from 1 to ``end``, time-shifted.

    ``sigma_i = time_shift(t_i, shift)`` with ``t = linspace(1, end, steps)``, then a final 0 (float64).
    The default ``end = 1 / steps`` is ``linspace(1, 0, steps + 1)[:-1]``: FLUX's ``get_schedule``, diffusers'
    FluxPipeline / QwenImagePipeline (``linspace(1, 1 / N, N)``), Wan's Euler and LightX2V's step-distill
    schedules, Z-Image's scheduler. 4 steps at shift 5 -> 1, 0.9375, 0.8333, 0.625, 0.
    """
    _check_steps(steps, NUM_TRAIN_TIMESTEPS, "training schedule")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    raw = torch.linspace(1.0, 1.0 / steps if end is None else end, steps, dtype=torch.float64)
    return torch.cat([time_shift(raw, shift), raw.new_zeros(1)])


def sd3_sigmas(steps: int, shift: float) -> Tensor:
    """SD3 / SD3.5's schedule: raw times from 1 down to the shifted table's smallest sigma, time-shifted.

    Official ``sd3_infer.get_sigmas`` (Stability-AI/sd3.5) and diffusers' FlowMatchEulerDiscreteScheduler
    without dynamic shifting: ``t = linspace(1, time_shift(1 / 1000, shift), steps)``, so the last step
    starts close to 0 (4 steps at shift 3 -> 1, 0.858, 0.602, 0.0090, 0), unlike :func:`flow_sigmas`.
    """
    sigma_min = time_shift(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64), shift)
    return flow_sigmas(steps, shift, end=float(sigma_min))


def flux_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256,
            max_seq_len: int = 4096) -> float:
    """FLUX.1-dev's resolution shift ``mu``: linear in the packed image sequence length.

    ``mu = base_shift + (max_shift - base_shift) (seq - base_seq_len) / (max_seq_len - base_seq_len)``
    (black-forest-labs/flux ``get_lin_function``, diffusers ``calculate_shift``); the schedule's shift is
    ``exp(mu)`` (1024 x 1024 -> 4096 tokens -> mu 1.15).
    """
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be positive, got {image_seq_len}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flux_image_seq_len(latent_height: int, latent_width: int) -> int:
    """FLUX.1's image tokens for a latent of this size: one per 2 x 2 latent patch (odd sizes padded, as ComfyUI
    and BFL pad), which is what :func:`flux_mu` reads (1024 x 1024 pixels -> 128 x 128 latent -> 4096 tokens)."""
    if latent_height < 1 or latent_width < 1:
        raise ValueError(f"the latent size must be positive, got {latent_height} x {latent_width}")
    return math.ceil(latent_height / 2) * math.ceil(latent_width / 2)


def img2img_tail(schedule: ScheduleT, steps: int, denoise: float) -> ScheduleT:
    """The last ``int(steps * denoise)`` steps of a ``steps``-step schedule (diffusers' img2img rule).

    Works on timestep lists (``steps`` entries) and on SIGMAS (``steps + 1`` entries ending in 0). The
    steps kept are the trained ones, so a distilled model stays on its schedule; ``denoise = 1`` keeps all.
    """
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    kept = min(int(steps * denoise), steps)
    if kept < 1:
        raise ValueError(f"denoise {denoise} keeps no step of a {steps}-step schedule (needs at least 1 / {steps})")
    start = steps - kept
    return schedule[start:]
