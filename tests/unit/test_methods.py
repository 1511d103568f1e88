"""The method registry against each family's official schedule and sampler.

Schedules: for every entry and every published step count, Stride's timesteps / sigmas equal those of
the scheduler the authors use (diffusers, configured as their code configures it) or, where the authors
ship their own code, that code's formula written out here independently. Samplers: each registry
sampler run on identical inputs equals the authors' loop, on 4-D image and 5-D video latents. diffusers'
Euler schedulers compute each step in float32 (they upcast the sample), so those comparisons hold to
float32 rounding; the formulas written here run in float64 and agree to 1e-12.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

from distill_core import methods
from distill_core.methods import (
    METHODS,
    build_sampler,
    check_model_kind,
    check_steps,
    method,
    method_sigmas,
)
from distill_core.sampling import lcm
from distill_core.sampling.hybrid import HybridPhase, handover_steps_at, sample_hybrid
from distill_core.sampling.schedules import flux_image_seq_len
from distill_core.spaces import NoiseSpace
from tests.unit.diffusion_toys import seeded_noise, toy_eps
from tests.unit.test_schedules import OFFICIAL_TDD_EQUIDISTANT

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
ALPHAS_CUMPROD = LCMScheduler(**SD_BETAS).alphas_cumprod.double()
VE = NoiseSpace.from_alphas_cumprod(ALPHAS_CUMPROD)
FLOW = NoiseSpace.flow(1.0)
SHAPES = {"image": (2, 4, 6, 6), "video": (1, 4, 3, 4, 4)}  # [B, C, H, W] and [B, C, T, H, W]
FLUX_DEV_SCHEDULER = {  # FLUX.1-dev's scheduler_config.json
    "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096}
QWEN_LIGHTNING_SCHEDULER = {  # Qwen-Image-Lightning's generate_with_diffusers.py
    "base_image_seq_len": 256, "base_shift": math.log(3), "max_image_seq_len": 8192, "max_shift": math.log(3),
    "shift": 1.0, "use_dynamic_shifting": True, "time_shift_type": "exponential"}
QWEN_MU = calculate_shift(4096, 256, 8192, math.log(3), math.log(3))  # ln 3 at every size
SEQ_LENS = (1024, 4096, 6400)  # 512^2, 1024^2 and 1280^2 images as FLUX tokens


def _ints(timesteps) -> list[int]:
    return [round(float(t)) for t in timesteps]


def _diffusers_timesteps(scheduler, steps: int | None = None, **kwargs) -> list[int]:
    scheduler.set_timesteps(steps, **kwargs)
    return _ints(scheduler.timesteps)


def _flow_match(steps: int, sigmas=None, mu=None, **config) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(None if sigmas is not None else steps, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.double()


def _pipeline_sigmas(steps: int) -> np.ndarray:
    """FluxPipeline / QwenImagePipeline's ``np.linspace(1.0, 1 / N, N)``."""
    return np.linspace(1.0, 1 / steps, steps)


def _shift(t, shift: float):
    return shift * t / (1 + (shift - 1) * t)


