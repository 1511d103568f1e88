"""TrainingProgress: the step, raw and smoothed losses and time left that the node and the headless runner show."""
from __future__ import annotations

import json
import math

import pytest

from distill_core.training.progress import EMA_BETA, TrainingProgress, format_duration


class Clock:
    """A clock that advances ``per_call`` seconds each time it is read."""

    def __init__(self, per_call: float = 0.0) -> None:
        self.now, self.per_call = 100.0, per_call

    def __call__(self) -> float:
        self.now += self.per_call
        return self.now


def test_smoothed_loss_is_the_bias_corrected_exponential_average():
    values = [1.0, 0.5, 0.8, 0.2, 0.4]
    progress = TrainingProgress(len(values), clock=Clock())
    for step, value in enumerate(values, 1):
        progress.update(step, {"loss": value})
    moment = 0.0
    for count, value in enumerate(values, 1):
        moment = EMA_BETA * moment + (1 - EMA_BETA) * value
        assert progress.series["loss"].ema[count - 1] == pytest.approx(moment / (1 - EMA_BETA**count), rel=1e-12)
    assert progress.series["loss"].ema[0] == 1.0, "the first smoothed value is the first value"
    assert progress.latest("loss") == (0.4, progress.series["loss"].ema[-1])


def test_series_with_missing_steps_are_smoothed_over_their_own_values_and_sent_as_null():
    progress = TrainingProgress(4, clock=Clock())
    progress.update(1, {"fake": 2.0})
    progress.update(2, {"fake": 1.0, "generator": 0.5})
    progress.update(3, {"fake": 1.0})
    history = progress.history()
    assert history["losses"] == {"fake": [2.0, 1.0, 1.0], "generator": [None, 0.5, None]}
    assert history["ema"]["generator"] == [None, 0.5, None]
    assert progress.latest("generator") == (0.5, 0.5)
    assert progress.event()["losses"] == {"fake": 1.0, "generator": None}
    json.dumps(history, allow_nan=False)
    json.dumps(progress.event(), allow_nan=False)


def test_time_left_follows_the_mean_step_time_of_this_run_also_when_resumed():
    clock = Clock()
    progress = TrainingProgress(100, first_step=41, clock=clock)  # resumed after step 40
    assert progress.eta_s is None
    clock.per_call = 0.0
    clock.now += 30.0  # 3 steps in 30 s
    for step in (41, 42, 43):
        progress.update(step, {"loss": 0.1})
    assert progress.eta_s == pytest.approx(10.0 * 57)
    assert progress.history()["first_step"] == 41 and len(progress.history()["losses"]["loss"]) == 3
    assert progress.text() == "step 43/100 · loss 0.1 (smoothed 0.1) · ETA 9m 30s"
    with pytest.raises(ValueError, match="one by one"):
        progress.update(45, {"loss": 0.1})


def test_text_at_the_end_says_how_long_the_run_took():
    clock = Clock()
    progress = TrainingProgress(2, clock=clock)
    progress.update(1, {"loss": 0.25})
    clock.now += 3725
    progress.update(2, {"loss": math.nan})
    assert progress.text() == "step 2/2 · loss 0.25 (smoothed 0.25) · done in 1h 02m"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (9.4, "9s"), (127, "2m 07s"), (3600, "1h 00m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
