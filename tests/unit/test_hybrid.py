"""Hybrid (diversity-distillation) sampling: exact limits, the hand-over, noise conventions, and the
diversity it restores on the reference teacher with a mode-collapsed distilled partner."""
import functools
import time

import pytest
import torch

from distill_core.reference import metrics
from distill_core.reference.demo import demo_mixture
from distill_core.reference.mixture import GaussianMixture
from distill_core.sampling import lcm, tcd
from distill_core.sampling.hybrid import HybridPhase, handover_seed, sample_hybrid, split_schedule
from distill_core.sampling.schedules import lcm_timesteps
from distill_core.spaces import NoiseSpace, convert_latent, convert_sigmas, scaled_linear_alphas_cumprod

VE = NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
FLOW = NoiseSpace.flow()
SEED = 123


@pytest.fixture(scope="module")
def small_mixture() -> GaussianMixture:
    return demo_mixture(size=4)


def start_latent(mixture: GaussianMixture, sigma: torch.Tensor, n: int = 6, seed: int = 0) -> torch.Tensor:
    """Unit noise scaled like ComfyUI's EPS ``noise_scaling`` at the schedule's maximum sigma."""
    noise = torch.randn((n, *mixture.latent_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return noise * (1 + sigma**2).sqrt()


def phases(mixture, distilled_space, base_sampler=None, distilled_sampler=None, collapsed=None):
    """Base: exact denoiser in VE with DDIM (or ``base_sampler``); distilled: flow map (of ``collapsed``)
    with LCM (or ``distilled_sampler``) in ``distilled_space``."""
    student = collapsed if collapsed is not None else mixture
    base = HybridPhase(lambda x, s, **_: mixture.denoise(x, s, VE),
                       base_sampler or functools.partial(tcd.sample_tcd, space=VE, gamma=0.0), VE)
    distilled = HybridPhase(lambda x, s, **_: student.flow_map(x, s, distilled_space, steps=8),
                            distilled_sampler or functools.partial(lcm.sample_lcm, space=distilled_space),
                            distilled_space)
    return base, distilled


SIGMAS = VE.sigmas_for_timesteps(lcm_timesteps(4))


# ------------------------------------------------------------------------------------------
# Noise-convention conversion
# ------------------------------------------------------------------------------------------
def test_sigma_conversion_matches_snr_and_round_trips():
    flow_sigmas = convert_sigmas(SIGMAS, VE, FLOW)
    assert torch.allclose(flow_sigmas, SIGMAS / (1 + SIGMAS), rtol=1e-14, atol=0)
    assert torch.allclose(convert_sigmas(flow_sigmas, FLOW, VE), SIGMAS, rtol=1e-12, atol=0)
    a_ve, b_ve = VE.coefficients(SIGMAS[:-1])
    a_fl, b_fl = FLOW.coefficients(flow_sigmas[:-1])
    assert torch.allclose(b_ve / a_ve, b_fl / a_fl, rtol=1e-12)


def test_latent_conversion_round_trips_and_keeps_x0_and_noise(small_mixture):
    x0, _ = small_mixture.sample(5, torch.Generator().manual_seed(1))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = SIGMAS[1]
    s = convert_sigmas(sigma, VE, FLOW)
    x_ve = VE.noise(x0, eps, sigma)
    x_flow = convert_latent(x_ve, sigma, VE, FLOW)
    assert torch.allclose(x_flow, FLOW.noise(x0, eps, s), atol=1e-12)
    assert torch.allclose(x_flow, (1 - s) * x_ve, atol=1e-12)
    assert torch.allclose(convert_latent(x_flow, s, FLOW, VE), x_ve, atol=1e-12)


def test_per_sample_sigmas_convert_per_sample(small_mixture):
    x = torch.randn((3, *small_mixture.latent_shape), dtype=torch.float64)
    sigmas = SIGMAS[:3]
    batched = convert_latent(x, sigmas, VE, FLOW)
    one_by_one = torch.cat([convert_latent(x[i : i + 1], sigmas[i], VE, FLOW) for i in range(3)])
    assert torch.allclose(batched, one_by_one, atol=0)


def test_exact_teacher_predicts_the_same_x0_from_converted_inputs(small_mixture):
    x = start_latent(small_mixture, SIGMAS[1], n=5, seed=3)
    for sigma in SIGMAS[1:4]:
        x_flow = convert_latent(x, sigma, VE, FLOW)
        s = convert_sigmas(sigma, VE, FLOW)
        assert torch.allclose(small_mixture.denoise(x, sigma, VE), small_mixture.denoise(x_flow, s, FLOW), atol=1e-10)


def test_same_kind_conversion_is_the_identity():
    x = torch.randn(2, 4, 2, 2)
    assert convert_sigmas(SIGMAS, VE, VE) is SIGMAS
    assert convert_latent(x, 0.5, FLOW, FLOW) is x


def test_pure_noise_of_a_flow_model_has_no_ve_equivalent():
    with pytest.raises(ValueError, match="pure noise"):
        convert_sigmas(torch.tensor([1.0, 0.5]), FLOW, VE)


# ------------------------------------------------------------------------------------------
# Schedule split and exact limits
# ------------------------------------------------------------------------------------------
def test_split_schedule_shares_the_handover_sigma():
    base_sigmas, distilled_sigmas = split_schedule(SIGMAS, 1, VE, FLOW)
    assert torch.equal(base_sigmas, SIGMAS[:2])
    assert torch.allclose(distilled_sigmas, SIGMAS[1:] / (1 + SIGMAS[1:]), rtol=1e-14)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="handover_steps"):
            split_schedule(SIGMAS, bad, VE, FLOW)


def test_handover_seed_moves_away_from_the_seed_and_its_neighbours():
    seeds = {handover_seed(s) for s in range(100)}
    assert seeds.isdisjoint(range(100)) and len(seeds) == 100
    assert 0 <= handover_seed(2**64 - 1) < 2**64
    assert handover_seed(None) is None


@pytest.mark.parametrize("distilled_space", [VE, FLOW], ids=["ve", "flow"])
def test_no_handover_is_exactly_the_distilled_sampler(small_mixture, distilled_space):
    base, distilled = phases(small_mixture, distilled_space)
    x = start_latent(small_mixture, SIGMAS[0])
    got = sample_hybrid(base, distilled, x, SIGMAS, handover_steps=0, seed=SEED)
    alone = lcm.sample_lcm(distilled.model, convert_latent(x, SIGMAS[0], VE, distilled_space),
                           convert_sigmas(SIGMAS, VE, distilled_space), extra_args={"seed": SEED},
                           space=distilled_space)
    assert torch.equal(got, alone)


def test_handing_over_after_every_step_is_exactly_the_base_sampler(small_mixture):
    stochastic_base = functools.partial(tcd.sample_tcd, space=VE, gamma=0.3)
    base, distilled = phases(small_mixture, FLOW, base_sampler=stochastic_base)
    x = start_latent(small_mixture, SIGMAS[0])
    got = sample_hybrid(base, distilled, x, SIGMAS, handover_steps=4, seed=SEED)
    alone = stochastic_base(base.model, x, SIGMAS, extra_args={"seed": SEED})
    assert torch.equal(got, alone)


@pytest.mark.parametrize("base_kind", ["ddim", "lcm", "tcd"])
@pytest.mark.parametrize("handover_steps", [1, 2])
def test_handover_latent_is_the_base_samplers_latent_at_that_step(small_mixture, base_kind, handover_steps):
    base_sampler = {
        "ddim": functools.partial(tcd.sample_tcd, space=VE, gamma=0.0),
        "lcm": functools.partial(lcm.sample_lcm, space=VE),
        "tcd": functools.partial(tcd.sample_tcd, space=VE, gamma=0.3),
    }[base_kind]
    handed_over = {}

    def spy_distilled_sampler(model, x, sigmas, **kwargs):
        handed_over["x"], handed_over["sigma"] = x, sigmas[0]
        return lcm.sample_lcm(model, x, sigmas, space=FLOW, **kwargs)

    base, distilled = phases(small_mixture, FLOW, base_sampler=base_sampler, distilled_sampler=spy_distilled_sampler)
    x = start_latent(small_mixture, SIGMAS[0])
    base_latents = {}
    base_sampler(base.model, x, SIGMAS, extra_args={"seed": SEED},
                 callback=lambda info: base_latents.setdefault(info["i"], info["x"]))
    sample_hybrid(base, distilled, x, SIGMAS, handover_steps=handover_steps, seed=SEED)
    sigma = SIGMAS[handover_steps]
    assert torch.allclose(handed_over["sigma"], sigma / (1 + sigma), rtol=1e-14)
    back_in_ve = convert_latent(handed_over["x"], handed_over["sigma"], FLOW, VE)
    assert torch.allclose(back_in_ve, base_latents[handover_steps], rtol=1e-12, atol=1e-12)


def test_callback_counts_steps_over_the_whole_schedule_with_each_phases_space(small_mixture):
    base, distilled = phases(small_mixture, FLOW)
    seen = []
    sample_hybrid(base, distilled, start_latent(small_mixture, SIGMAS[0]), SIGMAS, handover_steps=1, seed=SEED,
                  callback=lambda info: seen.append((info["i"], info["space"].kind, float(info["sigma"]))))
    assert [(i, kind) for i, kind, _ in seen] == [(0, "ve"), (1, "flow"), (2, "flow"), (3, "flow")]
    assert seen[1][2] == pytest.approx(float(SIGMAS[1] / (1 + SIGMAS[1])), rel=1e-12)


# ------------------------------------------------------------------------------------------
# Diversity restored: base = exact denoiser, distilled = flow map of a mode-collapsed partner
# ------------------------------------------------------------------------------------------
def counted(model, counter: dict, key: str):
    def call(x, sigma, **kwargs):
        counter[key] += 1
        return model(x, sigma, **kwargs)

    return call


def test_one_base_step_restores_the_base_models_mode_diversity():
    """The paper's setting on the reference teacher: 4-step LCM schedule, base (exact denoiser of the
    8-mode demo mixture, DDIM) at t=999, distilled (exact flow map of a partner that keeps 90% of the
    mass on 2 modes and 10% on the other 6, LCM sampler) at 759, 499, 259. Unconditional, CFG 1 in both
    phases (one model pass per step)."""
    started = time.perf_counter()
    mixture = demo_mixture()
    collapsed = mixture.sharpened(keep=[0, 2], residual_weight=0.1)
    base, distilled = phases(mixture, VE, collapsed=collapsed)
    calls = {"base": 0, "distilled": 0}
    base = HybridPhase(counted(base.model, calls, "base"), base.sampler, VE)
    distilled = HybridPhase(counted(distilled.model, calls, "distilled"), distilled.sampler, VE)
    x = start_latent(mixture, SIGMAS[0], n=1024, seed=0)

    results = {}
    for name, handover_steps in (("distilled", 0), ("hybrid", 1), ("base", 4)):
        calls.update(base=0, distilled=0)
        samples = sample_hybrid(base, distilled, x, SIGMAS, handover_steps=handover_steps, seed=SEED)
        results[name] = (metrics.mode_entropy(samples, mixture).samples, metrics.mode_recall(samples, mixture),
                         calls["base"] + calls["distilled"], dict(calls))
    for name, (entropy, recall, nfe, per_model) in results.items():
        print(f"{name:9s} mode entropy {entropy:.3f}  mode recall {recall:.3f}  NFE {nfe} {per_model}")
    print(f"({time.perf_counter() - started:.1f} s)")

    base_entropy, base_recall, base_nfe, _ = results["base"]
    distilled_entropy, distilled_recall, distilled_nfe, _ = results["distilled"]
    hybrid_entropy, hybrid_recall, hybrid_nfe, hybrid_calls = results["hybrid"]
    assert distilled_entropy < 0.8 * base_entropy and distilled_recall <= 0.75, "the partner must be collapsed"
    assert hybrid_entropy > distilled_entropy + 0.2 and hybrid_recall > distilled_recall
    assert hybrid_entropy >= 0.95 * base_entropy and hybrid_recall >= 0.95 * base_recall
    # one base step (1 pass, CFG 1) replaces one distilled step: NFE = distilled NFE - k + k * base passes
    assert hybrid_calls == {"base": 1, "distilled": 3} and hybrid_nfe == distilled_nfe == base_nfe == 4
