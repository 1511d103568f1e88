"""The analytic teacher against independent computations: grid integration of the posterior,
Tweedie's identity on the exact marginal density, the closed-form flow map of one Gaussian,
an equivalent product mixture, ComfyUI's own prediction conversions, and sampling from the
probability-flow ODE."""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

from distill_core.reference.demo import SD15_LATENT_RGB_FACTORS, demo_mixture, latent_to_rgb
from distill_core.reference.metrics import data_nll, mean_nll, sliced_wasserstein
from distill_core.reference.mixture import FactorizedMixture, GaussianMixture
from distill_core.reference.ode import solve_probability_flow
from distill_core.spaces import NoiseSpace, prediction_target, scaled_linear_alphas_cumprod, x0_from_prediction

COMFYUI = Path(__file__).resolve().parents[2] / ".cache" / "ComfyUI"
VE = NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
FLOW = NoiseSpace.flow()
SIGMA_MAX = float(VE.sigma_table[-1])


def tiny_mixture() -> GaussianMixture:
    """Three 2-D components (latent 1x1x2) with different stds and weights, in two classes."""
    means = torch.tensor([[-1.5, 0.5], [1.0, 1.2], [0.3, -1.4]], dtype=torch.float64).reshape(3, 1, 1, 2)
    return GaussianMixture(
        means, torch.tensor([0.35, 0.5, 0.3]), torch.tensor([0.5, 0.3, 0.2]).log(), classes=torch.tensor([0, 1, 0])
    )


def grid_prior(mixture_means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor,
               points: torch.Tensor) -> torch.Tensor:
    """Per-component weighted densities ``w_k N(z; mu_k, s_k^2 I)`` at 2-D ``points`` ``(P, 2)``, written out by
    hand."""
    mu = mixture_means.reshape(-1, 2)
    squared = ((points.unsqueeze(1) - mu) ** 2).sum(dim=2)
    return weights * torch.exp(-squared / (2 * stds**2)) / (2 * math.pi * stds**2)


GRID_STEP = 0.03
GRID_AXIS = torch.arange(-4.5, 4.5 + GRID_STEP / 2, GRID_STEP, dtype=torch.float64)
GRID = torch.cartesian_prod(GRID_AXIS, GRID_AXIS)


@pytest.mark.parametrize(
    "space, sigma, class_id",
    [(VE, 0.3, None), (VE, 2.0, None), (VE, 0.8, 0), (FLOW, 0.2, None), (FLOW, 0.6, 1), (FLOW, 0.95, None)],
)
def test_posterior_equals_grid_integration(space: NoiseSpace, sigma: float, class_id: int | None) -> None:
    mixture = tiny_mixture()
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    if class_id is not None:
        weights = weights * (mixture.classes == class_id)
        weights = weights / weights.sum()
    x = torch.tensor([[[[0.4, -0.2]]], [[[-1.0, 1.5]]], [[[2.0, 0.1]]]], dtype=torch.float64)
    class_ids = None if class_id is None else torch.full((3,), class_id)
    a, b = space.coefficients(torch.tensor(sigma, dtype=torch.float64))
    prior = grid_prior(mixture.means, mixture.stds, weights, GRID)  # (P, K)
    for i in range(3):
        likelihood = torch.exp(-((x[i].reshape(2) - a * GRID) ** 2).sum(dim=1) / (2 * b**2))
        joint = prior * likelihood.unsqueeze(1)
        evidence = joint.sum()
        expected_mean = (joint.sum(dim=1, keepdim=True) * GRID).sum(dim=0) / evidence
        expected_second_moment = (joint.sum(dim=1) * (GRID**2).sum(dim=1)).sum() / evidence
        expected_responsibilities = joint.sum(dim=0) / evidence

        denoised = mixture.denoise(x[i : i + 1], sigma, space, class_ids if class_ids is None else class_ids[:1])
        posterior = mixture.posterior(x[i : i + 1], sigma, space, None if class_ids is None else class_ids[:1])
        second_moment = (
            posterior.responsibilities[0]
            * ((posterior.means[0].reshape(3, -1) ** 2).sum(dim=1) + 2 * posterior.variances[0])
        ).sum()
        torch.testing.assert_close(denoised.reshape(2), expected_mean, rtol=0, atol=1e-7)
        torch.testing.assert_close(posterior.responsibilities[0], expected_responsibilities, rtol=0, atol=1e-7)
        torch.testing.assert_close(second_moment, expected_second_moment, rtol=0, atol=1e-6)


