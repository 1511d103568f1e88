"""Few-step families inside a real ComfyUI, on tiny models of ComfyUI's own classes (tests/host/tiny_families.py).

* The one-node path (Stride Few-Step Sample with a family) gives the latents of the graph an expert builds from
  ComfyUI's core nodes, wherever such a graph exists: SDXL-Lightning / Hyper-SD N-step = KSampler euler + simple
  (the trailing timesteps; the Lightning card's sgm_uniform lands a quarter timestep off), DMD2 4-step = lcm +
  simple, LCM-LoRA = ModelSamplingDiscrete lcm + lcm + simple, FLUX.1 schnell = euler + simple, Hyper-FLUX / TDD
  FLUX = ModelSamplingFlux at the image size + FluxGuidance + euler + simple, Qwen-Image-Lightning and Z-Image-Turbo =
  ModelSamplingAuraFlow 3 + euler + simple, Wan 2.1 lightx2v = ModelSamplingSD3 5 + euler + simple, Wan 2.2 two
  experts = two KSamplerAdvanced split at the boundary step. Every schedule also equals the core scheduler's SIGMAS.
* Video latents [B, C, T, H, W] (tiny Wan): each Stride sampler's run equals its reference on the same tensors, the
  two-expert hand-over switches at the right sigma, traces record and draw it.
* Wrong families, kinds, architectures and step counts are refused with the valid choices.
"""
from __future__ import annotations

import itertools
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from distill_core import methods
from distill_core.methods import METHODS, method_sigmas
from distill_core.sampling.schedules import flux_image_seq_len
from distill_core.spaces import NoiseSpace, time_shift
from tests.host.tiny_families import TINY, empty_latent, tiny_model

SEED = 7
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # float32 models; ComfyUI's euler and Stride's DDIM round differently


@pytest.fixture(scope="module")
def tiny(comfy_host):
    """Every tiny model, also as a graph node (TestTinyFamilyModel -> MODEL, CONDITIONING)."""
    models = {name: tiny_model(name) for name in TINY}

    class TestTinyFamilyModel:
        CATEGORY = "testing"
        RETURN_TYPES = ("MODEL", "CONDITIONING")
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": (list(TINY),)}}

        def load(self, name):
            return models[name]

    comfy_host.nodes.NODE_CLASS_MAPPINGS["TestTinyFamilyModel"] = TestTinyFamilyModel
    yield models
    del comfy_host.nodes.NODE_CLASS_MAPPINGS["TestTinyFamilyModel"]


def stride(comfy_host, node: str):
    return comfy_host.nodes.NODE_CLASS_MAPPINGS[node]


def families_module(comfy_host):
    """Stride's nodes/families.py as ComfyUI imported it."""
    return sys.modules[stride(comfy_host, "StrideFewStepSample").__module__]


def base_graph(name: str, batch: int = 2) -> dict:
    return {"tiny": {"class_type": "TestTinyFamilyModel", "inputs": {"name": name}},
            "latent": empty_latent(name, batch)}


