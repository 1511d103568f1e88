"""Metrics on cases with known answers: identical and shifted distributions for the sliced
Wasserstein distance, Gaussians of known entropy for the NLL, and hand-built mode histograms."""
from __future__ import annotations

import math

import pytest
import torch

from distill_core.reference.demo import demo_mixture
from distill_core.reference.metrics import (
    data_nll,
    evaluate_samples,
    expected_mode_shares,
    mean_nll,
    mode_assignment,
    mode_entropy,
    mode_recall,
    nll_gap,
    sliced_wasserstein,
)
from distill_core.reference.mixture import GaussianMixture


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_nll_per_element(std: float) -> float:
    return 0.5 * math.log(2 * math.pi * std**2) + 0.5


def test_swd_of_identical_sets_is_zero_and_of_fresh_draws_small() -> None:
    a = torch.randn(2000, 16, generator=seeded(0), dtype=torch.float64)
    assert sliced_wasserstein(a, a.clone(), generator=seeded(1)) == 0.0
    assert sliced_wasserstein(a, a[torch.randperm(2000, generator=seeded(2))], generator=seeded(1)) < 1e-12
    b = torch.randn(2000, 16, generator=seeded(3), dtype=torch.float64)
    assert sliced_wasserstein(a, b, generator=seeded(1)) < 0.1  # finite-sample floor, about 0.06 at n = 2000


def test_swd_of_shifted_gaussians_is_shift_norm_over_sqrt_dim() -> None:
    """For every direction theta the 1-D W2 of a shift m is |theta . m|; its mean square over the sphere is |m|^2 / D."""
    dim = 16
    shift = torch.zeros(dim, dtype=torch.float64)
    shift[:4] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    expected = float(shift.norm()) / math.sqrt(dim)
    a = torch.randn(1000, dim, generator=seeded(4), dtype=torch.float64)
    # Relative Monte-Carlo error over 1024 directions: about sqrt(2 / 1024) / 2 = 2.2%.
    exact_shift = sliced_wasserstein(a, a + shift, 1024, seeded(5))
    assert exact_shift == pytest.approx(expected, rel=0.07)
    b = torch.randn(1000, dim, generator=seeded(6), dtype=torch.float64) + shift
    assert sliced_wasserstein(a, b, 1024, seeded(5)) == pytest.approx(expected, rel=0.07)
    # Latent-shaped inputs are flattened the same way.
    assert sliced_wasserstein(a.reshape(-1, 4, 2, 2), (a + shift).reshape(-1, 4, 2, 2), 1024, seeded(5)) == pytest.approx(exact_shift)


def test_swd_matches_quantiles_for_unequal_sizes() -> None:
    """In 1-D the distance is the exact W2 of the quantile functions: N(0, 1) vs N(0, 2^2) -> |1 - 2| = 1."""
    normal = torch.distributions.Normal(0.0, 1.0)
    small = normal.icdf((torch.arange(1000, dtype=torch.float64) + 0.5) / 1000).reshape(-1, 1)
    large = normal.icdf((torch.arange(3000, dtype=torch.float64) + 0.5) / 3000).reshape(-1, 1)
    assert sliced_wasserstein(small, large, 8, seeded(7)) < 0.01  # only the extreme quantiles differ
    assert sliced_wasserstein(small, 2 * large, 8, seeded(7)) == pytest.approx(1.0, abs=0.02)
    assert sliced_wasserstein(small, large + 0.3, 8, seeded(7)) == pytest.approx(0.3, abs=2e-3)
    with pytest.raises(ValueError):
        sliced_wasserstein(small, torch.zeros(5, 2))


def test_nll_of_one_gaussian_is_its_entropy_per_element() -> None:
    mixture = GaussianMixture(torch.randn(1, 2, 4, 4, generator=seeded(8), dtype=torch.float64), 0.4)
    expected = gaussian_nll_per_element(0.4)
    assert data_nll(mixture) == pytest.approx(expected, abs=1e-12)  # one component: no Monte-Carlo term
    samples, _ = mixture.sample(4000, seeded(9))
    standard_error = 1 / math.sqrt(2 * 4000 * mixture.dim)
    assert mean_nll(samples, mixture) == pytest.approx(expected, abs=4 * standard_error)


def test_data_nll_of_the_demo_mixture_adds_the_mode_entropy() -> None:
    """Well-separated equal modes: entropy per element = Gaussian part + log(K) / D (log 2 / D within a class)."""
    mixture = demo_mixture()
    gaussian = gaussian_nll_per_element(0.25)
    assert data_nll(mixture) == pytest.approx(gaussian + math.log(8) / 256, abs=1e-6)
    class_ids = torch.tensor([0, 1, 1, 3])
    assert data_nll(mixture, class_ids) == pytest.approx(gaussian + math.log(2) / 256, abs=1e-6)
    samples, _ = mixture.sample(2048, seeded(10))
    assert nll_gap(samples, mixture) == pytest.approx(0.0, abs=4 / math.sqrt(2 * 2048 * 256))