def test_log_densities_integrate_to_one() -> None:
    mixture = tiny_mixture()
    points = GRID.reshape(-1, 1, 1, 2)
    cell = GRID_STEP**2
    assert float(mixture.log_prob(points).exp().sum() * cell) == pytest.approx(1.0, abs=1e-6)
    class_one = torch.ones(points.shape[0], dtype=torch.long)
    assert float(mixture.log_prob(points, class_one).exp().sum() * cell) == pytest.approx(1.0, abs=1e-6)
    # The noisy marginal p_t is a density of x: at flow sigma 0.3, x = 0.7 x0 + 0.3 eps.
    assert float(mixture.marginal_log_prob(points, 0.3, FLOW).exp().sum() * cell) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("space, sigma", [(VE, 0.4), (VE, 5.0), (FLOW, 0.3), (FLOW, 0.9)])
def test_tweedie_identity(space: NoiseSpace, sigma: float) -> None:
    """E[x0 | x] = (x + b^2 grad log p_t(x)) / a, with the gradient taken by autograd."""
    mixture = demo_mixture()
    generator = torch.Generator().manual_seed(3)
    x0, _ = mixture.sample(16, generator)
    x = space.noise(x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64), sigma).requires_grad_(True)
    class_ids = torch.arange(16) % 4
    (score,) = torch.autograd.grad(mixture.marginal_log_prob(x, sigma, space, class_ids).sum(), x)
    a, b = space.coefficients(torch.tensor(sigma, dtype=torch.float64))
    torch.testing.assert_close(
        mixture.denoise(x.detach(), sigma, space, class_ids), (x.detach() + b**2 * score) / a, rtol=0, atol=1e-9
    )


def test_class_conditional_denoiser_is_the_sub_mixture_denoiser() -> None:
    mixture = demo_mixture()
    class_two = mixture.classes == 2
    sub_mixture = GaussianMixture(mixture.means[class_two], mixture.stds[class_two])
    generator = torch.Generator().manual_seed(4)
    x = 3 * torch.randn(8, 4, 8, 8, generator=generator, dtype=torch.float64)
    class_ids = torch.full((8,), 2)
    conditional = mixture.denoise(x, 2.0, VE, class_ids)
    torch.testing.assert_close(conditional, sub_mixture.denoise(x, 2.0, VE), rtol=0, atol=1e-12)
    unconditional = mixture.denoise(x, 2.0, VE)
    assert (conditional - unconditional).abs().max() > 0.1
    torch.testing.assert_close(mixture.cfg_denoise(x, 2.0, VE, class_ids, 1.0), conditional, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        mixture.cfg_denoise(x, 2.0, VE, class_ids, 3.0), unconditional + 3 * (conditional - unconditional), rtol=0,
        atol=1e-12
    )
    # A negative label means "unconditional" for that sample.
    torch.testing.assert_close(mixture.denoise(x, 2.0, VE, torch.full((8,), -1)), unconditional, rtol=0, atol=1e-12)


def test_sampling_follows_weights_and_classes() -> None:
    mixture = tiny_mixture()
    generator = torch.Generator().manual_seed(5)
    x0, components = mixture.sample(20000, generator)
    shares = torch.bincount(components, minlength=3).double() / 20000
    torch.testing.assert_close(shares, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), rtol=0, atol=0.015)
    first = x0[components == 1].reshape(-1, 2)
    torch.testing.assert_close(first.mean(dim=0), torch.tensor([1.0, 1.2], dtype=torch.float64), rtol=0, atol=0.03)
    assert float(first.std()) == pytest.approx(0.5, abs=0.02)
    _, conditional = mixture.sample(2000, generator, torch.zeros(2000, dtype=torch.long))
    assert set(conditional.tolist()) == {0, 2}


