"""The interval machinery on known answers: Student-t quantiles, t and Wilson intervals, paired
differences, verdicts and goal judgements."""
from __future__ import annotations

import math

import pytest
import torch

from distill_core.reference.statistics import (
    Estimate,
    estimate,
    exact,
    judge,
    paired_difference,
    share_interval,
    t_quantile,
    verdict,
)

# Two-sided 95% (and 99%) Student-t factors: scipy.stats.t.ppf((1 + confidence) / 2, dof), scipy 1.17.1.
T_TABLE = {(0.95, 1): 12.706204736174694, (0.95, 2): 4.302652729749462, (0.95, 7): 2.364624251592784,
           (0.95, 9): 2.262157162798205, (0.95, 30): 2.0422724563012378, (0.95, 1000): 1.9623390808264083,
           (0.99, 7): 3.4994832973504924, (0.99, 2047): 2.578233244171445}


@pytest.mark.parametrize(("confidence", "dof"), sorted(T_TABLE))
def test_t_quantile_matches_tables(confidence: float, dof: int) -> None:
    assert t_quantile(confidence, dof) == pytest.approx(T_TABLE[(confidence, dof)], rel=1e-10)


def test_t_quantile_agrees_with_scipy_everywhere() -> None:
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 3, 4, 5, 6, 11, 64, 255, 2048):
        for confidence in (0.5, 0.9, 0.95, 0.999):
            assert t_quantile(confidence, dof) == pytest.approx(stats.t.ppf((1 + confidence) / 2, dof), rel=1e-9)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.95, 0)


def test_estimate_is_the_mean_with_the_t_interval() -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 5.0])
    figure = estimate(values, size=256)
    sd = math.sqrt(((values - 3) ** 2).sum().item() / 3)
    assert figure.value == 3.0 and figure.repeats == 4 and figure.size == 256
    assert figure.half_width == pytest.approx(t_quantile(0.95, 3) * sd / 2)
    assert (figure.low, figure.high) == (3.0 - figure.half_width, 3.0 + figure.half_width)
    assert figure.format(2) == f"3.00 ± {figure.half_width:.2f}" and figure.format(1, signed=True).startswith("+3.0 ± ")
    assert estimate(torch.tensor([0.4])).half_width == math.inf
    assert exact(0.25) == Estimate(0.25, 0.0, 0, 0)
    with pytest.raises(ValueError):
        estimate(torch.tensor([1.0, math.nan]))


def test_paired_difference_uses_the_per_repeat_differences() -> None:
    a = estimate(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    shifted = estimate(torch.tensor([1.5, 2.5, 3.5, 4.5]))
    difference = paired_difference(shifted, a)  # the spread of each figure cancels: a constant 0.5
    assert difference.value == pytest.approx(0.5) and difference.half_width == pytest.approx(0.0, abs=1e-12)
    assert verdict(difference) == "higher" and verdict(paired_difference(a, shifted)) == "lower"
    assert verdict(paired_difference(a, a)) == "no difference"  # identical figures: 0 +- 0
    scaled = paired_difference(shifted, a, scale=1.25)
    torch.testing.assert_close(scaled.values, shifted.values - 1.25 * a.values)
    with pytest.raises(ValueError):
        paired_difference(a, estimate(torch.tensor([1.0, 2.0])))
    with pytest.raises(ValueError):
        paired_difference(a, exact(1.0))


def test_judge_needs_the_whole_interval_on_one_side() -> None:
    def figure(low: float, high: float) -> Estimate:
        return Estimate((low + high) / 2, (high - low) / 2, 1, 10)

    assert judge(figure(0.1, 0.9), 1.0) == "met"
    assert judge(figure(0.9, 1.1), 1.0) == "undecided"
    assert judge(figure(1.1, 1.3), 1.0) == "missed"
    assert judge(figure(0.1, 0.9), 0.0, at_most=False) == "met"
    assert judge(figure(-0.1, 0.9), 0.0, at_most=False) == "undecided"
    assert judge(figure(-0.9, -0.1), 0.0, at_most=False) == "missed"


def test_wilson_interval_matches_the_textbook_values() -> None:
    """Wilson (1927) score interval, 95%: 0 of 10 -> [0, 0.2775]; 5 of 10 -> [0.2366, 0.7634]; a share near 0
    keeps a positive lower end inside [0, 1]."""
    low, high = share_interval(torch.tensor([0.0, 5.0]), 10)
    torch.testing.assert_close(low, torch.tensor([0.0, 0.2366], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(high, torch.tensor([0.2775, 0.7634], dtype=torch.float64), atol=1e-4, rtol=0)
    low, high = share_interval(torch.tensor(1.0), 1000)
    assert 0 < float(low) < 0.001 < float(high) < 0.01