def saved(name: str, source: str) -> dict:
    return {"save": {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": name}}}


def run_latent(comfy_host, graph: dict) -> torch.Tensor:
    result = comfy_host.run(graph)
    assert result.success, result.error()
    return load_file(str(comfy_host.output_path(result.outputs["save"]["latents"][0])))["latent_tensor"]


def one_node(name: str, family: str, steps: int, **overrides) -> dict:
    inputs = {"model": ["tiny", 0], "positive": ["tiny", 1], "negative": ["tiny", 1], "latent_image": ["latent", 0],
              "method": family, "steps": steps, "cfg": 0.0, "gamma": 0.3, "eta": 0.2, "seed": SEED, "denoise": 1.0,
              **overrides}
    return {**base_graph(name), "run": {"class_type": "StrideFewStepSample", "inputs": inputs}, **saved(family, "run")}


def expert(name: str, sampler: str, scheduler: str, steps: int, patches: tuple[tuple[str, dict], ...] = (),
           guidance: float | None = None) -> dict:
    """KSampler on the model after core model patches (ModelSampling*), with FluxGuidance if asked."""
    graph = base_graph(name)
    model, positive = ["tiny", 0], ["tiny", 1]
    for i, (kind, inputs) in enumerate(patches):
        graph[f"patch{i}"] = {"class_type": kind, "inputs": {"model": model, **inputs}}
        model = [f"patch{i}", 0]
    if guidance is not None:
        graph["guidance"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": positive, "guidance": guidance}}
        positive = ["guidance", 0]
    graph["run"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": positive, "negative": ["tiny", 1], "latent_image": ["latent", 0], "seed": SEED,
        "steps": steps, "cfg": 1.0, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}
    return {**graph, **saved(f"expert_{sampler}", "run")}


FLUX_SHIFT = ("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 64, "height": 64})
AURA_3 = ("ModelSamplingAuraFlow", {"shift": 3.0})
SD3_5 = ("ModelSamplingSD3", {"shift": 5.0})
EXPERT_GRAPHS = {
    # family: (tiny model, steps, core sampler, core scheduler, core model patches, FluxGuidance)
    "sdxl-lightning-4step": ("SDXL", 4, "euler", "simple", (), None),
    "sdxl-lightning-8step": ("SDXL", 8, "euler", "simple", (), None),
    "hyper-sd-2step": ("SDXL", 2, "euler", "simple", (), None),
    "dmd2-sdxl-4step": ("SDXL", 4, "lcm", "simple", (), None),
    "lcm-lora": ("SDXL", 4, "lcm", "simple", (("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False}),), None),
    "flux1-schnell": ("FLUX.1 schnell", 4, "euler", "simple", (), None),
    "hyper-flux-8step": ("FLUX.1 dev", 8, "euler", "simple", (FLUX_SHIFT,), 3.5),
    "tdd-flux": ("FLUX.1 dev", 4, "euler", "simple", (FLUX_SHIFT,), 2.0),
    "qwen-image-lightning-4step": ("Qwen-Image", 4, "euler", "simple", (AURA_3,), None),
    "qwen-image-lightning-8step": ("Qwen-Image", 8, "euler", "simple", (AURA_3,), None),
    "z-image-turbo": ("Z-Image", 8, "euler", "simple", (AURA_3,), None),
    "wan21-lightx2v-4step": ("Wan T2V", 4, "euler", "simple", (SD3_5,), None),
}


@pytest.mark.parametrize("family", list(EXPERT_GRAPHS))
def test_one_node_equals_the_experts_core_graph(comfy_host, tiny, family):
    name, steps, sampler, scheduler, patches, guidance = EXPERT_GRAPHS[family]
    ours = run_latent(comfy_host, one_node(name, family, steps))
    theirs = run_latent(comfy_host, expert(name, sampler, scheduler, steps, patches, guidance))
    assert ours.shape == theirs.shape and ours.ndim == (5 if name in ("Qwen-Image", "Wan T2V") else 4)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


def test_lightning_cards_sgm_uniform_is_a_quarter_timestep_off(comfy_host, tiny):
    """The Lightning card's ComfyUI recipe (sgm_uniform) picks timesteps 999, 749.25, 499.5, 249.75; the trained
    trailing ones are 999, 749, 499, 249: close, not equal (simple is the exact core scheduler)."""
    import comfy.samplers

    sampling = tiny["SDXL"][0].get_model_object("model_sampling")
    trailing = method_sigmas(METHODS["sdxl-lightning-4step"], NoiseSpace.from_sigma_table("ve", sampling.sigmas))
    sgm = comfy.samplers.calculate_sigmas(sampling, "sgm_uniform", 4).double()
    simple = comfy.samplers.calculate_sigmas(sampling, "simple", 4).double()
    torch.testing.assert_close(simple, trailing, rtol=1e-6, atol=0)
    assert 1e-4 < float(((sgm - trailing)[1:-1] / trailing[1:-1]).abs().max()) < 1e-2


@pytest.mark.parametrize("family, sampling, scheduler", [
    ("sd35-large-turbo", ("ModelSamplingSD3", 3.0), "normal"),
    ("wan22-lightning-t2v-a14b", ("ModelSamplingSD3", 5.0), "simple"),
    ("flux1-schnell", ("ModelSamplingDiscreteFlow", 1.0), "simple"),
    ("z-image-turbo", ("ModelSamplingAuraFlow", 3.0), "simple"),
    ("hyper-flux-16step", ("ModelSamplingFlux", None), "simple"),
])
def test_flow_schedules_equal_the_core_scheduler(comfy_host, family, sampling, scheduler):
    """The family's SIGMAS are the core scheduler's on the core model sampling an expert sets (no network needed)."""
    import comfy.model_sampling
    import comfy.samplers

    entry = METHODS[family]
    kind, shift = sampling
    if kind == "ModelSamplingFlux":  # ModelSamplingFlux node at 1024 x 1024: mu from the token count
        model_sampling = comfy.model_sampling.ModelSamplingFlux()
        model_sampling.set_parameters(shift=methods.flux_mu(flux_image_seq_len(128, 128)))
        seq_len = 4096
    else:
        class Sampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
            pass
        model_sampling = Sampling()
        model_sampling.set_parameters(shift=shift, multiplier=1.0 if kind == "ModelSamplingAuraFlow" else 1000)
        seq_len = None
    core = comfy.samplers.calculate_sigmas(model_sampling, scheduler, entry.default_steps).double()
    ours = method_sigmas(entry, NoiseSpace.flow(), image_seq_len=seq_len)
    torch.testing.assert_close(ours, core, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Video latents (tiny Wan): every Stride sampler against its reference on the same tensors
# ------------------------------------------------------------------------------------------
WAN = "Wan T2V"
WAN_FAMILY = "wan21-lightx2v-4step"


def custom_sampling(name: str, sampler: dict, family: str) -> dict:
    """SamplerCustomAdvanced with a Stride SAMPLER node and Stride Few-Step Scheduler's SIGMAS, the model at shift 5
    (ModelSamplingSD3), so that the schedule's sigmas are timesteps of the model's own table."""
    return {**base_graph(name),
            "shifted": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["tiny", 0], "shift": 5.0}},
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
            "guider": {"class_type": "CFGGuider", "inputs": {"model": ["shifted", 0], "positive": ["tiny", 1],
                                                             "negative": ["tiny", 1], "cfg": 1.0}},
            "sampler": sampler,
            "sigmas": {"class_type": "StrideFewStepScheduler", "inputs": {
                "model": ["shifted", 0], "family": family, "steps": 0, "denoise": 1.0, "width": 64, "height": 64}},
            "run": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                "latent_image": ["latent", 0]}},
            **saved(f"custom_{sampler['class_type']}", "run")}


def denoiser(model, conditioning):
    """The MODEL's x0 prediction with one prompt, outside ComfyUI's sampler loop (BaseModel.apply_model)."""
    context = conditioning[0][0]

    def x0(x: torch.Tensor, sigma: float) -> torch.Tensor:
        with torch.no_grad():
            sigmas = torch.full((x.shape[0],), sigma, dtype=torch.float32)
            return model.model.apply_model(x.float(), sigmas, c_crossattn=context.expand(x.shape[0], -1, -1)).double()

    return x0


def start_latent(model, name: str, batch: int = 2) -> torch.Tensor:
    """The host's initial noise for SEED (RandomNoise / prepare_noise): the latent at sigma 1 of a flow model."""
    import comfy.sample

    frames = 3 if name == WAN else 1
    shape = (batch, 16, frames, 8, 8)
    return comfy.sample.prepare_noise(torch.zeros(shape), SEED).double()


def gamma_reference(x0_of, x: torch.Tensor, sigmas: list[float], table: torch.Tensor, gamma: float,
                    float32_floor: bool, step_noise) -> torch.Tensor:
    """TCD's step (diffusers TCDScheduler.step) written for a flow model, x = (1 - s) x0 + s eps: DDIM to
    s = floor((1 - gamma) t_next) on the model's timestep table, then forward-diffuse to t_next with fresh noise
    (TDD: the same with a float64 floor). ``step_noise`` draws the fresh noise as the host's samplers do."""
    for sigma, sigma_next in itertools.pairwise(sigmas):
        x0 = x0_of(x, sigma)
        if sigma_next == 0:
            return x0
        eps = (x - (1 - sigma) * x0) / sigma
        if gamma == 0:  # DDIM: no intermediate target, no noise drawn
            x = (1 - sigma_next) * x0 + sigma_next * eps
            continue
        t_next = int(torch.argmin((table - sigma_next).abs()))
        if float32_floor:  # diffusers multiplies in float32
            product = (torch.tensor(1 - gamma, dtype=torch.float32) * t_next).item()
        else:
            product = (1 - gamma) * t_next
        sigma_s = float(table[math.floor(product)])
        x_s = (1 - sigma_s) * x0 + sigma_s * eps
        ratio = (1 - sigma_next) / (1 - sigma_s)
        z = step_noise(sigma, sigma_next).double()
        x = ratio * x_s + math.sqrt(sigma_next**2 - (ratio * sigma_s) ** 2) * z
    return x


@pytest.mark.parametrize("sampler, gamma, float32_floor", [
    ({"class_type": "StrideTCDSampler", "inputs": {"gamma": 0.3}}, 0.3, True),
    ({"class_type": "StrideTDDSampler", "inputs": {"eta": 0.2, "clip_x0_steps": 0, "clip_ratio": 0.995}}, 0.2, False),
    ({"class_type": "StrideTCDSampler", "inputs": {"gamma": 0.0}}, 0.0, True),  # DDIM = Euler
])
def test_video_tcd_and_tdd_equal_their_step_on_the_same_tensors(comfy_host, tiny, sampler, gamma, float32_floor):
    model, conditioning = tiny[WAN]
    ours = run_latent(comfy_host, custom_sampling(WAN, sampler, WAN_FAMILY))
    table = time_shift(torch.arange(1, 1001, dtype=torch.float64) / 1000, 5.0)  # ModelSamplingSD3 5's timesteps
    sigmas = method_sigmas(METHODS[WAN_FAMILY], NoiseSpace.flow()).float().double().tolist()
    start = start_latent(model, WAN)
    reference = gamma_reference(denoiser(model, conditioning), start, sigmas, table, gamma, float32_floor,
                                comfy_host.step_noise(start, SEED))
    assert ours.shape == (2, 16, 3, 8, 8)
    torch.testing.assert_close(ours, model.model.process_latent_out(reference.float()), **TOLERANCE)  # Wan's mean/std


def test_video_lcm_equals_comfyuis_lcm(comfy_host, tiny):
    """Stride's LCM sampler (no boundary scaling, DMD2's form) = ComfyUI's own lcm sampler on the Wan schedule."""
    ours = run_latent(comfy_host, custom_sampling(
        WAN, {"class_type": "StrideLCMSampler", "inputs": {"s_noise": 1.0, "boundary_condition": False}}, WAN_FAMILY))
    theirs = run_latent(comfy_host, expert(WAN, "lcm", "simple", 4, (SD3_5,)))
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


# ------------------------------------------------------------------------------------------
# Wan 2.2: two experts, hand-over at the sigma boundary
# ------------------------------------------------------------------------------------------
def two_experts(comfy_host, tiny, family: str):
    high, conditioning = tiny[WAN]
    low, _ = tiny_model(WAN, seed=1)  # the low-noise expert: other weights
    latent = {"samples": torch.zeros(2, 16, 3, 8, 8)}
    hybrid = stride(comfy_host, "StrideHybridSample")
    out = hybrid.execute(high, conditioning, conditioning, 1.0, "euler", low, conditioning, conditioning, 1.0, "lcm",
                         "lcm / tcd grid", 4, 1, SEED, latent, family=family)
    return high, low, conditioning, out[0]["samples"], out[1]


def test_two_experts_hand_over_at_wan22s_boundary(comfy_host, tiny):
    """Hybrid Sample with a Wan2.2-Lightning family = the core graph of two KSamplerAdvanced (high-noise expert steps
    0-2 with leftover noise, low-noise expert steps 2-4), both at ModelSamplingSD3 5: the registry's boundary 0.875
    puts exactly the steps with sigma >= 0.875 on the high-noise expert, and the trace shows which expert ran each."""
    high, low, conditioning, ours, trace = two_experts(comfy_host, tiny, "wan22-lightning-t2v-a14b")
    steps = trace.record.steps
    assert [step.phase for step in steps] == ["base", "base", "distilled", "distilled"]
    assert [round(step.sigma, 4) for step in steps] == [1.0, 0.9375, 0.8333, 0.625]
    assert all((step.sigma >= 0.875) == (step.phase == "base") for step in steps)

    def patched(model):
        return stride(comfy_host, "ModelSamplingSD3")().patch(model, 5.0)[0]

    advanced = comfy_host.nodes.KSamplerAdvanced()
    latent = {"samples": torch.zeros(2, 16, 3, 8, 8)}
    first = advanced.sample(patched(high), "enable", SEED, 4, 1.0, "euler", "simple", conditioning, conditioning,
                            latent, 0, 2, "enable")[0]
    theirs = advanced.sample(patched(low), "disable", SEED, 4, 1.0, "euler", "simple", conditioning, conditioning,
                             first, 2, 10000, "disable")[0]["samples"]
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize("family", ["hyper-flux-8step", "tdd-flux"])
def test_hybrid_without_base_steps_is_the_familys_one_node_run(comfy_host, tiny, family):
    """Hybrid Sample with a family, 0 base steps and distilled_cfg 0 samples as Stride Few-Step Sample does: the
    family's schedule, sampler, registry CFG and FLUX guidance (this tiny FLUX.1-dev model reads it; ComfyUI's Flux
    falls back to 3.5 without one, so tdd-flux's 2.0 is the case that needs the hybrid to set it)."""
    model, conditioning = tiny["FLUX.1 dev"]
    steps = METHODS[family].default_steps
    latent = {"samples": torch.zeros(2, 16, 8, 8)}
    one = stride(comfy_host, "StrideFewStepSample").execute(model, conditioning, conditioning, latent, family, steps,
                                                            0.0, 0.3, 0.2, SEED, 1.0)[0]["samples"]
    hybrid = stride(comfy_host, "StrideHybridSample")

    def hybrid_run(positive: list) -> torch.Tensor:
        return hybrid.execute(model, positive, conditioning, 1.0, "euler", model, positive, conditioning, 0.0, "lcm",
                              "lcm / tcd grid", steps, 0, SEED, latent, family=family)[0]["samples"]

    torch.testing.assert_close(hybrid_run(conditioning), one, rtol=0, atol=1e-6)
    other_guidance = families_module(comfy_host).with_flux_guidance(conditioning, 1.0)
    assert (hybrid_run(other_guidance) - one).abs().max() > 1e-4  # the guidance input does change the result


def test_i2v_boundary_and_the_guider_take_the_same_rule(comfy_host, tiny):
    """I2V's boundary 0.9 also gives 2 high-noise steps at 4 steps; Hybrid Guider with handover_boundary hands over
    where Hybrid Sample does."""
    hybrid = sys.modules[stride(comfy_host, "StrideHybridGuider").__module__]
    sigmas = method_sigmas(METHODS["wan22-lightning-i2v-a14b"], NoiseSpace.flow()).float()
    distilled = SimpleNamespace(model_patcher=None, model_options={})
    assert hybrid.HybridGuider(None, distilled, None, 1, METHODS["wan22-lightning-i2v-a14b"].expert_boundary
                               ).base_steps(sigmas) == 2
    assert hybrid.HybridGuider(None, distilled, None, 3).base_steps(sigmas) == 3


def test_video_trace_grid_draws_frames_and_phases(comfy_host, tiny):
    *_, samples, trace = two_experts(comfy_host, tiny, "wan22-lightning-t2v-a14b")
    grid = stride(comfy_host, "StrideTraceGrid").execute(trace, {"samples": samples}, 2)[0]
    # 4 rows of 64-pixel tiles (8x8 latents, preview decode upscaled 8x); per row: the phase bar (8 + 2 gap), then
    # 2 items x (x_t | x0), each tile 3 frames x 64 pixels wide, 2-pixel gaps
    assert tuple(grid.shape) == (1, 4 * 66 - 2, 10 + 4 * (3 * 64 + 2) - 2, 3)
    hybrid = sys.modules[stride(comfy_host, "StrideTraceGrid").__module__]
    assert torch.allclose(grid[0, 0, 0], torch.tensor(hybrid.PHASE_COLOURS["base"]))
    assert torch.allclose(grid[0, 3 * 66, 0], torch.tensor(hybrid.PHASE_COLOURS["distilled"]))


# ------------------------------------------------------------------------------------------
# Detection and refusals
# ------------------------------------------------------------------------------------------
def config_model(config_class: str, unet_config: dict):
    """A stand-in MODEL holding only the model config ComfyUI's detection would make (no network)."""
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class)(unet_config)
    return SimpleNamespace(model=SimpleNamespace(model_config=config))


@pytest.mark.parametrize("config_class, unet_config, expected", [
    ("SDXL", {}, (methods.SDXL,)),
    ("SD15", {}, (methods.SD15,)),
    ("SSD1B", {}, ()),  # a distilled SDXL: not what SDXL LoRAs were made for
    ("FluxSchnell", {}, (methods.FLUX1_SCHNELL,)),
    ("Flux", {}, (methods.FLUX1_DEV,)),
    ("Flux2", {"hidden_size": 6144}, (methods.FLUX2_DEV,)),  # 0.33.0 scales its memory factor by it
    ("SD3", {"depth": 38}, (methods.SD35_LARGE,)),
    ("SD3", {"depth": 24}, ()),  # SD3 / SD3.5 Medium
    ("QwenImage", {}, (methods.QWEN_IMAGE, methods.QWEN_IMAGE_EDIT)),
    ("ZImage", {}, (methods.Z_IMAGE,)),
    ("WAN21_T2V", {"dim": 5120}, (methods.WAN21_T2V_14B, methods.WAN22_T2V_A14B)),
    ("WAN21_I2V", {"dim": 5120}, (methods.WAN21_I2V_14B, methods.WAN22_I2V_A14B)),
    ("WAN21_T2V", {"dim": 1536}, ()),  # Wan 2.1 1.3B
    ("WAN22_T2V", {"dim": 3072}, ()),  # Wan 2.2 TI2V 5B
])
def test_architecture_detection_from_comfyuis_model_config(comfy_host, config_class, unet_config, expected):
    compat = sys.modules[stride(comfy_host, "StrideFewStepSample").__module__.replace("families", "compat")]
    assert compat.model_architectures(config_model(config_class, unet_config)) == expected


def test_auto_detects_the_family_where_the_model_leaves_one(comfy_host, tiny, monkeypatch):
    """auto on a model ComfyUI detected as Qwen-Image = qwen-image-lightning-{steps}step; on SDXL it lists choices."""
    ours = run_latent(comfy_host, one_node("Qwen-Image", "auto", 4))
    theirs = run_latent(comfy_host, one_node("Qwen-Image", "qwen-image-lightning-4step", 4))
    assert torch.equal(ours, theirs)
    result = comfy_host.run(one_node("SDXL", "auto", 4))
    message = result.error()["exception_message"]
    assert message.startswith("method: several few-step families fit SDXL at 4 steps")
    assert "sdxl-lightning-4step (4 steps)" in message and "dmd2-sdxl-4step" in message


@pytest.mark.parametrize("name, family, steps, words", [
    ("FLUX.1 schnell", "sdxl-lightning-4step", 4,
     ("method:", "needs a model of kind eps, but this model is flow", "flux1-schnell")),
    ("FLUX.1 schnell", "hyper-flux-8step", 8,
     ("method:", "is for FLUX.1-dev models, but this model is FLUX.1-schnell; methods for it: flux1-schnell")),
    ("Qwen-Image", "qwen-image-lightning-4step", 6, ("steps:", "trained for 4 steps, not 6; choose 4")),
    ("SDXL", "sdxl-lightning-1step-x0", 1, ("method:", "kind x0", "ModelSamplingDiscrete (sampling x0)")),
    ("SDXL", "hyper-sd n-step (ddim trailing)", 3, ("steps:", "hyper-sd-2step, hyper-sd-4step, hyper-sd-8step")),
    ("Qwen-Image", "pi-qwen-gm", 4, ("model:", "needs its pi-Flow adapter", "Stride pi-Flow Adapter Loader")),
])
def test_wrong_family_or_steps_is_refused_with_the_choices(comfy_host, tiny, name, family, steps, words):
    result = comfy_host.run(one_node(name, family, steps))
    assert not result.success
    error = result.error()
    assert error["exception_type"].endswith("StrideError")
    for word in words:
        assert word in error["exception_message"], error["exception_message"]


def test_flux_guidance_is_the_familys_unless_set(comfy_host):
    module = families_module(comfy_host)
    conditioning = [[torch.zeros(1), {}], [torch.zeros(1), {"guidance": 5.0}]]
    assert [options.get("guidance") for _, options in module.with_flux_guidance(conditioning, 2.0)] == [2.0, 5.0]


def test_scheduler_defaults_to_the_familys_steps_and_gives_its_sampler(comfy_host, tiny):
    model = tiny["Z-Image"][0]
    sigmas, sampler = stride(comfy_host, "StrideFewStepScheduler").execute(model, "auto", 0, 1.0, 64, 64)
    assert len(sigmas) == METHODS["z-image-turbo"].default_steps + 1 == 9
    torch.testing.assert_close(sigmas.double(), method_sigmas(METHODS["z-image-turbo"], NoiseSpace.flow()).float()
                               .double())
    assert sampler.sampler_function is not None
    flux_dev = tiny["FLUX.1 dev"][0]
    at_1024 = stride(comfy_host, "StrideFewStepScheduler").execute(flux_dev, "hyper-flux-8step", 0, 1.0, 1024, 1024)[0]
    shift = math.exp(methods.flux_mu(4096))
    expected = torch.cat([time_shift(torch.linspace(1, 1 / 8, 8, dtype=torch.float64), shift), torch.zeros(1)])
    torch.testing.assert_close(at_1024.double(), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The reference models as video (the workflows' stand-in for Wan)
# ------------------------------------------------------------------------------------------
def test_reference_video_model_denoises_each_frame_as_an_image(comfy_host):
    reference = stride(comfy_host, "StrideReferenceModel")
    flow = "denoiser (ideal many-step teacher)"
    video = reference.execute("demo", "flow", flow, 8, "video (B, 4, T, 8, 8): independent frames")[0]
    image = reference.execute("demo", "flow", flow, 8)[0]
    prompt = stride(comfy_host, "StrideClassPrompt").execute("ring")[0][0][0].expand(2, -1, -1)
    x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.7])
    frames = video.model.apply_model(x, sigma, c_crossattn=prompt, transformer_options={"sigmas": sigma})
    for t in range(3):
        alone = image.model.apply_model(x[:, :, t], sigma, c_crossattn=prompt, transformer_options={"sigmas": sigma})
        torch.testing.assert_close(frames[:, :, t], alone, rtol=1e-6, atol=1e-6)


def test_reference_video_sampling_metrics_and_previews(comfy_host):
    """A video latent from the core Wan latent node through the video reference model, Few-Step Sample, previews
    (every frame an image) and the exact metrics (every frame a sample)."""
    graph = {
        "model": {"class_type": "StrideReferenceModel", "inputs": {
            "variant": "demo", "prediction": "flow", "form": "flow map (ideal distilled student)", "flow_map_steps": 8,
            "latents": "video (B, 4, T, 8, 8): independent frames"}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": "disc"}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                       "batch_size": 2}},
        "run": {"class_type": "StrideFewStepSample", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["latent", 0],
            "method": WAN_FAMILY, "steps": 4, "cfg": 0.0, "gamma": 0.3, "eta": 0.2, "seed": SEED, "denoise": 1.0}},
        "image": {"class_type": "StrideLatentToImage", "inputs": {"samples": ["run", 0], "scale": 2}},
        "show": {"class_type": "SaveImage", "inputs": {"images": ["image", 0], "filename_prefix": "video_frames"}},
        "metrics": {"class_type": "StrideReferenceMetrics", "inputs": {"samples": ["run", 0],
                                                                       "conditioning": ["pos", 0], "label": "video"}},
        **saved("video_reference", "run"),
    }
    result = comfy_host.run(graph)
    assert result.success, result.error()
    latent = load_file(str(comfy_host.output_path(result.outputs["save"]["latents"][0])))["latent_tensor"]
    assert latent.shape == (2, 4, 3, 8, 8)
    assert len(result.outputs["show"]["images"]) == 6
    report = result.outputs["metrics"]["text"][0]
    assert '"n": 6' in report
