"""pi-Flow policies, schedule and sampler; exactness on the factorised reference teacher."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from distill_core.methods import build_sampler, method, method_sigmas
from distill_core.reference.mixture import FactorizedMixture
from distill_core.sampling.piflow import (
    DX_POLYNOMIAL,
    DXPolicy,
    GMPolicy,
    Inpainting,
    PackedLatentPolicy,
    piflow_sigmas,
    resolve_temperature,
    rollout,
    sample_piflow,
    stochastic_target,
    substep_sigmas,
    unwarp_sigma,
    warp_time,
    with_temperature,
)
from distill_core.spaces import NoiseSpace

F64 = torch.float64
FLOW = NoiseSpace.flow()


def random_gm(batch=2, k=3, c=4, h=3, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(batch, k, c, h, w, generator=g, dtype=F64)
    logweights = torch.randn(batch, k, 1, h, w, generator=g, dtype=F64)
    variance = torch.rand(batch, generator=g, dtype=F64) * 0.5 + 0.05
    x_src = torch.randn(batch, c, h, w, generator=g, dtype=F64)
    return means, logweights, variance, x_src, g


def gm_posterior_mean_reference(means, logweights, variance, x_src, s_src, x_t, s_t):
    """Independent form: the likelihood ratio p(x_t|x0)/p(x_src|x0) as a Gaussian in x0
    (mean g, variance v_g), multiplied into each component (ComfyUI-piFlow's formulation)."""
    a_src, a_t = 1 - s_src, 1 - s_t
    denom = a_t**2 * s_src**2 - a_src**2 * s_t**2
    g = ((a_t * s_src**2 * x_t - a_src * s_t**2 * x_src) / denom).unsqueeze(1)
    v_g = s_t**2 * s_src**2 / denom
    var = variance.reshape(-1, 1, 1, 1, 1)
    component_means = (v_g * means + var * g) / (v_g + var)
    log_w = logweights.log_softmax(1) - 0.5 * ((means - g) ** 2).sum(2, keepdim=True) / (v_g + var)
    return (log_w.softmax(1) * component_means).sum(1)


# -- schedule ---------------------------------------------------------------------------------
def test_sigmas_match_official_schedule():
    sigmas = piflow_sigmas(4)
    assert sigmas.dtype == F64 and sigmas[-1] == 0
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.8889, 0.7059, 0.3478, 0.0], dtype=F64), atol=1e-4, rtol=0)
    torch.testing.assert_close(unwarp_sigma(sigmas[:-1]), torch.tensor([7, 5, 3, 1], dtype=F64) / 7, atol=1e-12, rtol=0)
    torch.testing.assert_close(piflow_sigmas(1), torch.tensor([1.0, 0.0], dtype=F64))
    # f = 1: even raw-time steps; denoise scales raw times
    torch.testing.assert_close(unwarp_sigma(piflow_sigmas(2, final_step_size_scale=1.0)[:-1]),
                               torch.tensor([1.0, 0.5], dtype=F64))
    torch.testing.assert_close(unwarp_sigma(piflow_sigmas(4, denoise=0.5)[:1]), torch.tensor([0.5], dtype=F64))
    with pytest.raises(ValueError):
        piflow_sigmas(0)


def test_warp_roundtrip_and_substep_split():
    raw = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(unwarp_sigma(warp_time(raw, 3.2), 3.2), raw)
    sigmas = piflow_sigmas(4)
    counts = [len(substep_sigmas(float(a), float(b))) - 1 for a, b in itertools.pairwise(sigmas)]
    assert counts == [37, 37, 37, 18]  # round(128 * 2/7) three times, round(128 * 1/7) last
    grid = substep_sigmas(1.0, 0.0)
    assert len(grid) == 129 and grid[0] == 1 and grid[-1] == 0
    torch.testing.assert_close(unwarp_sigma(grid).diff(), torch.full((128,), -1 / 128, dtype=F64))


