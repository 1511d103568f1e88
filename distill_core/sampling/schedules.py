"""Few-step timestep schedules of distilled models, as descending integer training timesteps.

Each function reproduces the schedule of the method's reference scheduler (diffusers or the
official repository); the node layer turns the timesteps into SIGMAS with
``NoiseSpace.sigmas_for_timesteps``. All assume 1000 training timesteps unless told otherwise.
"""
from __future__ import annotations

import math

from ..spaces import NUM_TRAIN_TIMESTEPS

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
        raise ValueError(f"strength {strength} leaves no timestep on the {original_steps}-step LCM grid: it needs "
                         f"strength at least {1 / original_steps:g} (one grid step)")
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
        raise ValueError(f"strength {strength} leaves no training timestep: it needs strength at least "
                         f"{1 / num_train_timesteps:g}")
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
