"""NoiseSpace: conventions, timestep tables and re-noising marginals."""
import pytest
import torch

from distill_core.spaces import NoiseSpace, all_finite, require_finite, scaled_linear_alphas_cumprod


@pytest.fixture(params=["ve", "flow"])
def space(request):
    if request.param == "ve":
        return NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
    return NoiseSpace.flow(shift=3.0)


def test_sd_table_matches_diffusers_scaled_linear():
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(scaled_linear_alphas_cumprod().float(), reference, rtol=1e-6)


def test_timestep_and_sigma_are_inverse(space):
    t = torch.tensor([0.0, 0.25, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(space.timestep_of(space.sigma_of(t)), t, atol=1e-9)
    assert torch.allclose(space.sigma_of(torch.tensor([999.0])), space.sigma_table[-1:])


def test_noise_and_eps_are_inverse(space):
    x0, eps = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    x = space.noise(x0, eps, 0.4)
    assert torch.allclose(space.eps(x, x0, 0.4), eps)


def test_renoise_has_the_target_marginal(space):
    """x at sigma_from re-noised to sigma_to is distributed as a(sigma_to) x0 + b(sigma_to) eps."""
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    sigma_from, sigma_to = (0.3, 0.8) if space.kind == "flow" else (0.5, 3.0)
    x = space.noise(x0, torch.randn(n, generator=generator, dtype=torch.float64), sigma_from)
    y = space.renoise(x, sigma_from, sigma_to, torch.randn(n, generator=generator, dtype=torch.float64))
    a, b = space.coefficients(sigma_to)
    tolerance = 5 * float(b) / n**0.5  # five standard errors
    assert abs(float(y.mean()) - float(a) * 0.7) < tolerance
    assert abs(float(y.std()) - float(b)) < tolerance


def test_alpha_cumprod_inverts_the_sd_table():
    space = NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
    assert torch.allclose(space.alpha_cumprod(space.sigma_table), scaled_linear_alphas_cumprod())


def test_bad_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        NoiseSpace("edm", torch.ones(10))


def test_scalar_paths_equal_the_tensor_paths(space):
    """The samplers' per-step float paths (no tensors) give what the tensor methods give, edges included."""
    sigma_min, sigma_max = float(space.sigma_table[0]), float(space.sigma_table[-1])
    sigmas = [sigma_min * 0.5, sigma_min, *torch.linspace(sigma_min, sigma_max, 37).tolist()[1:-1],
              float(space.sigma_table[500]), sigma_max, sigma_max * 2]
    for sigma in sigmas:
        assert space.scalar_timestep_of(sigma) == pytest.approx(float(space.timestep_of(sigma)), abs=1e-9)
    for timestep in [-3.0, 0.0, 0.25, 17.0, 499.5, 998.9, 999.0, 1200.0]:
        assert space.scalar_sigma_of(timestep) == pytest.approx(float(space.sigma_of(timestep)), rel=1e-12)
    x, x0, noise = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
                    for k in range(3))
    low, high = sigmas[5], sigmas[20]
    tensor = torch.tensor
    assert torch.allclose(space.noise(x0, noise, high), space.noise(x0, noise, tensor(high)), rtol=1e-14, atol=0)
    assert torch.allclose(space.eps(x, x0, high), space.eps(x, x0, tensor(high)), rtol=1e-14, atol=0)
    assert torch.allclose(space.renoise(x, low, high, noise), space.renoise(x, tensor(low), tensor(high), noise),
                          rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finiteness_checks_see_one_bad_value(bad):
    x = torch.zeros(2, 4, 8, 8)
    assert all_finite(x) and all_finite(torch.zeros(0, 4)) and all_finite(torch.full((3,), 1e30))
    x[1, 2, 3, 4] = bad
    assert not all_finite(x)
    with pytest.raises(ValueError, match="the latents contain NaN or inf values"):
        require_finite(x, "the latents")
