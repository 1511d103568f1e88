"""Few-step schedules against their reference schedulers (diffusers, official TDD lists)."""
from __future__ import annotations

import pytest
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

from distill_core.sampling.schedules import (
    StrengthTooLowError,
    hyper_sdxl_one_step_timesteps,
    lcm_timesteps,
    tcd_timesteps,
    tdd_timesteps,
    trailing_timesteps,
)

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _diffusers_timesteps(scheduler, *args, **kwargs) -> list[int] | None:
    """diffusers' schedule, or None where diffusers refuses the arguments."""
    try:
        scheduler.set_timesteps(*args, **kwargs)
    except ValueError:
        return None
    return scheduler.timesteps.tolist()


def _ours_or_none(fn, *args, **kwargs) -> list[int] | None:
    try:
        return fn(*args, **kwargs)
    except ValueError:
        return None


@pytest.mark.parametrize("original_steps", [50, 100, 20, 7])
@pytest.mark.parametrize("strength", [1.0, 0.6, 0.35])
def test_lcm_schedule_equals_diffusers(original_steps, strength):
    scheduler = LCMScheduler(**SD_BETAS)
    for steps in range(1, 60):
        expected = _diffusers_timesteps(scheduler, steps, original_inference_steps=original_steps, strength=strength)
        assert _ours_or_none(lcm_timesteps, steps, original_steps, strength) == expected, steps


def test_lcm_schedule_known_values():
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    assert lcm_timesteps(1) == [999]
    assert lcm_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_tcd_schedules_equal_diffusers(strength):
    scheduler = TCDScheduler(**SD_BETAS)
    for steps in range(1, 51):
        # default branch: original_inference_steps not passed -> LCM grid of the config's 50 steps
        expected = _diffusers_timesteps(scheduler, steps, strength=strength)
        assert _ours_or_none(tcd_timesteps, steps, 50, strength) == expected, steps
        # passing original_inference_steps explicitly switches diffusers to every training timestep
        expected = _diffusers_timesteps(scheduler, steps, original_inference_steps=30, strength=strength)
        assert _ours_or_none(tcd_timesteps, steps, 30, strength, every_training_step=True) == expected, steps
    assert tcd_timesteps(4, every_training_step=True) == [999, 749, 499, 249]


def test_trailing_schedule_equals_diffusers_ddim():
    scheduler = DDIMScheduler(**SD_BETAS, timestep_spacing="trailing")
    for steps in range(1, 121):
        scheduler.set_timesteps(steps)
        # where numpy's float arange overshoots (61, 103, ...) diffusers returns steps + 1 values
        assert trailing_timesteps(steps) == scheduler.timesteps.tolist()[:steps], steps
    assert trailing_timesteps(4) == [999, 749, 499, 249]
    assert trailing_timesteps(1) == [999]


def test_hyper_sdxl_one_step_schedule():
    assert hyper_sdxl_one_step_timesteps() == [800]


# Literal copies of what the official TDDScheduler.set_timesteps (tdd_scheduler.py in
# RedAIGC/Target-Driven-Distillation, tdd_train_step=250) returns; checked by running it.
OFFICIAL_TDD_EQUIDISTANT = {
    4: [999, 751, 499, 251],
    5: [999, 799, 599, 399, 199],
    6: [999, 835, 667, 499, 335, 167],
    7: [999, 859, 715, 571, 431, 287, 143],
    8: [999, 875, 751, 627, 499, 375, 251, 127],
}
OFFICIAL_TDD_SPECIAL_JUMP = {
    4: [999, 751, 499, 251],
    5: [999, 875, 751, 499, 251],
    6: [999, 875, 751, 627, 499, 251],
    7: [999, 875, 751, 627, 499, 375, 251],
    8: [999, 875, 751, 627, 499, 375, 251, 127],
}


@pytest.mark.parametrize("steps", range(4, 9))
def test_tdd_schedules_equal_official(steps):
    assert tdd_timesteps(steps) == OFFICIAL_TDD_EQUIDISTANT[steps]
    assert tdd_timesteps(steps, special_jump=True) == OFFICIAL_TDD_SPECIAL_JUMP[steps]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: lcm_timesteps(0), "steps must be at least 1"),
        (lambda: lcm_timesteps(51), "cannot exceed the 50 timesteps"),
        (lambda: lcm_timesteps(30, strength=0.5), "cannot exceed the 25 timesteps"),
        (lambda: lcm_timesteps(4, original_steps=0), "original_steps must be in"),
        (lambda: lcm_timesteps(4, original_steps=1001), "original_steps must be in"),
        (lambda: lcm_timesteps(4, strength=0.0), "strength must be in"),
        (lambda: lcm_timesteps(4, strength=1.5), "strength must be in"),
        (lambda: tcd_timesteps(60, every_training_step=True), "cannot exceed original_steps"),
        (lambda: tcd_timesteps(0, every_training_step=True), "steps must be at least 1"),
        (lambda: trailing_timesteps(0), "steps must be at least 1"),
        (lambda: trailing_timesteps(1001), "cannot exceed the 1000 timesteps"),
        (lambda: tdd_timesteps(0), "steps must be at least 1"),
        (lambda: tdd_timesteps(251), "cannot exceed the 250 timesteps"),
    ],
)
def test_invalid_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_strength_below_one_grid_step_names_the_strength_it_needs():
    with pytest.raises(StrengthTooLowError, match=r"strength 0.01 leaves no timestep .* at least 0.02") as low:
        lcm_timesteps(1, 50, strength=0.01)
    assert low.value.minimum == 0.02 and lcm_timesteps(1, 50, strength=low.value.minimum) == [19]
    with pytest.raises(StrengthTooLowError, match=r"strength 0.0005 leaves no training timestep: .* at least 0.001"):
        tcd_timesteps(1, 50, strength=0.0005, every_training_step=True)
