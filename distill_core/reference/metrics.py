"""Sample-quality and diversity metrics against an analytic mixture teacher, with confidence intervals.

Figures on one sample set:

* :func:`sliced_wasserstein`: distance between two sample sets (quality; needs fresh data as reference).
* :func:`nll_per_sample` / :func:`mean_nll` / :func:`nll_gap`: negative log-likelihood per latent element
  under the exact mixture, and its gap to the data's own expected value. A negative gap means samples sit
  where the density is higher than real data does: over-concentrated (diversity lost inside modes);
  a positive gap means off-manifold or blurred samples.
* :func:`mode_assignment`, :func:`mode_shares`, :func:`mode_total_variation`, :func:`mode_recall`,
  :func:`mode_entropy`: diversity across the mixture's components (modes).
* :func:`mode_moment_errors`: each mode's mean shift and covariance error against its exact component.
* :func:`endpoint_error`: per-sample distance to the exact probability-flow ODE solution from the same
  noise (deterministic samplers).

:func:`evaluate` scores a sample set in independent repeats (see :mod:`.statistics` for why
repeats and not a bootstrap) and returns every figure as a :class:`~.statistics.Estimate`.

**Sample sizes** (measured on the demo mixture, class "disc": two modes of 4x8x8 latents, 256 projections,
8 repeats; Stride's benchmarks use 8 repeats of 256 samples). SWD is the noisy figure: one set of ``n`` data
samples against a fresh reference scores 0.30 / 0.25 / 0.19 / 0.15 at n = 128 / 256 / 512 / 1024 with a
draw-to-draw standard deviation of 0.15 / 0.11 / 0.08 / 0.07 (the set's mode mix), so 8 repeats of 256 give a
half-width of about 0.09 on one row, and the difference of two *unpaired* rows (e.g. a sampler against fresh
data) varies by 0.15 per repeat: resolving an unpaired SWD difference of 0.05 takes about 35 repeats of 256
or 11 of 1024, roughly 10^4 samples per row. *Paired* rows (same noises, same references and projections per
repeat) differ by a far steadier amount: 8 repeats of 256 resolve SWD differences of 0.001-0.02 between
samplers on the analytic teacher and 0.03-0.05 on the demo UNet (whose samples follow the noise less
closely). The low-variance figures need far fewer samples: at 2048 samples the NLL gap's 95% half-width is
0.002-0.004 nats per element for samples close to the data (0.02-0.06 for the demo UNet's heavier-tailed
ones), the mode total variation's 0.01-0.03, the per-mode mean shift's 0.0001-0.001, the covariance error's
0.005-0.05, and the endpoint error's under 1% of its value on the analytic teacher (8% on the demo UNet).

All metrics compute in float64 and return Python floats, small tensors for per-mode data, or (:func:`evaluate`)
estimates with intervals.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..spaces import require_finite
from .mixture import FactorizedMixture, GaussianMixture
from .statistics import Estimate, estimate

Mixture = GaussianMixture | FactorizedMixture
REPEATS = 8
"""Independent repeats of :func:`evaluate` (disjoint sample groups, each with its own fresh reference)."""
MIN_SAMPLES = 4
"""The fewest samples :func:`evaluate` scores: 2 repeats of 2 (an interval needs two repeats, SWD two samples)."""


def _empirical_quantiles(sorted_values: Tensor, levels: Tensor) -> Tensor:
    """Linear-interpolated quantiles of row-wise sorted samples ``(P, n)`` at ``levels`` ``(m,)``
    (level ``(i + 0.5) / n`` hits the i-th sorted value exactly)."""
    n = sorted_values.shape[1]
    position = (levels * n - 0.5).clamp(0, n - 1)
    low = position.floor().long()
    high = position.ceil().long()
    weight = position - low
    return (1 - weight) * sorted_values[:, low] + weight * sorted_values[:, high]


@torch.no_grad()  # measurements: never part of a graph
def sliced_wasserstein(
    a: Tensor, b: Tensor, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 2-Wasserstein distance ``sqrt(E_theta W2^2(theta.a, theta.b))`` between sample sets.

    Samples are flattened to vectors; ``theta`` are ``num_projections`` random unit directions
    (drawn with ``generator``, on its device). Each 1-D W2 compares the sorted projections; sets of
    different sizes are compared at ``max(n_a, n_b)`` quantile levels (linear interpolation). For
    two Gaussians differing by a shift ``m`` in ``D`` dimensions the value is ``|m| / sqrt(D)``.
    A finite-sample floor remains between two independent draws of the same distribution: compare
    against the data-vs-data value at the same sizes.
    """
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(a.device, torch.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    device = generator.device if generator is not None else a.device
    directions = torch.randn(a.shape[1], num_projections, generator=generator, device=device, dtype=torch.float64)
    directions = (directions / directions.norm(dim=0, keepdim=True)).to(a.device)
    projected_a = (directions.T @ a.T).sort(dim=1).values  # (P, n): sorting along the last dim is fast
    projected_b = (directions.T @ b.T).sort(dim=1).values
    m = max(a.shape[0], b.shape[0])
    levels = (torch.arange(m, dtype=torch.float64, device=a.device) + 0.5) / m
    difference = _empirical_quantiles(projected_a, levels) - _empirical_quantiles(projected_b, levels)
    return float(difference.pow(2).mean().sqrt())


def _log_prob(samples: Tensor, mixture: Mixture, class_ids: Tensor | None) -> Tensor:
    if class_ids is None:
        return mixture.log_prob(samples.to(torch.float64))
    if not isinstance(mixture, GaussianMixture):
        raise ValueError("class_ids need a GaussianMixture with classes")
    return mixture.log_prob(samples.to(torch.float64), class_ids)


@torch.no_grad()
def nll_per_sample(samples: Tensor, mixture: Mixture, class_ids: Tensor | None = None) -> Tensor:
    """Negative log-likelihood of each sample under the exact (class-conditional) mixture, in nats per
    latent element (``-log p(x) / (C H W)``), ``(n,)`` float64."""
    return -_log_prob(samples, mixture, class_ids).to(torch.float64) / mixture.dim


@torch.no_grad()
def mean_nll(samples: Tensor, mixture: Mixture, class_ids: Tensor | None = None) -> float:
    """Mean of :func:`nll_per_sample`."""
    return float(nll_per_sample(samples, mixture, class_ids).mean())


@torch.no_grad()
def data_nll(
    mixture: Mixture,
    class_ids: Tensor | None = None,
    num_samples: int = 8192,
    generator: torch.Generator | None = None,
) -> float:
    """The data's own expected NLL in nats per latent element (its entropy per element), estimated
    with the mixture's low-variance ``expected_nll`` (seeded with 0 unless a generator is given)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if class_ids is None:
        total = mixture.expected_nll(num_samples=num_samples, generator=generator)
    elif isinstance(mixture, GaussianMixture):
        total = mixture.expected_nll(class_ids, num_samples=num_samples, generator=generator)
    else:
        raise ValueError("class_ids need a GaussianMixture with classes")
    return total / mixture.dim


@torch.no_grad()
def nll_gap(
    samples: Tensor,
    mixture: Mixture,
    class_ids: Tensor | None = None,
    num_reference: int = 8192,
    generator: torch.Generator | None = None,
) -> float:
    """``mean_nll(samples) - data_nll``: 0 for samples distributed like the data (up to sampling
    noise of about ``0.7 / sqrt(n D)`` per element for a mixture of well-separated Gaussians),
    negative when samples are over-concentrated on high-density regions, positive when they
    are off the data (blurred, shifted or noisy)."""
    return mean_nll(samples, mixture, class_ids) - data_nll(mixture, class_ids, num_reference, generator)


@torch.no_grad()
def mode_assignment(samples: Tensor, mixture: GaussianMixture) -> Tensor:
    """The most responsible component of each sample at sigma = 0 (``argmax_k log w_k + log N(x; mu_k, s_k^2)``
    over all components), ``(n,)`` long."""
    return mixture.component_log_likelihoods(samples.to(torch.float64)).argmax(dim=1)


@torch.no_grad()
def mode_shares(samples: Tensor, mixture: GaussianMixture) -> Tensor:
    """Fraction of samples assigned to each component, ``(K,)`` float64 summing to 1."""
    return _shares(mode_assignment(samples, mixture), mixture.num_components)


def _shares(assignment: Tensor, num_components: int) -> Tensor:
    counts = torch.bincount(assignment.cpu(), minlength=num_components)
    return counts.to(torch.float64) / counts.sum()


@torch.no_grad()
def expected_mode_shares(mixture: GaussianMixture, class_ids: Tensor | None = None) -> Tensor:
    """The shares data would have: the mixture weights, or for class-conditional samples the
    average of the given labels' conditional weights, ``(K,)`` float64."""
    if class_ids is None:
        return mixture.weights.cpu()
    class_ids = torch.as_tensor(class_ids).reshape(-1).cpu()
    return mixture.conditional_log_weights(class_ids.numel(), class_ids, torch.device("cpu")).exp().mean(dim=0)


@torch.no_grad()
def mode_total_variation(samples: Tensor, mixture: GaussianMixture, class_ids: Tensor | None = None) -> float:
    """Total-variation distance ``1/2 sum_k |share_k - expected_k|`` between the samples' mode histogram and
    the shares data would have (:func:`expected_mode_shares`): 0 for the right mode mix, 1 - w for a set
    collapsed onto one mode of weight w. A finite set of data scores ``E|share - w|`` above 0 (about
    ``sqrt(K / (2 pi n))`` for K equal modes)."""
    return _total_variation(mode_shares(samples, mixture).cpu(), expected_mode_shares(mixture, class_ids))


def _total_variation(shares: Tensor, expected: Tensor) -> float:
    return float((shares - expected).abs().sum() / 2)


@torch.no_grad()
def mode_recall(
    samples: Tensor, mixture: GaussianMixture, class_ids: Tensor | None = None, min_fraction: float = 0.25
) -> float:
    """Fraction of the reachable components (positive expected share) that are recalled: a component
    counts when its share of the samples is at least ``min_fraction`` times its expected share
    (see :func:`expected_mode_shares`). With 0.25, a balanced 8-mode mixture needs 1/32 of the
    samples in a mode; at n = 256 that is 8 samples against an expected 32, so sampling noise
    alone essentially never loses a mode, while a collapsed sampler does."""
    return _recall(mode_shares(samples, mixture).cpu(), expected_mode_shares(mixture, class_ids), min_fraction)


def _recall(shares: Tensor, expected: Tensor, min_fraction: float = 0.25) -> float:
    reachable = expected > 0
    recalled = shares[reachable] >= min_fraction * expected[reachable]
    return float(recalled.to(torch.float64).mean())


class ModeEntropy(NamedTuple):
    """Normalised entropies (in [0, 1]) of the samples' component histogram and of the data's own shares."""

    samples: float
    data: float


def _normalised_entropy(probabilities: Tensor, num_components: int) -> float:
    positive = probabilities[probabilities > 0]
    return float(-(positive * positive.log()).sum() / math.log(num_components))


@torch.no_grad()
def mode_entropy(samples: Tensor, mixture: GaussianMixture, class_ids: Tensor | None = None) -> ModeEntropy:
    """Entropy of the empirical component histogram divided by ``log K`` (1 = all K modes equally
    used, 0 = one mode), next to the same quantity for the expected shares (population value of
    the data; a finite sample of the data reads slightly lower, by about ``(K - 1) / (2 n log K)``)."""
    k = mixture.num_components
    return ModeEntropy(
        _normalised_entropy(mode_shares(samples, mixture), k),
        _normalised_entropy(expected_mode_shares(mixture, class_ids), k),
    )


class ModeMoments(NamedTuple):
    """Per-mode moment errors ``(K,)`` float64 of the samples assigned to each mode (NaN where too few)."""

    counts: Tensor
    mean_shift: Tensor
    covariance_error: Tensor


MIN_MEAN_SAMPLES = 2
MIN_COVARIANCE_SAMPLES = 4


@torch.no_grad()
def mode_moment_errors(samples: Tensor, mixture: GaussianMixture, assignment: Tensor | None = None) -> ModeMoments:
    """Each mode's first two moments against its exact component ``N(mu_k, s_k^2 I)``, in ``D`` dimensions.

    With the ``c`` samples assigned to mode k (:func:`mode_assignment`), ``y_i = x_i - mu_k`` and their
    Gram matrix ``G = y y^T``, both figures are unbiased (0 in expectation for data):

    * ``mean_shift_k = ||E[x | k] - mu_k||^2 / (s_k^2 D)``, estimated by the mean of ``G_ij`` over
      ``i != j`` (needs ``c >= 2``);
    * ``covariance_error_k = ||Cov_k - s_k^2 I||_F^2 / (s_k^4 D)``, with ``tr Cov`` from the sample
      covariance and ``tr Cov^2`` from the U-statistic of Chen, Zhang & Zhong (2010, "Tests for
      high-dimensional covariance matrices", JASA): ``sum' G_ij^2 / P2 - 2 sum' G_ij G_jk / P3 +
      sum' G_ij G_kl / P4`` over distinct indices, ``Pm = c! / (c - m)!`` (needs ``c >= 4``). No
      plug-in estimate would do: with tens of samples per mode in ``D = 256`` the sample covariance's
      own error is several times ``s_k^2``.

    ``assignment`` (from :func:`mode_assignment`) saves computing it again.
    """
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    assignment = (mode_assignment(samples, mixture) if assignment is None else assignment).to(x.device)
    means = mixture.means.reshape(mixture.num_components, -1).to(x.device)
    variances = mixture.stds.to(x.device) ** 2
    dim = x.shape[1]
    k = mixture.num_components
    counts = torch.bincount(assignment, minlength=k).cpu()
    mean_shift = torch.full((k,), math.nan, dtype=torch.float64)
    covariance_error = torch.full((k,), math.nan, dtype=torch.float64)
    for mode in range(k):
        c = int(counts[mode])
        if c < MIN_MEAN_SAMPLES:
            continue
        y = x[assignment == mode] - means[mode]
        gram = y @ y.T
        off = gram - torch.diag(gram.diagonal())
        pairs = c * (c - 1)
        mean_shift[mode] = float(off.sum() / pairs / (variances[mode] * dim))
        if c < MIN_COVARIANCE_SAMPLES:
            continue
        squares = (off**2).sum()
        row = off.sum(dim=1)
        paths = (row**2 - (off**2).sum(dim=1)).sum()  # sum over distinct i, j, k of G_ij G_jk
        quads = off.sum() ** 2 - 2 * squares - 4 * paths  # sum over distinct i, j, k, l of G_ij G_kl
        trace_square = squares / pairs - 2 * paths / (pairs * (c - 2)) + quads / (pairs * (c - 2) * (c - 3))
        trace = (gram.diagonal().sum() - gram.sum() / c) / (c - 1)  # tr of the unbiased sample covariance
        s2 = variances[mode]
        covariance_error[mode] = float((trace_square - 2 * s2 * trace + s2**2 * dim) / (s2**2 * dim))
    return ModeMoments(counts, mean_shift, covariance_error)


def _count_weighted(values: Tensor, counts: Tensor) -> float:
    """The count-weighted mean of the per-mode ``values`` that are defined (NaN if none is)."""
    defined = ~values.isnan()
    if not defined.any():
        return math.nan
    weights = counts[defined].to(torch.float64)
    return float((values[defined] * weights).sum() / weights.sum())


@torch.no_grad()
def endpoint_error(samples: Tensor, exact: Tensor) -> Tensor:
    """Root-mean-square difference per latent element between each sample and the exact solution from
    the same noise (e.g. ``GaussianMixture.flow_map`` of the sampler's initial latent), ``(n,)`` float64."""
    if samples.shape != exact.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and exact endpoints {tuple(exact.shape)} differ in shape")
    difference = samples.to(torch.float64) - exact.to(samples.device, torch.float64)
    return difference.reshape(samples.shape[0], -1).pow(2).mean(dim=1).sqrt()


def repeat_groups(n: int, repeats: int, class_ids: Tensor | None = None) -> list[Tensor]:
    """``repeats`` disjoint groups of the indices ``0..n-1`` (sizes differ by at most one), with the same mix
    of labels: indices sorted by label (stably) and dealt in turn. Depends only on ``n`` and the labels, so
    two sample sets with the same labels are split alike (paired repeats)."""
    if repeats < 1 or n < 2 * repeats:
        raise ValueError(f"{n} samples cannot form {repeats} repeats of at least 2 samples")
    order = torch.arange(n) if class_ids is None else torch.as_tensor(class_ids).reshape(-1).cpu().argsort(stable=True)
    return [order[start::repeats] for start in range(repeats)]


def _draw_data(mixture: Mixture, n: int, generator: torch.Generator, labels: Tensor | None) -> Tensor:
    if labels is None:
        return mixture.sample(n, generator)[0]
    if not isinstance(mixture, GaussianMixture):
        raise ValueError("class_ids need a GaussianMixture with classes")
    return mixture.sample(n, generator, labels)[0]


@torch.no_grad()
def evaluate(
    samples: Tensor,
    mixture: Mixture,
    class_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    repeats: int = REPEATS,
    num_projections: int = 256,
    exact_endpoints: Tensor | None = None,
) -> dict[str, Estimate]:
    """Every figure of a sample set with its 95% interval, from ``repeats`` independent repeats.

    The samples (iid, e.g. one batch from independent noises) are split into ``repeats`` disjoint groups of
    about ``n / repeats`` (:func:`repeat_groups`; fewer when ``n < 2 repeats``: at least 2 groups of 2 samples).
    Each group is scored against its own fresh data set of the same size and labels, with fresh projections,
    drawn from ``generator`` (seed 0 unless given). Score two sample sets with the same seed and labels and
    their repeats are paired (:func:`~.statistics.paired_difference`).

    Figures per repeat (value = mean over repeats, interval over repeats): ``swd`` (to the fresh data),
    ``swd_data`` (a second fresh data set to the same reference: the finite-sample floor); for a
    :class:`GaussianMixture` also ``mode_tv`` (:func:`mode_total_variation`) with ``mode_tv_data`` (the
    second data set's), ``mode_recall``, ``mode_entropy`` with ``mode_entropy_data``, and the
    count-weighted ``mode_mean_shift`` and ``mode_cov_error`` (:func:`mode_moment_errors`; left out when a
    repeat has no mode with enough samples). Figures per sample (interval over all samples): ``nll_gap``
    and, with ``exact_endpoints`` (the exact ODE solution from each sample's own noise), ``endpoint_error``.
    NaN/inf samples are refused (``ValueError``): every figure of them would be NaN or silently wrong.
    """
    require_finite(samples, "the samples")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = samples.shape[0]
    if n < MIN_SAMPLES:
        raise ValueError(f"an interval needs at least {MIN_SAMPLES} samples (2 repeats of 2); got {n}")
    repeats = min(repeats, n // 2)
    labels = None if class_ids is None else torch.as_tensor(class_ids).reshape(-1).to(generator.device)
    if labels is not None and (labels.numel() != n or not isinstance(mixture, GaussianMixture)):
        raise ValueError("class_ids need a GaussianMixture with classes and one label per sample")
    samples = samples.to(generator.device, torch.float64)
    groups = repeat_groups(n, repeats, labels)
    per_repeat: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        per_repeat.setdefault(name, []).append(value)

    for group in groups:
        group = group.to(generator.device)
        group_labels = None if labels is None else labels[group]
        x = samples[group]
        reference = _draw_data(mixture, len(group), generator, group_labels)
        second = _draw_data(mixture, len(group), generator, group_labels)
        add("swd", sliced_wasserstein(x, reference, num_projections, generator))
        add("swd_data", sliced_wasserstein(second, reference, num_projections, generator))
        if isinstance(mixture, GaussianMixture):
            expected = expected_mode_shares(mixture, group_labels)
            assignment = mode_assignment(x, mixture)
            shares = _shares(assignment, mixture.num_components)
            data_shares = _shares(mode_assignment(second, mixture), mixture.num_components)
            add("mode_tv", _total_variation(shares, expected))
            add("mode_tv_data", _total_variation(data_shares, expected))
            add("mode_recall", _recall(shares, expected))
            add("mode_entropy", _normalised_entropy(shares, mixture.num_components))
            add("mode_entropy_data", _normalised_entropy(data_shares, mixture.num_components))
            moments = mode_moment_errors(x, mixture, assignment)
            add("mode_mean_shift", _count_weighted(moments.mean_shift, moments.counts))
            add("mode_cov_error", _count_weighted(moments.covariance_error, moments.counts))
    size = n // repeats
    report = {name: estimate(torch.tensor(values), size) for name, values in per_repeat.items()
              if not any(math.isnan(value) for value in values)}
    gap = nll_per_sample(samples, mixture, labels) - data_nll(mixture, labels, generator=generator)
    report["nll_gap"] = estimate(gap)
    if exact_endpoints is not None:
        report["endpoint_error"] = estimate(endpoint_error(samples, exact_endpoints))
    return report


def flatten(report: dict[str, Estimate]) -> dict[str, float | int]:
    """A report as plain numbers (e.g. for JSON): ``name`` = value and ``name_pm`` = 95% half-width of
    every figure, and ``repeats`` (of the repeat-based figures)."""
    flat: dict[str, float | int] = {}
    for name, figure in report.items():
        flat[name] = figure.value
        flat[f"{name}_pm"] = figure.half_width
    flat["repeats"] = max(figure.repeats for figure in report.values() if figure.size > 1)
    return flat


@torch.no_grad()
def evaluate_samples(
    samples: Tensor,
    mixture: Mixture,
    class_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    repeats: int = REPEATS,
    num_projections: int = 256,
) -> dict[str, float | int]:
    """:func:`evaluate` as plain numbers (:func:`flatten`)."""
    return flatten(evaluate(samples, mixture, class_ids, generator, repeats, num_projections))