@pytest.mark.parametrize("space, sigma", [(VE, SIGMA_MAX), (VE, 1.0), (FLOW, 1.0), (FLOW, 0.5)])
def test_flow_map_of_one_gaussian_matches_closed_form(space: NoiseSpace, sigma: float) -> None:
    """For N(mu, s^2 I) the probability-flow ODE maps x to mu + s (x - a mu) / sqrt(a^2 s^2 + b^2)."""
    generator = torch.Generator().manual_seed(6)
    mu = torch.randn(1, 4, 4, 4, generator=generator, dtype=torch.float64)
    mixture = GaussianMixture(mu, 0.25)
    x0, _ = mixture.sample(64, generator)
    x = space.noise(x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64), sigma)
    a, b = space.coefficients(torch.tensor(sigma, dtype=torch.float64))
    exact = mu + 0.25 * (x - a * mu) / torch.sqrt(a**2 * 0.25**2 + b**2)
    torch.testing.assert_close(mixture.flow_map(x, sigma, space), exact, rtol=0, atol=5e-6)
    # Fewer steps are measurably worse: the solver converges rather than matching by construction.
    assert (mixture.flow_map(x, sigma, space, steps=20) - exact).abs().max() > 1e-5


@pytest.mark.parametrize("space, sigma, sigma_end", [(VE, SIGMA_MAX, 1.0), (VE, 2.0, 0.3), (FLOW, 1.0, 0.6),
                                                      (FLOW, 0.8, 0.2)])
def test_ode_to_an_intermediate_sigma_matches_closed_form(space: NoiseSpace, sigma: float, sigma_end: float) -> None:
    """For N(mu, s^2 I) the ODE point at sigma_end is
    a_e mu + sqrt(a_e^2 s^2 + b_e^2) (x - a mu) / sqrt(a^2 s^2 + b^2)."""
    generator = torch.Generator().manual_seed(7)
    mu = torch.randn(1, 4, 4, 4, generator=generator, dtype=torch.float64)
    mixture = GaussianMixture(mu, 0.25)
    x0, _ = mixture.sample(32, generator)
    x = space.noise(x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64), sigma)
    a, b = space.coefficients(torch.tensor(sigma, dtype=torch.float64))
    a_e, b_e = space.coefficients(torch.tensor(sigma_end, dtype=torch.float64))
    exact = a_e * mu + torch.sqrt(a_e**2 * 0.25**2 + b_e**2) * (x - a * mu) / torch.sqrt(a**2 * 0.25**2 + b**2)
    solved = solve_probability_flow(lambda z, s: mixture.denoise(z, s, space), x, sigma, space, sigma_end=sigma_end)
    torch.testing.assert_close(solved, exact, rtol=0, atol=5e-6)
    # per-sample end points, and one sample already at its end point stays where it is
    ends = torch.full((32,), sigma_end, dtype=torch.float64)
    ends[0] = sigma
    per_sample = solve_probability_flow(lambda z, s: mixture.denoise(z, s, space), x, sigma, space, sigma_end=ends)
    torch.testing.assert_close(per_sample[1:], exact[1:], rtol=0, atol=5e-6)
    torch.testing.assert_close(per_sample[0], x[0], rtol=0, atol=1e-12)


def test_flow_map_per_sample_sigmas_and_dtype() -> None:
    mixture = demo_mixture()
    generator = torch.Generator().manual_seed(7)
    x0, _ = mixture.sample(3, generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    sigmas = torch.tensor([0.0, 0.4, 0.9], dtype=torch.float64)
    x = FLOW.noise(x0, noise, sigmas.reshape(-1, 1, 1, 1))
    batched = mixture.flow_map(x.float(), sigmas, FLOW)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched[0].double(), x0[0], rtol=0, atol=1e-6)  # sigma 0: unchanged
    for i in (1, 2):
        alone = mixture.flow_map(x[i : i + 1], float(sigmas[i]), FLOW)
        torch.testing.assert_close(batched[i : i + 1].double(), alone, rtol=0, atol=1e-5)
    assert mixture.denoise(x.half(), sigmas, FLOW).dtype == torch.float16


def _demo_metrics(samples: torch.Tensor, mixture: GaussianMixture, reference: torch.Tensor) -> tuple[float, float]:
    return (sliced_wasserstein(samples, reference, generator=torch.Generator().manual_seed(0)),
            mean_nll(samples, mixture))