# -- GM policy ---------------------------------------------------------------------------------
def test_gm_velocity_matches_closed_form():
    means, logweights, variance, x_src, g = random_gm()
    s_src, s_t = 0.8, 0.45
    policy = GMPolicy(means, logweights, variance, x_src, s_src)
    x_t = torch.randn(x_src.shape, generator=g, dtype=F64)
    expected_x0 = gm_posterior_mean_reference(means, logweights, variance, x_src, s_src, x_t, s_t)
    torch.testing.assert_close(policy.x0(x_t, s_t), expected_x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(policy.velocity(x_t, torch.full((2,), s_t, dtype=F64)), (x_t - expected_x0) / s_t,
                               atol=1e-12, rtol=0)
    # at the source the posterior is the mixture itself
    mixture_mean = (logweights.softmax(1) * means).sum(1)
    torch.testing.assert_close(policy.x0(x_src, s_src), mixture_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(policy.denoised, mixture_mean)


def test_gm_from_velocity_uses_official_layout():
    means_x0, logweights, variance, x_src, _ = random_gm(seed=1)
    sigma = torch.tensor([0.9, 0.6], dtype=F64)
    s = sigma.reshape(-1, 1, 1, 1, 1)
    velocities = (x_src.unsqueeze(1) - means_x0) / s
    logstds = (variance.sqrt().reshape(-1, 1, 1, 1, 1) / s).log()
    policy = GMPolicy.from_velocity(velocities, logweights, logstds, x_src, sigma)
    torch.testing.assert_close(policy.means, means_x0)
    torch.testing.assert_close(policy.variance.flatten(), variance)
    with pytest.raises(ValueError, match="shared by all components"):
        GMPolicy(means_x0, logweights, variance.reshape(-1, 1, 1, 1, 1).expand(-1, 3, 1, 1, 1), x_src, sigma)
    with pytest.raises(ValueError, match="log-weights"):
        GMPolicy(means_x0, logweights[:, :, :, :2], variance, x_src, sigma)


def test_temperature():
    means, logweights, variance, x_src, _ = random_gm(seed=2)
    policy = GMPolicy(means, logweights, variance, x_src, 0.7)
    assert policy.with_temperature(1.0) is policy and policy.with_temperature(2.0) is policy
    cooled = policy.with_temperature(0.5)
    torch.testing.assert_close(cooled.logweights.exp(), (2 * logweights).softmax(1))
    torch.testing.assert_close(cooled.variance, policy.variance * 0.5)
    # T = 0 keeps only the most likely component at each location
    frozen = policy.with_temperature(0.0).denoised
    best = logweights.argmax(1, keepdim=True).expand(-1, 1, means.shape[2], -1, -1)
    torch.testing.assert_close(frozen, means.gather(1, best).squeeze(1))
    assert [resolve_temperature("auto", n) for n in (1, 2, 4, 11, 30)] == pytest.approx([0.0, 0.1, 0.3, 1.0, 1.0])
    assert resolve_temperature(0.7, 4) == 0.7
    with pytest.raises(ValueError):
        resolve_temperature("hot", 4)


def test_temperature_applies_to_all_steps_but_the_last():
    means, logweights, variance, x_src, _ = random_gm(seed=3)

    def model(x, sigma):  # a fixed mixture re-anchored at every source point
        return GMPolicy(means, logweights, variance, x, sigma)

    one_cold = sample_piflow(model, x_src, piflow_sigmas(1), temperature=0.0, disable=True)
    one_warm = sample_piflow(model, x_src, piflow_sigmas(1), temperature=1.0, disable=True)
    torch.testing.assert_close(one_cold, one_warm)  # the only step is the last
    two = [sample_piflow(model, x_src, piflow_sigmas(2), temperature=t, disable=True) for t in (0.0, 1.0, "auto")]
    assert (two[0] - two[1]).abs().max() > 1e-3
    torch.testing.assert_close(two[2], sample_piflow(model, x_src, piflow_sigmas(2), temperature=0.1, disable=True))


# -- DX policy ---------------------------------------------------------------------------------
def test_dx_interpolation_reproduces_grid_points():
    g = torch.Generator().manual_seed(4)
    batch, n = 2, 10
    grid = torch.randn(batch, n, 4, 3, 3, generator=g, dtype=F64)
    x_src = torch.randn(batch, 4, 3, 3, generator=g, dtype=F64)
    sigma_src, segment, shift = 0.8889, 1 / 3.5, 3.2
    policy = DXPolicy(grid, x_src, sigma_src, segment, shift)
    raw_src = float(unwarp_sigma(torch.tensor(sigma_src, dtype=F64), shift))
    raw_end = raw_src - segment
    for i in range(n):
        sigma = warp_time(torch.tensor(raw_end + segment * i / (n - 1), dtype=F64), shift)
        torch.testing.assert_close(policy.x0(x_src, sigma), grid[:, i], atol=1e-10, rtol=0)
        torch.testing.assert_close(policy.velocity(x_src, sigma), (x_src - grid[:, i]) / sigma, atol=1e-9, rtol=0)
    midway = warp_time(torch.tensor(raw_end + segment * 2.5 / (n - 1), dtype=F64), shift)
    torch.testing.assert_close(policy.x0(x_src, midway), (grid[:, 2] + grid[:, 3]) / 2, atol=1e-10, rtol=0)
    torch.testing.assert_close(policy.denoised, grid[:, -1], atol=1e-10, rtol=0)
    torch.testing.assert_close(policy.x0(x_src, 0.0), grid[:, 0])  # below the segment: clamped
    # the last step's segment is cut at raw time 0
    last = DXPolicy(grid, x_src, 0.3478, segment, shift)
    torch.testing.assert_close(last.x0(x_src, 0.0), grid[:, 0])
    # velocities from the network map to x0 = x_src - sigma u
    velocities = (x_src.unsqueeze(1) - grid) / sigma_src
    torch.testing.assert_close(DXPolicy.from_velocity(velocities, x_src, sigma_src, segment, shift).x0_terms, grid)
    with pytest.raises(ValueError, match="segment_size"):
        DXPolicy(grid, x_src, sigma_src, 0.0, shift)
    with pytest.raises(ValueError, match="mode"):
        DXPolicy(grid, x_src, sigma_src, segment, shift, mode="spline")


def official_polynomial_x0(coefficients, sigma_src, sigma_t, shift):
    """The official polynomial mode written out in float64: x0 = sum_n (raw_src - raw_t)^n c_n,
    raw = sigma / (shift + (1 - shift) sigma), with an explicit power basis (no Horner)."""
    raw_src = sigma_src / (shift + (1 - shift) * sigma_src)
    raw_t = sigma_t / (shift + (1 - shift) * sigma_t)
    basis = torch.tensor([(raw_src - raw_t) ** n for n in range(coefficients.shape[1])], dtype=F64)
    return (basis.reshape(1, -1, 1, 1, 1) * coefficients).sum(1)


def test_dx_polynomial_matches_the_official_formula():
    g = torch.Generator().manual_seed(8)
    batch, order, shift, sigma_src = 2, 10, 3.2, 0.8889
    coefficients = torch.randn(batch, order, 4, 3, 3, generator=g, dtype=F64)
    x_src = torch.randn(batch, 4, 3, 3, generator=g, dtype=F64)
    # segment_size plays no part in this mode (the official p10 config does not set it)
    policy = DXPolicy(coefficients, x_src, sigma_src, segment_size=0.0, shift=shift, mode=DX_POLYNOMIAL)
    worst = 0.0
    for sigma_t in (0.8889, 0.8, 0.7059, 0.5, 0.3478, 0.1, 0.0):  # the 4-step segments and beyond (no clamp)
        expected = official_polynomial_x0(coefficients, sigma_src, sigma_t, shift)
        worst = max(worst, float((policy.x0(x_src, sigma_t) - expected).abs().max()))
        torch.testing.assert_close(policy.velocity(x_src, sigma_t), (x_src - expected) / max(sigma_t, 1e-4),
                                   atol=1e-9, rtol=1e-12)
    print(f"DX polynomial (order 10) vs the official power-basis formula: max |diff| = {worst:.1e}")
    assert worst < 1e-12
    torch.testing.assert_close(policy.denoised, coefficients[:, 0], atol=0, rtol=0)  # the constant term at the source
    # network output -> coefficients: every channel group c_n = x_src - sigma_src u_n, as the official code converts
    velocities = torch.randn(coefficients.shape, generator=g, dtype=F64)
    converted = DXPolicy.from_velocity(velocities, x_src, sigma_src, shift=shift, mode=DX_POLYNOMIAL)
    torch.testing.assert_close(converted.x0_terms, x_src.unsqueeze(1) - sigma_src * velocities, atol=0, rtol=0)


def test_dx_polynomial_reproduces_its_coefficients():
    """Sampling x0 at N raw times and solving the Vandermonde system recovers the N coefficients."""
    g = torch.Generator().manual_seed(9)
    order, shift, sigma_src = 4, 3.2, 0.7059
    coefficients = torch.randn(1, order, 2, 2, 2, generator=g, dtype=F64)
    x_src = torch.randn(1, 2, 2, 2, generator=g, dtype=F64)
    policy = DXPolicy(coefficients, x_src, sigma_src, shift=shift, mode=DX_POLYNOMIAL)
    raw_src = float(unwarp_sigma(torch.tensor(sigma_src, dtype=F64), shift))
    elapsed = torch.tensor([0.0, 0.1, 0.2, 2 / 7], dtype=F64)
    values = torch.stack([policy.x0(x_src, warp_time(torch.tensor(raw_src - e, dtype=F64), shift))
                          for e in elapsed.tolist()], 1)
    vandermonde = elapsed.unsqueeze(1) ** torch.arange(order, dtype=F64)
    recovered = torch.linalg.solve(vandermonde, values.reshape(order, -1)).reshape(coefficients.shape)
    torch.testing.assert_close(recovered, coefficients, atol=1e-9, rtol=0)
    # one coefficient: a constant x0, which Euler integrates exactly: x = x0 + (x_src - x0) sigma / sigma_src
    constant = DXPolicy(coefficients[:, :1], x_src, sigma_src, shift=shift, mode=DX_POLYNOMIAL)
    end = rollout(constant, x_src, substep_sigmas(sigma_src, 0.2))
    torch.testing.assert_close(end, coefficients[:, 0] + (x_src - coefficients[:, 0]) * 0.2 / sigma_src,
                               atol=1e-12, rtol=0)


def official_sample(policy_at, x, sigmas, *, substeps=128, shift=3.2, h=0.0, noises=None, latent=None, masks=None):
    """ComfyUI-piFlow's sampling loop (``_PiFlowSampler.sample`` / ``policy_rollout``) re-written
    in float64 Python: substeps of equal raw length from the source, the official velocity
    blend for masks, the flow-map SDE step. ``masks[i]`` is step i's mask (None: no inpainting)."""
    def warp(raw):
        return shift * raw / (1 + (shift - 1) * raw)

    def unwarp(sigma):
        return sigma / (shift + (1 - shift) * sigma)

    sigmas = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        sigma_src, sigma_to = sigmas[i], sigmas[i + 1]
        m = 1.0 if h <= 0 else (sigma_to * (1 - sigma_src) / max(sigma_src * (1 - sigma_to), 1e-6)) ** (h * h)
        sigma_dst = sigma_to * m / max(1 - sigma_to + sigma_to * m, 1e-6)
        policy = policy_at(x, sigma_src)
        raw, raw_dst = unwarp(sigma_src), unwarp(sigma_dst)
        count = max(1, round((raw - raw_dst) * substeps))
        size = (raw - raw_dst) / count
        x_t, sigma_t = x, sigma_src
        for _ in range(count):
            u = policy.velocity(x_t, sigma_t)
            if masks is not None:
                u = u * masks[i] + (x_t - latent) / sigma_t * (1 - masks[i])
            raw = max(raw - size, 0.0)
            x_t = x_t + u * (warp(raw) - sigma_t)
            sigma_t = warp(raw)
        noise = torch.zeros_like(x) if noises is None else noises[i]
        x = (1 - sigma_to + sigma_to * m) * x_t + sigma_to * math.sqrt(max(1 - m * m, 0.0)) * noise
    return x


def linear_dx_network(mode, order=5, seed=10):
    """A small stand-in network: DX velocities u_n = a_n x + b_n, anchored at every source point."""
    g = torch.Generator().manual_seed(seed)
    scales = 0.3 * torch.randn(1, order, 1, 1, 1, generator=g, dtype=F64)
    offsets = torch.randn(1, order, 4, 3, 3, generator=g, dtype=F64)

    def model(x, sigma, **extra):
        return DXPolicy.from_velocity(scales * x.unsqueeze(1) + offsets, x, sigma, 1 / 3.5, 3.2, mode)

    return model


@pytest.mark.parametrize("mode", ["grid", DX_POLYNOMIAL])
def test_dx_rollout_matches_the_official_loop(mode):
    model = linear_dx_network(mode)
    x = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(11), dtype=F64)
    sigmas = piflow_sigmas(4)
    got = sample_piflow(model, x, sigmas, disable=True)
    want = official_sample(model, x, sigmas)
    error = float((got - want).abs().max())
    print(f"DX {mode} 4-NFE rollout vs the official loop: max |diff| = {error:.1e}")
    assert error < 1e-11
    other = sample_piflow(linear_dx_network("grid" if mode == DX_POLYNOMIAL else DX_POLYNOMIAL), x, sigmas,
                          disable=True)
    assert (got - other).abs().max() > 1e-2  # the two modes read the same output differently


# -- stochastic step -----------------------------------------------------------------------------
def test_stochastic_step_keeps_the_marginal():
    assert stochastic_target(0.8, 0.5, 0.0) == (0.5, 1.0)
    assert stochastic_target(0.35, 0.0, 1.0) == (0.0, 0.0)
    for sigma_from, sigma_to, h in [(0.9, 0.6, 0.5), (0.7, 0.35, 1.0), (0.5, 0.2, 3.0)]:
        sigma_dst, m = stochastic_target(sigma_from, sigma_to, h)
        scale = 1 - sigma_to + sigma_to * m
        # x_dst = (1 - s_dst) x0 + s_dst eps  ->  x_to = (1 - s_to) x0 + s_to eps'
        assert scale * (1 - sigma_dst) == pytest.approx(1 - sigma_to, abs=1e-12)
        assert (scale * sigma_dst) ** 2 + sigma_to**2 * (1 - m * m) == pytest.approx(sigma_to**2, abs=1e-12)
        assert sigma_dst < sigma_to  # the policy runs past the target, fresh noise brings it back


def test_stochastic_sampler_step_formula():
    means, logweights, variance, x_src, g = random_gm(seed=5)
    noises = [torch.randn(x_src.shape, generator=g, dtype=F64) for _ in range(2)]
    calls = iter(noises)

    def model(x, sigma):
        return GMPolicy(means, logweights, variance, x, sigma)

    sigmas = piflow_sigmas(2)
    result = sample_piflow(model, x_src, sigmas, temperature=1.0, h=0.7, noise_sampler=lambda s, t: next(calls),
                           disable=True)
    x = x_src
    for i in range(2):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        s_dst, m = stochastic_target(s, s_next, 0.7)
        x_dst = rollout(model(x, s), x, substep_sigmas(s, s_dst))
        x = x_dst if i == 1 else (1 - s_next + s_next * m) * x_dst + s_next * math.sqrt(1 - m * m) * noises[i]
    torch.testing.assert_close(result, x, atol=1e-12, rtol=0)
    assert (result - sample_piflow(model, x_src, sigmas, temperature=1.0, disable=True)).abs().max() > 1e-3


# -- exactness on the factorised reference teacher ---------------------------------------------
@pytest.fixture(scope="module")
def teacher_setup():
    g = torch.Generator().manual_seed(6)
    teacher = FactorizedMixture(torch.randn(3, 4, 4, 4, generator=g, dtype=F64), std=0.3,
                                log_weights=torch.randn(3, 4, 4, generator=g, dtype=F64))
    x = torch.randn(6, 4, 4, 4, generator=g, dtype=F64)
    return teacher, x


def exact_policy(teacher):
    def model(x, sigma):
        posterior = teacher.posterior_gm(x, sigma, FLOW)
        return GMPolicy(posterior.means, posterior.log_weights, posterior.variance, x, sigma)
    return model


def teacher_velocity(teacher, x, sigma):
    return (x - teacher.denoise(x, sigma, FLOW)) / sigma


def test_exact_policy_velocity_equals_teacher_along_rollout(teacher_setup):
    teacher, x = teacher_setup
    sigmas = piflow_sigmas(4)
    worst = 0.0
    for i in range(4):
        policy = exact_policy(teacher)(x, float(sigmas[i]))
        grid = substep_sigmas(float(sigmas[i]), float(sigmas[i + 1]))
        for s, s_next in itertools.pairwise(grid.tolist()):
            u = policy.velocity(x, s)
            worst = max(worst, float((u - teacher_velocity(teacher, x, s)).abs().max()))
            x = x + (s_next - s) * u
    print(f"max |policy velocity - teacher velocity| over all 129 substep points: {worst:.2e}")
    assert worst < 1e-10


def teacher_euler(teacher, x, grid):
    for s, s_next in itertools.pairwise(grid.tolist()):
        x = x + (s_next - s) * teacher_velocity(teacher, x, s)
    return x


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_rollout_equals_teacher_euler_and_approaches_the_ode(teacher_setup, nfe):
    teacher, x = teacher_setup
    sigmas = piflow_sigmas(nfe)
    steps = []
    sample = sample_piflow(exact_policy(teacher), x, sigmas, temperature=1.0,
                           callback=lambda info: steps.append(info), disable=True)
    grid = torch.cat([substep_sigmas(float(a), float(b))[:-1] for a, b in itertools.pairwise(sigmas)] + [sigmas[-1:]])
    same_grid = teacher_euler(teacher, x, grid)
    fine = teacher.flow_map(x, 1.0, FLOW, steps=1000)
    err_grid = float((sample - same_grid).abs().max())
    err_fine = float((sample - fine).abs().max())
    err_fine_rms = float((sample - fine).pow(2).mean().sqrt())
    print(f"NFE {nfe}: {len(grid) - 1} substeps, max|piflow - same-grid Euler| = {err_grid:.2e}, "
          f"max|piflow - fine ODE| = {err_fine:.2e} (rms {err_fine_rms:.2e})")
    assert err_grid < 1e-11
    # what is left is Euler's first-order error (128 substeps): doubling them halves it
    assert err_fine < 0.15
    finer = sample_piflow(exact_policy(teacher), x, sigmas, temperature=1.0, substeps=256, disable=True)
    finer_rms = float((finer - fine).pow(2).mean().sqrt())
    assert 0.4 * err_fine_rms < finer_rms < 0.6 * err_fine_rms
    # one callback per NFE, previewing the policy's x0 at the source
    assert [info["i"] for info in steps] == list(range(nfe))
    torch.testing.assert_close(steps[0]["denoised"], teacher.denoise(x, 1.0, FLOW))


def test_seeded_noise_is_reproducible():
    means, logweights, variance, x_src, _ = random_gm(seed=7)

    def model(x, sigma, **extra):  # ComfyUI's model wrapper also receives the seed
        return GMPolicy(means, logweights, variance, x, sigma)

    runs = [sample_piflow(model, x_src, piflow_sigmas(3), {"seed": seed}, h=1.0, disable=True) for seed in (3, 3, 4)]
    torch.testing.assert_close(runs[0], runs[1])
    assert (runs[0] - runs[2]).abs().max() > 1e-3


# -- inpainting ----------------------------------------------------------------------------------
def test_inpainting_velocity_keeps_the_noised_original():
    g = torch.Generator().manual_seed(12)
    latent, eps, policy_u = (torch.randn(2, 4, 3, 3, generator=g, dtype=F64) for _ in range(3))
    mask = (torch.rand(2, 1, 3, 3, generator=g, dtype=F64) > 0.5).to(F64)
    inpainting = Inpainting(latent, mask)
    sigma, sigma_next = 0.7, 0.45
    x = (1 - sigma) * latent + sigma * eps
    velocity = inpainting.velocity(policy_u, x, sigma)
    torch.testing.assert_close(velocity, mask * policy_u + (1 - mask) * (eps - latent), atol=1e-14, rtol=0)
    stepped = x + (sigma_next - sigma) * velocity
    kept = mask == 0
    torch.testing.assert_close(stepped.masked_select(kept.expand_as(x)),
                               ((1 - sigma_next) * latent + sigma_next * eps).masked_select(kept.expand_as(x)),
                               atol=1e-14, rtol=0)
    # to sigma 0 the kept region lands on the original latent
    landed = x + (0 - sigma) * velocity
    torch.testing.assert_close(landed.masked_select(kept.expand_as(x)), latent.masked_select(kept.expand_as(x)),
                               atol=1e-14, rtol=0)
    # previews: the policy's x0 where it generates, the original where it keeps
    torch.testing.assert_close(inpainting.denoised(policy_u), torch.where(kept, latent, policy_u))


@pytest.fixture(scope="module")
def inpainting_setup(teacher_setup):
    teacher, noise = teacher_setup
    g = torch.Generator().manual_seed(13)
    latent = torch.randn(noise.shape, generator=g, dtype=F64)
    mask = torch.zeros(noise.shape[0], 1, *noise.shape[2:], dtype=F64)
    mask[..., :, :2] = 1  # regenerate the left half of every latent
    return teacher, noise, latent, mask


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_masked_sampling_keeps_the_original_and_follows_the_teacher(inpainting_setup, denoise):
    teacher, noise, latent, mask = inpainting_setup
    sigmas = piflow_sigmas(4, denoise=denoise)
    s0 = float(sigmas[0])
    x = s0 * noise + (1 - s0) * latent  # ComfyUI's noise_scaling of the original
    steps = []
    got = sample_piflow(exact_policy(teacher), x, sigmas, temperature=1.0, latent_image=latent, denoise_mask=mask,
                        callback=steps.append, disable=True)
    kept = (mask == 0).expand_as(x)
    kept_error = float((got - latent).masked_select(kept).abs().max())
    # the kept region is the original noised with the same noise at every step's source
    for info in steps:
        s = float(info["sigma"])
        on_line = (info["x"] - (1 - s) * latent - s * noise).masked_select(kept).abs().max()
        assert on_line < 1e-12
        torch.testing.assert_close(info["denoised"].masked_select(kept), latent.masked_select(kept))
    # the teacher factorises over locations, so the generated region is the teacher's own Euler ODE there
    grid = torch.cat([substep_sigmas(float(a), float(b))[:-1] for a, b in itertools.pairwise(sigmas)] + [sigmas[-1:]])
    generated_error = float((got - teacher_euler(teacher, x, grid)).masked_select(~kept).abs().max())
    print(f"denoise {denoise}: kept region max|out - original| = {kept_error:.1e}, "
          f"generated region max|out - teacher Euler| = {generated_error:.1e}")
    assert kept_error < 1e-12 and generated_error < 1e-11
    assert (got - latent).masked_select(~kept).abs().max() > 0.1
    # a mask of ones is plain sampling, bit for bit
    ones = torch.ones_like(mask)
    plain = sample_piflow(exact_policy(teacher), x, sigmas, temperature=1.0, disable=True)
    assert torch.equal(sample_piflow(exact_policy(teacher), x, sigmas, temperature=1.0, latent_image=latent,
                                     denoise_mask=ones, disable=True), plain)


def test_soft_masks_stochastic_steps_and_mask_functions_match_the_official_loop(inpainting_setup):
    teacher, noise, latent, mask = inpainting_setup
    g = torch.Generator().manual_seed(14)
    soft = torch.rand(mask.shape, generator=g, dtype=F64)
    sigmas = piflow_sigmas(3)
    noises = [torch.randn(noise.shape, generator=g, dtype=F64) for _ in range(3)]
    masks = [soft, mask, torch.ones_like(mask)]  # a different mask per step, as a denoise_mask_function gives
    seen = []

    def mask_function(sigma_batch):
        seen.append(float(sigma_batch[0]))
        return masks[len(seen) - 1]

    draws = iter(noises)
    got = sample_piflow(exact_policy(teacher), noise, sigmas, temperature=1.0, h=0.7,
                        noise_sampler=lambda s, t: next(draws), latent_image=latent, denoise_mask=mask_function,
                        disable=True)
    want = official_sample(exact_policy(teacher), noise, sigmas, h=0.7, noises=noises, latent=latent, masks=masks)
    assert seen == pytest.approx(sigmas[:-1].tolist())
    error = float((got - want).abs().max())
    print(f"soft/per-step masks with h = 0.7 vs the official loop: max |diff| = {error:.1e}")
    assert error < 1e-11
    # stochastic steps re-noise the kept region too, and it still ends at the original latent
    draws = iter(noises)
    kept_only = sample_piflow(exact_policy(teacher), noise, sigmas, temperature=1.0, h=0.7,
                              noise_sampler=lambda s, t: next(draws), latent_image=latent, denoise_mask=mask,
                              disable=True)
    torch.testing.assert_close(kept_only.masked_select((mask == 0).expand_as(noise)),
                               latent.masked_select((mask == 0).expand_as(noise)), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="latent_image"):
        sample_piflow(exact_policy(teacher), noise, sigmas, denoise_mask=mask, disable=True)


# -- a policy of the unfolded latent on the folded one (FLUX.2) --------------------------------------
def unfold(x):
    return F.pixel_shuffle(x, 2)


def fold(x):
    return F.pixel_unshuffle(x, 2)


def folded_gm_setup(seed=20):
    """A GM network output on a 32-channel 6x8 latent (FLUX.2's policy latent) and a 128-channel 3x4 latent."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(2, 8, 32, 6, 8, generator=g, dtype=F64)
    logweights = torch.randn(2, 8, 1, 6, 8, generator=g, dtype=F64)
    logstds = torch.full((2, 1, 1, 1, 1), -1.0, dtype=F64)
    x = torch.randn(2, 128, 3, 4, generator=g, dtype=F64)
    return means, logweights, logstds, x, g


def test_packed_latent_policy_is_the_unfolded_policy():
    means, logweights, logstds, x, g = folded_gm_setup()
    inner = GMPolicy.from_velocity(means, logweights, logstds, unfold(x), 0.8)
    policy = PackedLatentPolicy(inner, 2)
    x_t = x + 0.1 * torch.randn(x.shape, generator=g, dtype=F64)
    torch.testing.assert_close(policy.velocity(x_t, 0.6), fold(inner.velocity(unfold(x_t), 0.6)))
    torch.testing.assert_close(policy.x0(x_t, 0.6), fold(inner.x0(unfold(x_t), 0.6)))
    torch.testing.assert_close(policy.denoised, fold(inner.denoised))
    cooled = with_temperature(policy, 0.3)
    assert isinstance(cooled, PackedLatentPolicy)
    torch.testing.assert_close(cooled.x0(x_t, 0.6), fold(inner.with_temperature(0.3).x0(unfold(x_t), 0.6)))
    # DX has no temperature: unchanged, also inside the wrapper
    dx = DXPolicy.from_velocity(means[:, :3], unfold(x), 0.8, 1 / 3.5)
    assert with_temperature(dx, 0.3) is dx and with_temperature(PackedLatentPolicy(dx, 2), 0.3).inner is dx
    # the per-location mixture is not a mixture over the folded channels: the folded policy differs
    folded_weights = fold(logweights.flatten(0, 1)).view(2, 8, 4, 3, 4)[:, :, :1]
    naive = GMPolicy.from_velocity(fold(means.flatten(0, 1)).view(2, 8, 128, 3, 4), folded_weights, logstds, x, 0.8)
    assert (naive.velocity(x_t, 0.6) - policy.velocity(x_t, 0.6)).abs().max() > 1e-3


def test_sampling_on_the_folded_latent_is_the_unfolded_sampling():
    """4 NFE with "auto" temperature (0.3 on the first three steps) and an inpainting mask at the folded
    resolution (ComfyUI prepares it at the latent's size): the folded run is the unfolded run, folded, with
    the mask upsampled to the 2x2 patches it covers."""
    means, logweights, logstds, x, g = folded_gm_setup(seed=21)
    latent = torch.randn(x.shape, generator=g, dtype=F64)
    mask = torch.zeros(2, 1, 3, 4, dtype=F64)
    mask[..., :, :2] = 1

    def unfolded_model(x_src, sigma):
        return GMPolicy.from_velocity(means, logweights, logstds, x_src, sigma)

    def folded_model(x_src, sigma):
        return PackedLatentPolicy(unfolded_model(unfold(x_src), sigma), 2)

    sigmas = piflow_sigmas(4)
    got = sample_piflow(folded_model, x, sigmas, temperature="auto", latent_image=latent, denoise_mask=mask,
                        disable=True)
    unfolded_mask = mask.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    want = sample_piflow(unfolded_model, unfold(x), sigmas, temperature="auto", latent_image=unfold(latent),
                         denoise_mask=unfolded_mask, disable=True)
    error = float((got - fold(want)).abs().max())
    print(f"folded vs unfolded 4-NFE sampling, auto temperature, masked: max |diff| = {error:.1e}")
    assert error < 1e-12
    kept = (mask == 0).expand_as(x)
    assert float((got - latent).masked_select(kept).abs().max()) < 1e-12
    warm = sample_piflow(folded_model, x, sigmas, temperature=1.0, latent_image=latent, denoise_mask=mask, disable=True)
    assert (warm - got).abs().max() > 1e-3, "the temperature reaches the wrapped policy"


# -- video latents -------------------------------------------------------------------------------
def _per_position_policy(kind: str):
    """A policy network acting on each latent position alone (a toy of the right shape, any number of axes):
    GM means / log-weights and DX x0 terms are fixed functions of the position's channel vector."""
    def model(x, sigma, **_):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        if kind == "GM":
            means = torch.stack([0.6 * x - 0.2, -0.4 * x + 0.3 * s, x.tanh()], dim=1)
            logweights = torch.stack([x.sum(1, keepdim=True) * w for w in (0.5, -0.3, 0.1)], dim=1)
            return GMPolicy(means, logweights, 0.05 + 0.1 * sigma, x, sigma)
        terms = torch.stack([(1 - n / 10) * x.sin() + n / 10 * 0.5 * x for n in range(10)], dim=1)
        return DXPolicy(terms, x, sigma, segment_size=1 / 3.5)
    return model


@pytest.mark.parametrize("key, h", [("pi-flux1-gm-4step", 0.0), ("pi-flux1-gm-4step", 0.6), ("pi-flux1-dx-4step", 0.0)])
def test_video_latents_sample_like_their_frames_stacked(key, h):
    """A [B, C, T, H, W] latent samples, with the registry's pi-Flow settings (GM temperature 'auto' and a
    stochastic step too), exactly as the same numbers laid out as a [B, C, T * H, W] image: the policies and the
    sampler treat the extra axis as just more positions."""
    entry = method(key)
    sigmas = method_sigmas(entry, FLOW)
    video = torch.randn(2, 4, 3, 4, 5, generator=torch.Generator().manual_seed(9), dtype=F64)
    image = video.reshape(2, 4, -1, 5)
    kind = "DX" if "-dx-" in key else "GM"
    runs = []
    for x in (video, image):
        seen = []
        final = build_sampler(entry, FLOW, h=h)(_per_position_policy(kind), x, sigmas, {"seed": 4},
                                                callback=lambda info, seen=seen: seen.append(info["denoised"]),
                                                disable=True)
        runs.append([*seen, final])
    for frames, flat in zip(*runs, strict=True):
        assert frames.shape == video.shape and torch.isfinite(frames).all()
        assert torch.equal(frames.reshape(flat.shape), flat)