# ------------------------------------------------------------------------------------------
# Official schedules, one per registry entry
# ------------------------------------------------------------------------------------------
def _official_timesteps(key: str, steps: int) -> list[int]:
    """Discrete-time entries: the authors' scheduler (diffusers) or their published lists."""
    trailing_ddim = DDIMScheduler(**SD_BETAS, timestep_spacing="trailing")
    if key == "lcm-lora":
        return _diffusers_timesteps(LCMScheduler(**SD_BETAS), steps)
    if key in ("tcd-lora", "hyper-sd-unified"):
        return _diffusers_timesteps(TCDScheduler(**SD_BETAS), steps)
    if key.startswith("hyper-sd-") and key.endswith(("step", "step-cfg")):
        return _diffusers_timesteps(trailing_ddim, steps)
    if key == "hyper-sdxl-1step-unet":
        return _diffusers_timesteps(LCMScheduler(**SD_BETAS), timesteps=[800])
    if key == "tdd-sdxl":
        return OFFICIAL_TDD_EQUIDISTANT[steps]
    if key == "sdxl-lightning-1step-x0":
        return _diffusers_timesteps(EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing",
                                                           prediction_type="sample"), steps)
    if key.startswith("sdxl-lightning-"):
        return _diffusers_timesteps(EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing"), steps)
    if key == "dmd2-sdxl-4step":  # README: LCMScheduler(timesteps=...); demo: all_timesteps = [999, 749, 499, 249]
        assert _diffusers_timesteps(LCMScheduler(**SD_BETAS), timesteps=[999, 749, 499, 249]) == [999, 749, 499, 249]
        return [999, 749, 499, 249]
    if key == "dmd2-sdxl-1step":  # demo: --num_step 1 --conditioning_timestep 399
        return _diffusers_timesteps(LCMScheduler(**SD_BETAS), timesteps=[399])
    raise KeyError(key)


def _piflow_official(steps: int, shift: float = 3.2, final_scale: float = 0.5) -> torch.Tensor:
    """FlowMapSDEScheduler.set_timesteps (Lakonik/piFlow): float32 raw times, then the fixed-shift warp."""
    raw = np.linspace(1, (final_scale - 1) / (steps + final_scale - 1), steps, dtype=np.float32, endpoint=False)
    sigmas = _shift(torch.from_numpy(raw).clamp(min=0).double(), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _lightx2v_official(step_list=(1000, 750, 500, 250), shift: float = 5.0) -> torch.Tensor:
    """WanStepDistillScheduler (ModelTC/LightX2V): a 1000-entry shifted table read at 1000 - step."""
    table = _shift(torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1], shift)
    return torch.cat([table[[1000 - t for t in step_list]], torch.zeros(1, dtype=torch.float64)])


def _wan22_lightning_official(steps: int, shift: float = 5.0) -> torch.Tensor:
    """Wan2.2-Lightning's EulerScheduler: timesteps linspace(1000, 0, N + 1) in float32, shifted."""
    t = torch.from_numpy(np.linspace(1000, 0, steps + 1, dtype=np.float32)).double() / 1000
    return _shift(t, shift)


def _bfl_schedule(steps: int, image_seq_len: int, shift: bool) -> torch.Tensor:
    """black-forest-labs/flux get_schedule: linspace(1, 0, N + 1), time_shift(mu) unless schnell."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if not shift:
        return t
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_seq_len - 256)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def _official_flow_sigmas(key: str, steps: int, seq_len: int) -> list[torch.Tensor]:
    """Flow entries: every official source of the schedule (each must agree with Stride's)."""
    if key in ("hyper-flux-8step", "hyper-flux-16step", "tdd-flux"):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        return [_flow_match(steps, _pipeline_sigmas(steps), mu, **FLUX_DEV_SCHEDULER),
                _bfl_schedule(steps, seq_len, True)]
    if key.startswith("pi-"):
        return [_piflow_official(steps)]
    if key == "flux1-schnell":
        return [_flow_match(steps, _pipeline_sigmas(steps), None, shift=1.0), _bfl_schedule(steps, seq_len, False)]
    if key == "sd35-large-turbo":  # StableDiffusion3Pipeline passes no sigmas; the scheduler has shift 3.0
        return [_flow_match(steps, shift=3.0)]
    if key.startswith("qwen-image-lightning-"):
        mu = calculate_shift(seq_len, 256, 8192, math.log(3), math.log(3))
        return [_flow_match(steps, _pipeline_sigmas(steps), mu, **QWEN_LIGHTNING_SCHEDULER)]
    if key == "z-image-turbo":
        zimage_repo = _shift(torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1], 3.0)  # Z-Image's own scheduler
        return [_flow_match(steps, get_default_z_image_sigmas(steps), 0.5, shift=3.0),
                torch.cat([zimage_repo, zimage_repo.new_zeros(1)])]
    if key == "wan21-lightx2v-4step":
        return [_lightx2v_official()]
    if key.startswith("wan22-lightning-"):
        return [_wan22_lightning_official(steps)]
    raise KeyError(key)


VE_KEYS = [key for key, entry in METHODS.items() if entry.schedule.space_kind == "ve"]
FLOW_KEYS = [key for key, entry in METHODS.items() if entry.schedule.space_kind == "flow"]


@pytest.mark.parametrize("key", VE_KEYS)
def test_discrete_schedules_equal_official(key):
    entry = method(key)
    for steps in entry.steps:
        official = _official_timesteps(key, steps)
        assert entry.schedule.timesteps(steps) == official, steps
        assert torch.equal(method_sigmas(entry, VE, steps), VE.sigmas_for_timesteps(official))


@pytest.mark.parametrize("key", FLOW_KEYS)
def test_flow_schedules_equal_official(key):
    entry = method(key)
    for steps in entry.steps:
        for seq_len in SEQ_LENS:
            ours = method_sigmas(entry, FLOW, steps, image_seq_len=seq_len)
            for official in _official_flow_sigmas(key, steps, seq_len):
                torch.testing.assert_close(ours, official, rtol=0, atol=3e-7, msg=f"{steps} steps, {seq_len} tokens")


def test_lightning_sigmas_equal_euler_discrete():
    """EulerDiscreteScheduler's own SIGMAS (trailing) are the VE table at the registry's timesteps, then 0."""
    for steps in (1, 2, 4, 8):
        scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        key = "sdxl-lightning-1step-x0" if steps == 1 else f"sdxl-lightning-{steps}step"
        torch.testing.assert_close(method_sigmas(method(key), VE), scheduler.sigmas.double(), rtol=1e-6, atol=0)


def test_published_values():
    """The numbers the model cards and configs state, independent of any scheduler code."""
    def sigmas(key, **kw):
        return [round(v, 4) for v in method_sigmas(method(key), FLOW, **kw).tolist()]
    assert sigmas("wan22-lightning-t2v-a14b") == [1.0, 0.9375, 0.8333, 0.625, 0.0]
    assert sigmas("wan21-lightx2v-4step") == [1.0, 0.9375, 0.8333, 0.625, 0.0]
    assert sigmas("pi-flux1-gm-4step") == [1.0, 0.8889, 0.7059, 0.3478, 0.0]
    assert sigmas("flux1-schnell") == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert method("dmd2-sdxl-4step").schedule.timesteps(4) == [999, 749, 499, 249]
    assert method("dmd2-sdxl-1step").schedule.timesteps(1) == [399]
    assert method("hyper-sdxl-1step-unet").schedule.timesteps(1) == [800]
    assert method("tdd-sdxl").cfg == 1.7 and method("tdd-sdxl").sampler.knobs["eta"] == 0.2
    assert method("tcd-lora").sampler.knobs["gamma"] == 0.3
    assert method("hyper-flux-8step").lora_strength == 0.125 and method("hyper-flux-8step").flux_guidance == 3.5
    assert method("pi-flux2-gm").flux_guidance == 4.0


def test_every_entry_has_a_reference_and_a_source():
    for key, entry in METHODS.items():
        assert entry.sources, key
        if key in VE_KEYS:
            _official_timesteps(key, entry.default_steps)
        else:
            _official_flow_sigmas(key, entry.default_steps, 4096)
        assert entry.label in entry.tooltip()
        for fact in entry.unconfirmed:
            assert fact in entry.tooltip()


# ------------------------------------------------------------------------------------------
# Expert hand-over (Wan 2.2 A14B)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, boundary", [("wan22-lightning-t2v-a14b", 0.875), ("wan22-lightning-i2v-a14b", 0.9)])
def test_expert_boundary_splits_like_wan22(key, boundary):
    entry = method(key)
    assert entry.expert_boundary == boundary
    sigmas = method_sigmas(entry, FLOW)
    # official: the high-noise model runs while t.item() >= boundary * num_train_timesteps, t = 1000 sigma (float32)
    timesteps = (sigmas[:-1] * 1000).float()
    official = sum(1 for t in timesteps.tolist() if t >= boundary * 1000)
    assert handover_steps_at(sigmas, boundary) == official == 2
    # Wan 2.2's own 40-step schedules (UniPC there, same boundary rule): T2V at shift 12, I2V at shift 5
    base = _shift(torch.linspace(1, 0, 41, dtype=torch.float64)[:-1], 12.0 if "t2v" in key else 5.0)
    assert handover_steps_at(torch.cat([base, base.new_zeros(1)]), boundary) == int((base >= boundary).sum())
    with pytest.raises(ValueError, match="positive sigma"):
        handover_steps_at(sigmas, 0.0)


@pytest.mark.parametrize("key", ["wan22-lightning-t2v-a14b", "wan22-lightning-i2v-a14b"])
def test_two_expert_handover_equals_wan22_loop(key):
    """Hybrid sampling with the registry boundary equals Wan2.2-Lightning's loop, which picks the high-noise
    model while t >= boundary * 1000 and takes Euler steps, on a 5-D video latent."""
    entry = method(key)
    sigmas = method_sigmas(entry, FLOW)
    def high(x, s):
        return toy_eps(x, s * 1000)  # two different toy experts (velocities)
    def low(x, s):
        return 0.5 * toy_eps(x.flip(2), s * 700) - 0.1 * x
    x = _start(SHAPES["video"])
    latent, used = x, []
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=False):
        expert = high if sigma * 1000 >= entry.expert_boundary * 1000 else low
        used.append("high" if expert is high else "low")
        latent = latent + (sigma_next - sigma) * expert(latent, sigma)
    def as_denoiser(velocity):
        return (lambda z, s, **_: z - float(s[0]) * velocity(z, float(s[0])))
    phases = [HybridPhase(as_denoiser(v), build_sampler(entry, FLOW), FLOW) for v in (high, low)]
    seen = []
    ours = sample_hybrid(*phases, x, sigmas, handover_steps_at(sigmas, entry.expert_boundary),
                         callback=lambda info: seen.append(info["i"]))
    assert used == ["high", "high", "low", "low"] and seen == [0, 1, 2, 3]
    torch.testing.assert_close(ours, latent, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Samplers on identical inputs
# ------------------------------------------------------------------------------------------
def _toy_x0(x_vp: torch.Tensor, t) -> torch.Tensor:
    """A toy x0-prediction network (SDXL-Lightning's 1-step UNet predicts 'sample')."""
    return 0.7 * x_vp - 0.5 * toy_eps(x_vp, t)


def _ve_model(prediction: str):
    """The toy network as a k-diffusion denoiser on VE latents, in the network's own parameterisation."""

    def model(x, sigma, **_):
        s = float(sigma.reshape(-1)[0])
        t = int(VE.timestep_of(s).round())
        x_vp = x / (1 + s**2) ** 0.5
        return _toy_x0(x_vp, t) if prediction == "x0" else x - s * toy_eps(x_vp, t)

    return model


def _velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A toy flow network: velocity u = eps - x0 at (x, sigma)."""
    return toy_eps(x, sigma * 1000)


def _flow_model(x, sigma, **_):
    s = float(sigma.reshape(-1)[0])
    return x - s * _velocity(x, s)


def _run(entry, space, model, x, sigmas, noise_seed=0, **overrides):
    seen = []
    final = build_sampler(entry, space, **overrides)(model, x, sigmas, callback=lambda info: seen.append(info["x"]),
                                                     disable=True, noise_sampler=seeded_noise(noise_seed, x.shape))
    return [*seen[1:], final]


def _start(shape, seed=3) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("key", ["sdxl-lightning-2step", "sdxl-lightning-4step", "sdxl-lightning-8step",
                                 "sdxl-lightning-1step-x0"])
def test_lightning_euler_equals_euler_discrete(key, shape):
    """The authors' EulerDiscreteScheduler (trailing; 'sample' prediction for 1 step) on the same VE latents."""
    entry = method(key)
    prediction = "x0" if entry.model_kind == "x0" else "eps"
    scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing",
                                       prediction_type="sample" if prediction == "x0" else "epsilon")
    scheduler.set_timesteps(entry.default_steps)
    x = _start(shape) * scheduler.init_noise_sigma
    expected, latent = [], x
    for t, sigma in zip(scheduler.timesteps.tolist(), scheduler.sigmas.tolist(), strict=False):
        x_vp = latent / (sigma**2 + 1) ** 0.5
        output = _toy_x0(x_vp, int(t)) if prediction == "x0" else toy_eps(x_vp, int(t))
        latent = scheduler.step(output.float(), t, latent.float()).prev_sample.double()
        expected.append(latent)
    ours = _run(entry, VE, _ve_model(prediction), x, method_sigmas(entry, VE))
    for mine, reference in zip(ours, expected, strict=True):
        torch.testing.assert_close(mine, reference, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_hyper_nstep_euler_equals_ddim_trailing(steps, shape):
    """Hyper-SD's DDIMScheduler (trailing, eta 0) in float64: every latent, and x0 at the end (DDIM's own last
    step stops at alphas_cumprod[0], a sigma of 0.029, where SIGMAS end at 0)."""
    entry = method(f"hyper-sd-{steps}step")
    scheduler = DDIMScheduler(**SD_BETAS, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(steps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    x_vp = _start(shape)
    expected, latent = [], x_vp
    for t in scheduler.timesteps.tolist():
        out = scheduler.step(toy_eps(latent, t), t, latent)
        latent = out.prev_sample
        expected.append(latent)
    expected[-1] = out.pred_original_sample
    sigmas = method_sigmas(entry, VE)
    ours = _run(entry, VE, _ve_model("eps"), x_vp * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas)
    for mine, sigma, reference in zip(ours, sigmas[1:].tolist(), expected, strict=True):
        torch.testing.assert_close(mine / (1 + sigma**2) ** 0.5, reference, rtol=0, atol=1e-12)


def _flow_scheduler(key: str, steps: int, seq_len: int) -> FlowMatchEulerDiscreteScheduler:
    """FlowMatchEulerDiscreteScheduler set up as the family's pipeline sets it up."""
    if key in ("hyper-flux-8step", "hyper-flux-16step", "tdd-flux"):
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
        scheduler.set_timesteps(sigmas=_pipeline_sigmas(steps), mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    elif key.startswith("qwen-image-lightning-"):
        scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_LIGHTNING_SCHEDULER)
        scheduler.set_timesteps(sigmas=_pipeline_sigmas(steps), mu=QWEN_MU)
    elif key == "flux1-schnell":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        scheduler.set_timesteps(sigmas=_pipeline_sigmas(steps))
    elif key == "sd35-large-turbo":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
    elif key in ("z-image-turbo", "wan21-lightx2v-4step") or key.startswith("wan22-"):
        # Z-Image's and Wan's Euler steps are FlowMatchEuler's update on their own sigmas
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if key == "z-image-turbo" else 5.0)
        scheduler.set_timesteps(sigmas=_pipeline_sigmas(steps))
    else:
        raise KeyError(key)
    return scheduler


EULER_FLOW_KEYS = [key for key in FLOW_KEYS if method(key).sampler.name == "euler"]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("key", EULER_FLOW_KEYS)
def test_flow_euler_equals_flow_match_euler(key, shape):
    """Every flow family's pipeline loop (FlowMatchEulerDiscreteScheduler.step) on the same latents."""
    entry = method(key)
    scheduler = _flow_scheduler(key, entry.default_steps, 4096)
    x = _start(shape)
    expected, latent = [], x
    for i, t in enumerate(scheduler.timesteps.tolist()):
        sigma = float(scheduler.sigmas[i])
        latent = scheduler.step(_velocity(latent, sigma).float(), t, latent.float()).prev_sample.double()
        expected.append(latent)
    ours = _run(entry, FLOW, _flow_model, x, method_sigmas(entry, FLOW, image_seq_len=4096))
    for mine, reference in zip(ours, expected, strict=True):
        torch.testing.assert_close(mine, reference, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_wan_euler_equals_official_step_in_float64(shape):
    """LightX2V's step_post / Wan2.2-Lightning's EulerScheduler written out: x0 = x - s u, x' = x0 + s' u."""
    entry = method("wan22-lightning-t2v-a14b")
    sigmas = method_sigmas(entry, FLOW)
    x = _start(shape)
    expected, latent = [], x
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=False):
        u = _velocity(latent, sigma)
        latent = (latent - sigma * u) + sigma_next * u
        expected.append(latent)
    for mine, reference in zip(_run(entry, FLOW, _flow_model, x, sigmas), expected, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-12)


def _dmd2_official(x_vp: torch.Tensor, timesteps: list[int], seed: int) -> list[torch.Tensor]:
    """DMD2's demo loop (demo/text_to_image_sdxl.py): x0 from eps, then DDIM add_noise at the next timestep."""
    generator = torch.Generator().manual_seed(seed)
    latents, latent = [], x_vp
    for i, t in enumerate(timesteps):
        a_t = ALPHAS_CUMPROD[t]
        x0 = (latent - (1 - a_t).sqrt() * toy_eps(latent, t)) / a_t.sqrt()
        if i + 1 == len(timesteps):
            latents.append(x0)
            break
        a_next = ALPHAS_CUMPROD[timesteps[i + 1]]
        noise = torch.randn(x_vp.shape, generator=generator, dtype=torch.float64)
        latent = a_next.sqrt() * x0 + (1 - a_next).sqrt() * noise
        latents.append(latent)
    return latents


def _lcm_scheduler_run(x_vp: torch.Tensor, timesteps: list[int], seed: int) -> list[torch.Tensor]:
    """The DMD2 README's diffusers path: LCMScheduler with custom timesteps, from unit noise."""
    scheduler = LCMScheduler(**SD_BETAS, prediction_type="epsilon", clip_sample=False, thresholding=False)
    scheduler.set_timesteps(timesteps=timesteps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(seed)
    latents, latent = [], x_vp
    for t in timesteps:
        latent = scheduler.step(toy_eps(latent, t), t, latent, generator=generator).prev_sample
        latents.append(latent)
    return latents


def _to_vp(latents, sigmas):
    return [x / (1 + s**2) ** 0.5 for x, s in zip(latents, sigmas[1:].tolist(), strict=False)]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_dmd2_4step_equals_official_loop(shape):
    entry = method("dmd2-sdxl-4step")
    sigmas = method_sigmas(entry, VE)
    z = _start(shape)
    # the host hands a sampler starting at sigma_max the latent sqrt(1 + sigma^2) z (ComfyUI's max_denoise)
    ours = _to_vp(_run(entry, VE, _ve_model("eps"), z * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas, 11), sigmas)
    for mine, reference in zip(ours, _dmd2_official(z, [999, 749, 499, 249], 11), strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-12)
    # the README's LCMScheduler adds LCM's boundary scalings: the same sampler with boundary=True is it exactly,
    # and the boundary changes the result by less than 1e-7 (relative) at these timesteps
    with_boundary = _to_vp(_run(entry, VE, _ve_model("eps"), z * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas, 11,
                                boundary=True), sigmas)
    for mine, reference in zip(with_boundary, _lcm_scheduler_run(z, [999, 749, 499, 249], 11), strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-9)
    assert float((with_boundary[-1] - ours[-1]).abs().max() / ours[-1].abs().max()) < 1e-7


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_dmd2_1step_starts_from_unit_noise(shape):
    """The 1-step generator sees pure unit noise at timestep 399; the host hands sigma(399) z."""
    entry = method("dmd2-sdxl-1step")
    sigmas = method_sigmas(entry, VE)
    z = _start(shape)
    (ours,) = _run(entry, VE, _ve_model("eps"), z * float(sigmas[0]), sigmas)
    (official,) = _dmd2_official(z, [399], 0)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-12)
    (readme,) = _lcm_scheduler_run(z, [399], 0)
    torch.testing.assert_close(ours, readme, rtol=0, atol=1e-6)  # LCM's boundary at t = 399: c_skip 1.6e-8
    (plain,) = _run(entry, VE, _ve_model("eps"), z * float(sigmas[0]), sigmas, unit_noise_input=False)
    assert float((plain - ours).abs().max()) > 0.1  # without the rescale the network sees noise of std 0.76
    with pytest.raises(ValueError, match="VE"):
        build_sampler(entry, FLOW)(_flow_model, z, torch.tensor([0.5, 0.0], dtype=torch.float64), disable=True)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_hyper_sdxl_unet_step_equals_lcm_scheduler_at_800(shape):
    """The Hyper-SDXL 1-step UNet: one LCM step (boundary scalings) at timestep 800, as diffusers' LCMScheduler with
    timesteps=[800], on the latent ComfyUI hands the authors' scheduler node (sigma(800) z: the network sees std
    0.981 noise, the unconfirmed starting-noise fact in the registry)."""
    entry = method("hyper-sdxl-1step-unet")
    sigmas = method_sigmas(entry, VE)
    z = _start(shape)
    x = z * float(sigmas[0])
    (ours,) = _run(entry, VE, _ve_model("eps"), x, sigmas)
    (reference,) = _lcm_scheduler_run(x / (1 + float(sigmas[0]) ** 2) ** 0.5, [800], 0)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("key, reference", [("lcm-lora", LCMScheduler), ("tcd-lora", TCDScheduler)])
def test_registry_samplers_reproduce_the_authors_pipeline(key, reference, shape):
    """LCM-LoRA (LCMScheduler) and TCD (TCDScheduler, eta = the registry's gamma) at the default step count;
    TCD's own last step stops at timestep 0, so its x0 prediction is compared there."""
    entry = method(key)
    scheduler = reference(**SD_BETAS, prediction_type="epsilon", clip_sample=False, thresholding=False)
    scheduler.set_timesteps(entry.default_steps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    options = {"eta": entry.sampler.knobs["gamma"]} if key == "tcd-lora" else {}
    generator = torch.Generator().manual_seed(5)
    z = _start(shape)
    expected, latent = [], z
    for t in scheduler.timesteps.tolist():
        eps = toy_eps(latent, t)
        x0 = (latent - (1 - scheduler.alphas_cumprod[t]).sqrt() * eps) / scheduler.alphas_cumprod[t].sqrt()
        latent = scheduler.step(eps, t, latent, generator=generator, **options).prev_sample
        expected.append(latent)
    if key == "tcd-lora":
        expected[-1] = x0
    sigmas = method_sigmas(entry, VE)
    ours = _to_vp(_run(entry, VE, _ve_model("eps"), z * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas, 5), sigmas)
    for mine, reference_latent in zip(ours, expected, strict=True):
        torch.testing.assert_close(mine, reference_latent, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Errors and look-ups
# ------------------------------------------------------------------------------------------
def test_errors_list_the_valid_choices():
    with pytest.raises(KeyError, match="choose one of: lcm-lora, tcd-lora"):
        method("lightning")
    with pytest.raises(ValueError, match="trained for 4 steps, not 6; choose 4"):
        method_sigmas(method("qwen-image-lightning-4step"), FLOW, 6)
    with pytest.raises(ValueError, match="trained for 1-8 steps, not 9"):
        check_steps(method("hyper-sd-unified"), 9)
    with pytest.raises(ValueError, match=r"is a FLOW model; methods for it: .*flux1-schnell"):
        method_sigmas(method("sdxl-lightning-4step"), FLOW)
    with pytest.raises(ValueError, match=r"is a VE model; methods for it: .*dmd2-sdxl-4step"):
        method_sigmas(method("wan21-lightx2v-4step"), VE)
    with pytest.raises(ValueError, match=r"needs a model of kind x0, but this model is eps; methods for eps models: .*"
                                         "sdxl-lightning-4step"):
        check_model_kind(method("sdxl-lightning-1step-x0"), "eps")
    with pytest.raises(ValueError, match="model kind must be one of"):
        check_model_kind(method("lcm-lora"), "edm")
    with pytest.raises(ValueError, match="has no knob eta; its knobs: gamma"):
        build_sampler(method("tcd-lora"), VE, eta=0.5)
    with pytest.raises(ValueError, match="depends on the image size"):
        method_sigmas(method("hyper-flux-8step"), FLOW)
    with pytest.raises(ValueError, match="keeps no step"):
        method_sigmas(method("dmd2-sdxl-1step"), VE, denoise=0.5)


def test_img2img_keeps_trained_steps():
    entry = method("sdxl-lightning-4step")
    full = method_sigmas(entry, VE)
    assert torch.equal(method_sigmas(entry, VE, denoise=0.5), full[2:])
    assert torch.equal(method_sigmas(entry, VE, denoise=0.6), full[2:])  # int(4 * 0.6) = 2 steps, as diffusers
    lcm_half = method_sigmas(method("lcm-lora"), VE, 4, denoise=0.5)  # LCM's strength truncates the grid instead
    official = _diffusers_timesteps(LCMScheduler(**SD_BETAS), 4, strength=0.5)
    assert torch.equal(lcm_half, VE.sigmas_for_timesteps(official))
    flow = method("wan21-lightx2v-4step")
    assert torch.equal(method_sigmas(flow, FLOW, denoise=0.75), method_sigmas(flow, FLOW)[1:])


def test_methods_for_architecture_and_kind():
    sdxl = {m.key for m in methods.methods_for(architecture=methods.SDXL)}
    assert {"sdxl-lightning-4step", "dmd2-sdxl-1step", "tdd-sdxl", "lcm-lora"} <= sdxl
    assert not sdxl & {"flux1-schnell", "wan21-lightx2v-4step"}
    assert [m.key for m in methods.methods_for(model_kind="x0")] == ["sdxl-lightning-1step-x0"]
    assert {m.key for m in methods.methods_for(methods.WAN22_I2V_A14B)} == {"wan22-lightning-i2v-a14b"}


@pytest.mark.parametrize("key", ["lcm-lora", "tcd-lora", "tdd-sdxl", "sdxl-lightning-4step", "dmd2-sdxl-4step"])
def test_video_latents_sample_like_their_frames_stacked(key):
    """A [B, C, T, H, W] latent samples exactly as the same numbers laid out as a [B, C, T * H, W] image (the toy
    network acts per position, noise is drawn in the same order): no sampler treats the extra axis specially,
    TDD's per-sample x0 clipping included."""
    entry = method(key)
    overrides = {"clip_x0_steps": 2} if key == "tdd-sdxl" else {}
    sigmas = method_sigmas(entry, VE)
    video = _start(SHAPES["video"]) * (1 + float(sigmas[0]) ** 2) ** 0.5
    image = video.reshape(video.shape[0], video.shape[1], -1, video.shape[-1])
    as_video = _run(entry, VE, _ve_model("eps"), video, sigmas, 4, **overrides)
    as_image = _run(entry, VE, _ve_model("eps"), image, sigmas, 4, **overrides)
    for frames, flat in zip(as_video, as_image, strict=True):
        assert frames.shape == video.shape
        assert torch.equal(frames.reshape(flat.shape), flat)


# ------------------------------------------------------------------------------------------
# Which entry fits a model
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architectures, kind, steps, piflow_model, expected", [
    ((methods.FLUX1_SCHNELL,), "flow", 4, False, "flux1-schnell"),
    ((methods.SD35_LARGE,), "flow", 4, False, "sd35-large-turbo"),
    ((methods.Z_IMAGE,), "flow", 8, False, "z-image-turbo"),
    ((methods.QWEN_IMAGE, methods.QWEN_IMAGE_EDIT), "flow", 4, False, "qwen-image-lightning-4step"),
    ((methods.QWEN_IMAGE, methods.QWEN_IMAGE_EDIT), "flow", 8, False, "qwen-image-lightning-8step"),
    ((methods.QWEN_IMAGE,), "flow", 6, True, "pi-qwen-gm"),
    ((methods.FLUX1_DEV,), "flow", 16, False, "hyper-flux-16step"),
    ((methods.FLUX1_DEV,), "flow", 8, True, "pi-flux1-gm-8step"),
    ((methods.FLUX2_DEV,), "flow", 4, True, "pi-flux2-gm"),
    ((methods.SDXL,), "x0", 1, False, "sdxl-lightning-1step-x0"),
    # a Wan 14B model is 2.1 or 2.2 A14B: both Lightning LoRAs sample alike, so either answer is right
    ((methods.WAN21_T2V_14B, methods.WAN22_T2V_A14B), "flow", 4, False, "wan21-lightx2v-4step"),
    ((methods.WAN22_I2V_A14B,), "flow", 4, False, "wan22-lightning-i2v-a14b"),
])
def test_detection_where_the_model_leaves_one_choice(architectures, kind, steps, piflow_model, expected):
    assert methods.detect_method(architectures, kind, steps, piflow_model).key == expected


def test_detection_refuses_ambiguous_and_unknown_models_with_the_choices():
    with pytest.raises(ValueError, match=r"several few-step families fit SDXL at 4 steps .*lcm-lora \(1-50 steps\).*"
                                         r"sdxl-lightning-4step \(4 steps\).*dmd2-sdxl-4step"):
        methods.detect_method((methods.SDXL,), "eps", 4)
    with pytest.raises(ValueError, match=r"FLUX.1-dev at 8 steps .*hyper-flux-8step.*tdd-flux"):  # guidance differs
        methods.detect_method((methods.FLUX1_DEV,), "flow", 8)
    with pytest.raises(ValueError, match=r"no few-step family for Qwen-Image was published for 6 steps; choose one "
                                         r"of: qwen-image-lightning-4step \(4 steps\); qwen-image-lightning-8step"):
        methods.detect_method((methods.QWEN_IMAGE,), "flow", 6)
    with pytest.raises(ValueError, match=r"cannot tell .* \(eps, an architecture the registry does not know\); "
                                         r"choose one of: lcm-lora"):
        methods.detect_method((), "eps", 4)
    with pytest.raises(ValueError, match=r"cannot tell .* \(v, SDXL\); choose one of: none registered"):
        methods.detect_method((methods.SDXL,), "v", 4)


def test_architecture_check_names_the_fitting_methods():
    methods.check_architecture(method("lcm-lora"), ())  # unknown architecture: the model kind decides alone
    methods.check_architecture(method("lcm-lora"), (methods.SD15,))
    with pytest.raises(ValueError, match=r"SDXL-Lightning 4-step UNet / LoRA is for SDXL models, but this model is "
                                         r"SD1.5; methods for it: lcm-lora .*hyper-sd-unified"):
        methods.check_architecture(method("sdxl-lightning-4step"), (methods.SD15,))


def test_sampler_options_are_the_knobs_with_overrides():
    assert methods.sampler_options(method("tcd-lora")) == {"gamma": methods.TCD_GAMMA}
    assert methods.sampler_options(method("tcd-lora"), gamma=0.5) == {"gamma": 0.5}
    assert methods.sampler_options(method("sdxl-lightning-4step")) == {"gamma": 0.0}
    assert methods.sampler_options(method("tdd-sdxl"))["eta"] == methods.TDD_ETA
    assert methods.sampler_function(method("dmd2-sdxl-4step")) is lcm.sample_lcm


def test_flux_image_tokens():
    assert flux_image_seq_len(128, 128) == 4096  # 1024 x 1024 pixels
    assert flux_image_seq_len(9, 8) == 20  # odd sizes are padded to whole patches
    with pytest.raises(ValueError, match="positive"):
        flux_image_seq_len(0, 8)


def test_schedule_parameters_are_read_by_class():
    assert methods.schedule_as(method("lcm-lora"), methods.LCMGrid).original_steps == 50
    assert methods.schedule_as(method("pi-flux1-gm-4step"), methods.PiFlowSchedule).shift == 3.2
    with pytest.raises(TypeError, match="tdd-sdxl's schedule is a TDDGrid, not a LCMGrid"):
        methods.schedule_as(method("tdd-sdxl"), methods.LCMGrid)