def _karras(count: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, count, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@pytest.fixture(scope="module")
def demo_reference() -> dict:
    mixture = demo_mixture()
    generator = torch.Generator().manual_seed(8)
    reference, _ = mixture.sample(1024, generator)
    other, _ = mixture.sample(1024, generator)
    swd_floor, _ = _demo_metrics(other, mixture, reference)
    return {"mixture": mixture, "reference": reference, "swd_floor": swd_floor, "nll": data_nll(mixture)}


def _start(mixture: GaussianMixture, space: NoiseSpace, sigma: float, n: int, seed: int) -> torch.Tensor:
    """Draws of the exact noisy marginal at ``sigma`` (for flow sigma = 1: pure noise)."""
    generator = torch.Generator().manual_seed(seed)
    x0, _ = mixture.sample(n, generator)
    return space.noise(x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64), sigma)


@pytest.mark.parametrize("space, sigma", [(VE, SIGMA_MAX), (FLOW, 1.0)])
def test_flow_map_from_the_top_lands_on_the_mixture(demo_reference: dict, space: NoiseSpace, sigma: float) -> None:
    mixture = demo_reference["mixture"]
    x = _start(mixture, space, sigma, 1024, seed=9)
    swd, nll = _demo_metrics(mixture.flow_map(x, sigma, space), mixture, demo_reference["reference"])
    assert swd < 1.5 * demo_reference["swd_floor"]
    assert nll == pytest.approx(demo_reference["nll"], abs=0.004)
    # The one-jump denoiser from the same start is far off (collapses onto the mode means).
    jump_swd, jump_nll = _demo_metrics(mixture.denoise(x, sigma, space), mixture, demo_reference["reference"])
    assert jump_swd > 3 * demo_reference["swd_floor"] and jump_nll > demo_reference["nll"] + 0.3


@pytest.mark.parametrize("space", [VE, FLOW])
def test_thousand_step_euler_on_the_exact_denoiser_lands_on_the_mixture(demo_reference: dict,
                                                                          space: NoiseSpace) -> None:
    mixture = demo_reference["mixture"]
    sigmas = _karras(1000, 2e-3, SIGMA_MAX) if space is VE else torch.linspace(1, 0, 1001, dtype=torch.float64)
    x = _start(mixture, space, float(sigmas[0]), 512, seed=10)
    start = x
    for sigma, sigma_next in itertools.pairwise(sigmas):
        x = x + (x - mixture.denoise(x, sigma, space)) / sigma * (sigma_next - sigma)
    swd, nll = _demo_metrics(x, mixture, demo_reference["reference"])
    assert swd < 1.5 * demo_reference["swd_floor"]
    assert nll == pytest.approx(demo_reference["nll"], abs=0.006)
    # Euler and the flow map solve the same ODE: per-sample agreement up to Euler's O(1/N) error.
    distance = (x - mixture.flow_map(start, float(sigmas[0]), space)).flatten(1).norm(dim=1)
    assert float(distance.median()) < 0.05


def test_factorized_mixture_equals_its_product_mixture() -> None:
    """A 2x2-location factorized mixture with K=2 is a 16-component whole-latent mixture."""
    generator = torch.Generator().manual_seed(11)
    means = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    log_weights = torch.tensor([0.7, 0.3], dtype=torch.float64).log().reshape(2, 1, 1).expand(2, 2, 2).clone()
    log_weights[:, 1, 0] = torch.tensor([0.2, 0.8]).log()
    factorized = FactorizedMixture(means, 0.4, log_weights)
    choices = torch.cartesian_prod(*[torch.arange(2)] * 4).reshape(16, 2, 2)  # component per location
    rows, cols = torch.arange(2).reshape(2, 1), torch.arange(2).reshape(1, 2)
    product_means = torch.stack([means.permute(0, 2, 3, 1)[c, rows, cols].permute(2, 0, 1) for c in choices])
    product_log_weights = torch.stack([log_weights[c, rows, cols].sum() for c in choices])
    product = GaussianMixture(product_means, 0.4, product_log_weights)

    x = 2 * torch.randn(6, 3, 2, 2, generator=generator, dtype=torch.float64)
    for space, sigma in [(VE, 0.7), (FLOW, 0.5), (FLOW, 1.0)]:
        torch.testing.assert_close(factorized.denoise(x, sigma, space), product.denoise(x, sigma, space), rtol=0,
                                   atol=1e-12)
        torch.testing.assert_close(
            factorized.marginal_log_prob(x, sigma, space), product.marginal_log_prob(x, sigma, space), rtol=0,
            atol=1e-10
        )
    torch.testing.assert_close(factorized.log_prob(x), product.log_prob(x), rtol=0, atol=1e-10)
    assert factorized.expected_nll(4096, torch.Generator().manual_seed(0)) == pytest.approx(
        product.expected_nll(num_samples=4096, generator=torch.Generator().manual_seed(0)), abs=0.02
    )
    _, locations = factorized.sample(20000, generator)
    assert float((locations[:, 1, 0] == 1).double().mean()) == pytest.approx(0.8, abs=0.015)
    assert float((locations[:, 0, 0] == 1).double().mean()) == pytest.approx(0.3, abs=0.015)


