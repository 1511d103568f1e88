"""Confidence intervals for the reference metrics, paired differences, and goals judged on intervals.

**Why independent repeats.** A quality figure of Stride is the expected value of a metric on a set of
``n`` samples scored against the exact reference (SWD to fresh data, total variation of the mode
histogram, mode entropy, ...). Most of these metrics are biased at finite ``n`` (SWD and total
variation have a floor that shrinks like ``1 / sqrt(n)``), so the figure is defined *at* ``n`` and its
interval must carry all of its randomness: the samples' noise and the fresh reference set. A
bootstrap over one sample set carries neither the reference's randomness nor the right finite-``n``
bias (a resample holds only about 63% distinct samples, which changes the floor of SWD, total
variation and entropy). So a figure is measured on ``R`` independent repeats (disjoint groups of
samples, each with its own fresh reference set and projections) and reported as the mean of the ``R``
values with a Student-t interval (:func:`estimate`); by the central limit theorem over independent
repeats this is valid whatever the metric's own distribution, up to its skew at small ``R``.
Figures that are means of per-sample values (NLL, endpoint error) take each sample as its own repeat
(``size = 1``), the finest grouping of the same method. A mode's share of the samples gets the Wilson
score interval (:func:`share_interval`), which stays inside [0, 1] for shares near 0.

**Paired comparisons.** Two samplers run from the same noises and scored against the same reference
sets and projections per repeat differ by much less from repeat to repeat than either differs from its
expected value (the set's mode mix, which dominates SWD, is shared). Their difference gets its own
interval from the per-repeat differences (:func:`paired_difference`). Rows are "different" only when
that interval excludes 0 (:func:`verdict`); a goal is met only when a whole interval lies on its side
of the bound (:func:`judge`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

CONFIDENCE = 0.95
"""Two-sided confidence level of every interval Stride reports."""


def _t_central_probability(t: float, dof: int) -> float:
    """``P(|T| <= t)`` for Student's t with an integer ``dof`` (Abramowitz & Stegun 26.7.3 and 26.7.4:
    with ``theta = atan(t / sqrt(dof))`` a finite series in ``cos(theta)``, exact for every integer ``dof``)."""
    theta = math.atan(t / math.sqrt(dof))
    sine, cosine2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2 == 0:  # sin(theta) (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ... + 1.3..(dof-3)/(2.4..(dof-2)) cos^(dof-2))
        term, total = 1.0, 1.0
        for j in range(1, dof // 2):
            term *= cosine2 * (2 * j - 1) / (2 * j)
            total += term
        return sine * total
    if dof == 1:
        return 2 * theta / math.pi
    # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ... + 2.4..(dof-3)/(3.5..(dof-2)) cos^(dof-3)))
    term, total = 1.0, 1.0
    for j in range(1, (dof - 1) // 2):
        term *= cosine2 * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + sine * math.sqrt(cosine2) * total)


@functools.lru_cache(maxsize=256)
def t_quantile(confidence: float, dof: int) -> float:
    """The half-width factor ``t`` with ``P(|T| <= t) = confidence`` for Student's t with ``dof`` degrees of
    freedom (the ``(1 + confidence) / 2`` quantile), by bisection on the exact central probability."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    low, high = 0.0, 1.0
    while _t_central_probability(high, dof) < confidence:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        if _t_central_probability(middle, dof) < confidence:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Estimate:
    """A figure with its ``CONFIDENCE`` interval ``value +- half_width``.

    ``size`` samples are behind each of the ``repeats`` independent values the interval comes from
    (``size`` 1: a mean of per-sample values); ``values`` keeps those values for paired differences
    (``None`` for an exact value, which has ``half_width`` 0).
    """

    value: float
    half_width: float
    size: int
    repeats: int
    values: Tensor | None = None

    @property
    def low(self) -> float:
        return self.value - self.half_width

    @property
    def high(self) -> float:
        return self.value + self.half_width

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``"0.123 ± 0.004"`` (``signed``: ``"+0.123 ± 0.004"``)."""
        sign = "+" if signed else ""
        return f"{self.value:{sign}.{digits}f} ± {self.half_width:.{digits}f}"


def exact(value: float) -> Estimate:
    """A value known without sampling error (e.g. a population quantity of the mixture)."""
    return Estimate(float(value), 0.0, 0, 0)


def estimate(values: Tensor, size: int = 1, confidence: float = CONFIDENCE) -> Estimate:
    """Mean of independent ``values`` ``(R,)`` with the Student-t interval ``t_{R-1} s / sqrt(R)``
    (``s`` the sample standard deviation); ``size`` samples are behind each value. One value has an
    infinite half-width."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
    repeats = values.numel()
    if repeats == 0:
        raise ValueError("an estimate needs at least one value")
    if not torch.isfinite(values).all():
        raise ValueError("an estimate needs finite values")
    mean = float(values.mean())
    if repeats == 1:
        return Estimate(mean, math.inf, size, 1, values)
    half_width = t_quantile(confidence, repeats - 1) * float(values.std()) / math.sqrt(repeats)
    return Estimate(mean, half_width, size, repeats, values)


def paired_difference(a: Estimate, b: Estimate, scale: float = 1.0, confidence: float = CONFIDENCE) -> Estimate:
    """``E[a - scale * b]`` from the per-repeat differences of two figures measured on paired repeats
    (the same noises and the same reference sets and projections in each repeat)."""
    if a.values is None or b.values is None:
        raise ValueError("a paired difference needs the per-repeat values of both figures")
    if a.values.shape != b.values.shape or a.size != b.size:
        raise ValueError(f"paired figures need the same repeats: {a.repeats} x {a.size} vs {b.repeats} x {b.size}")
    return estimate(a.values - scale * b.values, a.size, confidence)


def verdict(difference: Estimate) -> str:
    """``"higher"`` or ``"lower"`` when the interval of a difference excludes 0, else ``"no difference"``."""
    if difference.low > 0:
        return "higher"
    if difference.high < 0:
        return "lower"
    return "no difference"


def judge(figure: Estimate, bound: float, at_most: bool = True) -> str:
    """A goal ``figure <= bound`` (or ``>= bound`` with ``at_most=False``) judged on the interval:
    ``"met"`` when the whole interval satisfies it, ``"missed"`` when the whole interval violates it,
    ``"undecided"`` when the interval straddles the bound."""
    if at_most:
        inside, outside = figure.high <= bound, figure.low > bound
    else:
        inside, outside = figure.low >= bound, figure.high < bound
    return "met" if inside else "missed" if outside else "undecided"


def share_interval(count: Tensor, total: int, confidence: float = CONFIDENCE) -> tuple[Tensor, Tensor]:
    """Wilson score interval ``(low, high)`` of proportions ``count / total`` (elementwise):
    ``(p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)`` with ``z`` the normal quantile."""
    if total < 1:
        raise ValueError("a share needs at least one sample")
    z = math.sqrt(2) * float(torch.special.erfinv(torch.tensor(confidence, dtype=torch.float64)))
    p = torch.as_tensor(count, dtype=torch.float64) / total
    centre = p + z**2 / (2 * total)
    spread = z * torch.sqrt(p * (1 - p) / total + z**2 / (4 * total**2))
    denominator = 1 + z**2 / total
    return (centre - spread) / denominator, (centre + spread) / denominator