@pytest.mark.parametrize("std_scale", [0.8, 1.2])
def test_nll_gap_of_rescaled_modes_has_its_closed_form(std_scale: float) -> None:
    """Samples from N(mu, (c s)^2) scored under N(mu, s^2): the gap per element is (c^2 - 1) / 2."""
    mixture = demo_mixture()
    samples, _ = mixture.sharpened(keep=range(8), std_scale=std_scale).sample(2048, seeded(11))
    assert nll_gap(samples, mixture) == pytest.approx((std_scale**2 - 1) / 2, abs=0.005)


def test_class_conditional_nll_gap_of_class_samples_is_zero() -> None:
    mixture = demo_mixture()
    class_ids = torch.arange(2048) % 4
    samples, _ = mixture.sample(2048, seeded(12), class_ids)
    assert nll_gap(samples, mixture, class_ids) == pytest.approx(0.0, abs=4 / math.sqrt(2 * 2048 * 256))
    # Samples of the wrong class are far from that class's data.
    assert nll_gap(samples, mixture, (class_ids + 1) % 4) > 1.0


def test_mode_assignment_recovers_the_generating_component() -> None:
    mixture = demo_mixture()
    samples, components = mixture.sample(512, seeded(13))
    assert torch.equal(mode_assignment(samples, mixture), components)


def _samples_with_counts(mixture: GaussianMixture, counts: list[int]) -> torch.Tensor:
    generator = seeded(14)
    parts = [
        mixture.means[k] + mixture.stds[k] * torch.randn(count, *mixture.latent_shape, generator=generator, dtype=torch.float64)
        for k, count in enumerate(counts)
    ]
    return torch.cat(parts)


def test_mode_metrics_on_hand_built_histograms() -> None:
    mixture = demo_mixture()
    collapsed = _samples_with_counts(mixture, [0, 0, 0, 200, 0, 0, 0, 0])
    assert mode_entropy(collapsed, mixture).samples == pytest.approx(0.0)
    assert mode_recall(collapsed, mixture) == pytest.approx(1 / 8)
    uniform = _samples_with_counts(mixture, [25] * 8)
    assert mode_entropy(uniform, mixture) == pytest.approx((1.0, 1.0))
    assert mode_recall(uniform, mixture) == 1.0
    half = _samples_with_counts(mixture, [50, 0, 50, 0, 50, 0, 50, 0])
    assert mode_entropy(half, mixture).samples == pytest.approx(math.log(4) / math.log(8))
    assert mode_recall(half, mixture) == 0.5
    # The threshold: a share of at least min_fraction x weight (0.25 x 1/8 = 1/32 of 800 samples = 25).
    assert mode_recall(_samples_with_counts(mixture, [26] + [111] * 7), mixture) == 1.0
    assert mode_recall(_samples_with_counts(mixture, [24] + [111] * 7), mixture) == pytest.approx(7 / 8)
    assert mode_recall(_samples_with_counts(mixture, [60] + [111] * 7), mixture, min_fraction=0.6) == pytest.approx(7 / 8)


def test_mode_metrics_follow_weights_and_classes() -> None:
    mixture = demo_mixture().reweighted(torch.tensor([4.0, 2, 1, 1, 1, 1, 1, 1]).log())
    weights = mixture.weights
    data_entropy = float(-(weights * weights.log()).sum() / math.log(8))
    samples, _ = mixture.sample(1200, seeded(15))
    entropy = mode_entropy(samples, mixture)
    assert entropy.data == pytest.approx(data_entropy)
    assert entropy.samples == pytest.approx(data_entropy, abs=0.02)
    class_ids = torch.zeros(100, dtype=torch.long)
    torch.testing.assert_close(expected_mode_shares(mixture, class_ids)[:2], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    class_samples, _ = mixture.sample(100, seeded(16), class_ids)
    assert mode_recall(class_samples, mixture, class_ids) == 1.0
    assert mode_recall(class_samples, mixture) == pytest.approx(2 / 8)


def test_evaluate_samples_reports_data_like_and_collapsed_sets() -> None:
    mixture = demo_mixture()
    fresh, _ = mixture.sample(512, seeded(17))
    report = evaluate_samples(fresh, mixture, generator=seeded(18))
    assert set(report) == {"swd", "swd_data", "nll", "nll_data", "nll_gap", "mode_recall", "mode_entropy", "mode_entropy_data"}
    assert report["swd"] < 2 * report["swd_data"] and abs(report["nll_gap"]) < 0.01
    assert report["mode_recall"] == 1.0 and report["mode_entropy"] > 0.97
    collapsed, _ = mixture.sharpened(keep=[0, 3, 4, 7], std_scale=0.7).sample(512, seeded(19))
    report = evaluate_samples(collapsed, mixture, generator=seeded(18))
    assert report["mode_recall"] == 0.5 and report["mode_entropy"] == pytest.approx(2 / 3, abs=0.01)
    assert report["nll_gap"] == pytest.approx((0.49 - 1) / 2, abs=0.01)
    assert report["swd"] > 3 * report["swd_data"]


def test_evaluate_samples_refuses_non_finite_samples() -> None:
    mixture = demo_mixture()
    samples, _ = mixture.sample(8, seeded(3))
    samples[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="the samples contain NaN or inf"):
        evaluate_samples(samples, mixture, generator=seeded(4))