def test_factorized_posterior_gm_layout_and_mean() -> None:
    generator = torch.Generator().manual_seed(12)
    mixture = FactorizedMixture(torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64), 0.3)
    x = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.25, 0.8], dtype=torch.float64)
    gm = mixture.posterior_gm(x, sigma, FLOW)
    assert gm.means.shape == (2, 3, 4, 5, 6) and gm.log_weights.shape == (2, 3, 1, 5, 6) and gm.variance.shape == (2,)
    torch.testing.assert_close(gm.log_weights.exp().sum(dim=1), torch.ones(2, 1, 5, 6, dtype=torch.float64))
    torch.testing.assert_close((gm.log_weights.exp() * gm.means).sum(dim=1), mixture.denoise(x, sigma, FLOW), rtol=0,
                               atol=1e-12)
    a, b = 1 - sigma, sigma
    torch.testing.assert_close(gm.variance, 0.09 * b**2 / (b**2 + a**2 * 0.09))


def test_factorized_flow_map_lands_on_the_mixture() -> None:
    generator = torch.Generator().manual_seed(13)
    mixture = FactorizedMixture(1.5 * torch.randn(4, 2, 3, 3, generator=generator, dtype=torch.float64), 0.3)
    reference, _ = mixture.sample(1024, generator)
    other, _ = mixture.sample(1024, generator)
    noise = torch.randn(1024, 2, 3, 3, generator=generator, dtype=torch.float64)
    samples = mixture.flow_map(noise, 1.0, FLOW, steps=100)
    projections = torch.Generator().manual_seed(0)
    floor = sliced_wasserstein(other, reference, generator=projections)
    assert sliced_wasserstein(samples, reference, generator=torch.Generator().manual_seed(0)) < 1.5 * floor
    assert mean_nll(samples, mixture) == pytest.approx(data_nll(mixture), abs=0.01)


@pytest.mark.parametrize("space, sigma", [(VE, 0.5), (VE, 9.0), (FLOW, 0.3), (FLOW, 0.9)])
@pytest.mark.parametrize("kind", ["x0", "eps", "v", "velocity"])
def test_prediction_targets_round_trip(space: NoiseSpace, sigma: float, kind: str) -> None:
    generator = torch.Generator().manual_seed(14)
    x0 = torch.randn(4, 4, 2, 2, generator=generator, dtype=torch.float64)
    x = space.noise(x0, torch.randn(x0.shape, generator=generator, dtype=torch.float64), sigma)
    target = prediction_target(x, x0, sigma, space, kind)
    torch.testing.assert_close(x0_from_prediction(x, target, sigma, space, kind), x0)


