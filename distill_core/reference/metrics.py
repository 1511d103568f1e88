"""Sample-quality and diversity metrics against an analytic mixture teacher (exact and cheap).

* :func:`sliced_wasserstein`: distance between two sample sets (quality; needs fresh data as reference).
* :func:`mean_nll` / :func:`nll_gap`: negative log-likelihood per latent element under the exact
  mixture, and its gap to the data's own expected value. A negative gap means samples sit where
  the density is higher than real data does: over-concentrated (diversity lost inside modes);
  a positive gap means off-manifold or blurred samples.
* :func:`mode_assignment`, :func:`mode_shares`, :func:`mode_recall`, :func:`mode_entropy`:
  diversity across the mixture's components (modes).

All metrics compute in float64 and return Python floats (or small tensors for per-mode data).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..spaces import require_finite
from .mixture import FactorizedMixture, GaussianMixture

Mixture = GaussianMixture | FactorizedMixture


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
def mean_nll(samples: Tensor, mixture: Mixture, class_ids: Tensor | None = None) -> float:
    """Mean negative log-likelihood of ``samples`` under the exact (class-conditional) mixture,
    in nats per latent element (``-log p(x) / (C H W)``, averaged over samples)."""
    return float(-_log_prob(samples, mixture, class_ids).mean() / mixture.dim)


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
    counts = torch.bincount(mode_assignment(samples, mixture), minlength=mixture.num_components)
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
def mode_recall(
    samples: Tensor, mixture: GaussianMixture, class_ids: Tensor | None = None, min_fraction: float = 0.25
) -> float:
    """Fraction of the reachable components (positive expected share) that are recalled: a component
    counts when its share of the samples is at least ``min_fraction`` times its expected share
    (see :func:`expected_mode_shares`). With 0.25, a balanced 8-mode mixture needs 1/32 of the
    samples in a mode; at n = 256 that is 8 samples against an expected 32, so sampling noise
    alone essentially never loses a mode, while a collapsed sampler does."""
    shares = mode_shares(samples, mixture).cpu()
    expected = expected_mode_shares(mixture, class_ids)
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


@torch.no_grad()
def evaluate_samples(
    samples: Tensor,
    mixture: Mixture,
    class_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    num_projections: int = 256,
) -> dict[str, float]:
    """All metrics for one sample set, with the data's own values for comparison.

    ``swd`` is measured against fresh data of the same size (and labels); ``swd_data`` is the
    same distance between two fresh data sets (the finite-sample floor). Mode metrics are only
    reported for a :class:`GaussianMixture` (a factorized mixture has no whole-latent modes). NaN/inf samples
    are refused (``ValueError``): every metric of them would be NaN or silently wrong.
    """
    require_finite(samples, "the samples")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = samples.shape[0]
    if class_ids is None:
        reference, _ = mixture.sample(n, generator)
        second_reference, _ = mixture.sample(n, generator)
    elif isinstance(mixture, GaussianMixture):
        labels = torch.as_tensor(class_ids).to(generator.device)
        reference, _ = mixture.sample(n, generator, labels)
        second_reference, _ = mixture.sample(n, generator, labels)
    else:
        raise ValueError("class_ids need a GaussianMixture with classes")
    samples = samples.to(torch.float64).to(reference.device)
    nll, reference_nll = mean_nll(samples, mixture, class_ids), data_nll(mixture, class_ids, generator=generator)
    result = {
        "swd": sliced_wasserstein(samples, reference, num_projections, generator),
        "swd_data": sliced_wasserstein(second_reference, reference, num_projections, generator),
        "nll": nll,
        "nll_data": reference_nll,
        "nll_gap": nll - reference_nll,
    }
    if isinstance(mixture, GaussianMixture):
        entropy = mode_entropy(samples, mixture, class_ids)
        result |= {
            "mode_recall": mode_recall(samples, mixture, class_ids),
            "mode_entropy": entropy.samples,
            "mode_entropy_data": entropy.data,
        }
    return result