def test_prediction_targets_match_comfyui_model_sampling() -> None:
    """ComfyUI's calculate_denoised maps our eps / v / velocity targets back to x0 (sigma_data = 1)."""
    sys.path.insert(0, str(COMFYUI))
    try:
        model_sampling = pytest.importorskip("comfy.model_sampling")
    finally:
        sys.path.remove(str(COMFYUI))
    generator = torch.Generator().manual_seed(15)
    x0 = torch.randn(3, 4, 2, 2, generator=generator, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.3, 2.0, 11.0], dtype=torch.float64)
    cases = [(model_sampling.EPS, VE, "eps"), (model_sampling.V_PREDICTION, VE, "v"),
             (model_sampling.CONST, FLOW, "velocity")]
    for sampling_class, space, kind in cases:
        sampling = sampling_class()
        sampling.sigma_data = 1.0
        s = sigma if space is VE else sigma / 12
        x = space.noise(x0, eps, s.reshape(-1, 1, 1, 1))
        target = prediction_target(x, x0, s, space, kind)
        torch.testing.assert_close(sampling.calculate_denoised(s, target, x), x0)
    mixture = demo_mixture()
    x = VE.noise(mixture.means[:3], eps.expand(3, 4, 2, 2).repeat(1, 1, 4, 4), sigma.reshape(-1, 1, 1, 1))
    v_prediction = model_sampling.V_PREDICTION()
    v_prediction.sigma_data = 1.0
    torch.testing.assert_close(
        v_prediction.calculate_denoised(sigma, mixture.targets(x, sigma, VE, "v"), x), mixture.denoise(x, sigma, VE)
    )


def test_sharpened_partner_concentrates_weight() -> None:
    mixture = demo_mixture()
    partner = mixture.sharpened(keep=[0, 2, 4, 6], residual_weight=0.04, std_scale=0.8)
    torch.testing.assert_close(partner.weights[[0, 2, 4, 6]], torch.full((4,), 0.24, dtype=torch.float64))
    torch.testing.assert_close(partner.weights[[1, 3, 5, 7]], torch.full((4,), 0.01, dtype=torch.float64))
    torch.testing.assert_close(partner.stds, torch.full((8,), 0.2, dtype=torch.float64))
    _, components = partner.sample(500, torch.Generator().manual_seed(16), torch.full((500,), 1))
    assert float((components == 2).double().mean()) > 0.9
    two_modes = mixture.sharpened(keep=[0, 2])  # classes 2 and 3 keep no mass: unconditional use only
    _, components = two_modes.sample(200, torch.Generator().manual_seed(17))
    assert set(components.tolist()) == {0, 2}
    with pytest.raises(ValueError, match="class 3"):
        two_modes.denoise(mixture.means[:2], 1.0, VE, torch.tensor([0, 3]))


def test_demo_mixture_decodes_to_coloured_shapes() -> None:
    sys.path.insert(0, str(COMFYUI))
    try:
        latent_formats = pytest.importorskip("comfy.latent_formats")
    finally:
        sys.path.remove(str(COMFYUI))
    assert [list(row) for row in SD15_LATENT_RGB_FACTORS] == latent_formats.SD15().latent_rgb_factors

    mixture = demo_mixture()
    assert mixture.latent_shape == (4, 8, 8) and mixture.num_components == 8
    assert mixture.classes.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert float(mixture.means.pow(2).mean().sqrt()) == pytest.approx(1.0)
    rgb = latent_to_rgb(mixture.means)
    assert rgb.shape == (8, 8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    centre, corner = rgb[:, 4, 4], rgb[:, 0, 0]
    torch.testing.assert_close(corner[0], torch.full((3,), 0.5, dtype=torch.float64))  # grey background
    assert centre[0, 0] > 0.9 and centre[0, 1] < 0.3 and centre[0, 2] < 0.3  # red disc
    assert centre[2, 2] > 0.9 and centre[2, 0] < 0.3  # blue square
    assert centre[4, 1] > 0.9 and centre[4, 0] < 0.3 and centre[4, 2] < 0.3  # green cross
    torch.testing.assert_close(centre[6], torch.full((3,), 0.5, dtype=torch.float64))  # ring: hollow centre
    ring = rgb[6, 4, 1]
    assert ring[0] > 0.9 and ring[1] > 0.9 and ring[2] < 0.3  # yellow ring
    assert float((rgb[0] - 0.5).abs().sum(-1).gt(0.2).double().mean()) \
        < float((rgb[2] - 0.5).abs().sum(-1).gt(0.2).double().mean())


def test_the_preview_decoder_refuses_non_finite_latents():
    latents = torch.zeros(2, 4, 8, 8)
    latents[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="the latents contain NaN or inf"):
        latent_to_rgb(latents)
