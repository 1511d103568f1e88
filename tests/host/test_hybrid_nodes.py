"""Hybrid sampling, trace and diversity nodes inside a real ComfyUI graph.

The graph result must equal ``distill_core.sampling.hybrid.sample_hybrid`` run directly on the exact
reference models with the same noise (float32 like the host): base = exact denoiser with CFG and
Euler (= DDIM), distilled = exact flow map with Stride's LCM sampler, on the 4-step LCM schedule.
"""
import functools
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distill_core.methods import METHODS
from distill_core.reference.demo import demo_mixture, latent_to_rgb
from distill_core.sampling import lcm, tcd
from distill_core.sampling.hybrid import HybridPhase, sample_hybrid
from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod

SEED = 5
BATCH = 3
BASE_CFG = 2.0
DENOISER = "denoiser (ideal many-step teacher)"
FLOW_MAP = "flow map (ideal distilled student)"
FLOW_MAP_STEPS = 8
TOLERANCE = 1e-4  # float32 sampling in the host vs the library (seen: 2.4e-7 on CPU)
SPACES = {"eps": NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod()), "flow": NoiseSpace.flow(shift=1.0)}


def models_and_prompts(distilled_prediction: str = "eps", base_prediction: str = "eps") -> dict:
    return {
        "base": {"class_type": "StrideReferenceModel",
                 "inputs": {"variant": "demo", "prediction": base_prediction, "form": DENOISER,
                            "flow_map_steps": FLOW_MAP_STEPS}},
        "distilled": {"class_type": "StrideReferenceModel",
                      "inputs": {"variant": "demo", "prediction": distilled_prediction, "form": FLOW_MAP,
                                 "flow_map_steps": FLOW_MAP_STEPS}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": "square"}},
        "neg": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": BATCH}},
    }


def hybrid_sample_graph(distilled_prediction: str = "eps", prefix: str = "hybrid", base_prediction: str = "eps",
                        **overrides) -> dict:
    inputs = {"base_model": ["base", 0], "base_positive": ["pos", 0], "base_negative": ["neg", 0], "base_cfg": BASE_CFG,
              "base_sampler": "euler", "distilled_model": ["distilled", 0], "distilled_positive": ["pos", 0],
              "distilled_negative": ["neg", 0], "distilled_cfg": 1.0, "distilled_sampler": "lcm",
              "schedule": "lcm / tcd grid", "steps": 4, "handover_steps": 1, "seed": SEED,
              "latent_image": ["latent", 0]}
    inputs.update(overrides)
    graph = models_and_prompts(distilled_prediction, base_prediction)
    graph["run"] = {"class_type": "StrideHybridSample", "inputs": inputs}
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": prefix}}
    return graph


def hybrid_guider_graph(handover_steps: int = 1, traced: bool = False) -> dict:
    graph = models_and_prompts()
    graph.update({
        "base_guider": {"class_type": "CFGGuider", "inputs": {"model": ["base", 0], "positive": ["pos", 0],
                                                              "negative": ["neg", 0], "cfg": BASE_CFG}},
        "distilled_guider": {"class_type": "CFGGuider", "inputs": {"model": ["distilled", 0], "positive": ["pos", 0],
                                                                   "negative": ["neg", 0], "cfg": 1.0}},
        "base_sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "guider": {"class_type": "StrideHybridGuider", "inputs": {
            "base_guider": ["base_guider", 0], "distilled_guider": ["distilled_guider", 0],
            "base_sampler": ["base_sampler", 0], "handover_steps": handover_steps}},
        "lcm": {"class_type": "StrideLCMSampler", "inputs": {"s_noise": 1.0, "boundary_condition": True}},
        "sigmas": {"class_type": "StrideLCMScheduler", "inputs": {"model": ["base", 0], "steps": 4,
                                                                  "original_steps": 50, "denoise": 1.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
    })
    sampler = ["lcm", 0]
    if traced:
        graph["trace"] = {"class_type": "StrideTraceSampler", "inputs": {"sampler": ["lcm", 0]}}
        sampler = ["trace", 0]
    graph["run"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": ["guider", 0], "sampler": sampler, "sigmas": ["sigmas", 0],
        "latent_image": ["latent", 0]}}
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "guider"}}
    return graph


def run_latent(comfy_host, graph: dict) -> torch.Tensor:
    result = comfy_host.run(graph)
    assert result.success, result.error()
    return load_file(str(comfy_host.output_path(result.outputs["save"]["latents"][0])))["latent_tensor"]


def library_reference(comfy_host, distilled_prediction: str, handover_steps: int = 1,
                      base_prediction: str = "eps") -> torch.Tensor:
    """The same hybrid run with distill_core on the exact mixture (float32, host's noise and seeds)."""
    nodes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    base_model = nodes["StrideReferenceModel"].execute("demo", base_prediction, DENOISER, FLOW_MAP_STEPS)[0]
    sigmas = nodes["StrideLCMScheduler"].execute(base_model, 4, 50, 1.0)[0]
    base_space, distilled_space = SPACES[base_prediction], SPACES[distilled_prediction]
    mixture = demo_mixture()
    square = torch.full((BATCH,), 1)

    def base_denoiser(x, sigma, **_):
        return mixture.cfg_denoise(x, sigma, base_space, square, BASE_CFG)

    def distilled_denoiser(x, sigma, **_):
        return mixture.flow_map(x, sigma, distilled_space, square, steps=FLOW_MAP_STEPS)

    def with_host_noise(sample_fn):
        """``sample_fn`` drawing its per-step noise for ``extra_args["seed"]`` as the host's samplers do."""
        def run(model, x, sigmas, extra_args=None, **kwargs):
            noise_sampler = comfy_host.step_noise(x, (extra_args or {}).get("seed"))
            return sample_fn(model, x, sigmas, extra_args=extra_args, noise_sampler=noise_sampler, **kwargs)
        return run

    base = HybridPhase(base_denoiser, with_host_noise(functools.partial(tcd.sample_tcd, space=base_space, gamma=0.0)),
                       base_space)
    distilled = HybridPhase(distilled_denoiser, with_host_noise(functools.partial(lcm.sample_lcm,
                                                                                  space=distilled_space)),
                            distilled_space)
    noise = torch.randn((BATCH, 4, 8, 8), generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    x = base_model.get_model_object("model_sampling").noise_scaling(sigmas[0], noise, torch.zeros_like(noise),
                                                                    max_denoise=True)
    return sample_hybrid(base, distilled, x, sigmas, handover_steps=handover_steps, seed=SEED, disable=True)


@pytest.mark.parametrize("handover_steps", [0, 1, 2])
def test_hybrid_sample_node_equals_the_library(comfy_host, handover_steps):
    got = run_latent(comfy_host, hybrid_sample_graph(handover_steps=handover_steps, prefix=f"hybrid{handover_steps}"))
    want = library_reference(comfy_host, "eps", handover_steps)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < TOLERANCE, (got - want).abs().max()


@pytest.mark.parametrize("base_prediction, distilled_prediction", [("eps", "flow"), ("flow", "eps")])
def test_mixed_noise_conventions_equal_the_converted_library_run(comfy_host, base_prediction, distilled_prediction):
    graph = hybrid_sample_graph(distilled_prediction, prefix=f"{base_prediction}_{distilled_prediction}",
                                base_prediction=base_prediction)
    got = run_latent(comfy_host, graph)
    want = library_reference(comfy_host, distilled_prediction, base_prediction=base_prediction)
    assert (got - want).abs().max() < TOLERANCE, (got - want).abs().max()


@pytest.mark.parametrize("overrides, registry_key", [
    ({"family": "tdd-sdxl"}, "tdd-sdxl"),
    ({"distilled_sampler": "tdd", "schedule": "tdd"}, "tdd-sdxl"),
    ({}, "lcm-lora"),
])
def test_distilled_cfg_zero_is_the_registrys(comfy_host, overrides, registry_key):
    """distilled_cfg 0 = the CFG of the chosen family, else of the method distilled_sampler stands for (TDD: 1.7)."""
    cfg = METHODS[registry_key].cfg
    prefix = "_".join(str(v) for v in overrides.values()).replace(" ", "") or "lcm"
    zero = run_latent(comfy_host, hybrid_sample_graph(prefix=f"cfg0_{prefix}", distilled_cfg=0.0, **overrides))
    explicit = run_latent(comfy_host, hybrid_sample_graph(prefix=f"cfg_{prefix}", distilled_cfg=cfg, **overrides))
    assert torch.equal(zero, explicit)
    if cfg != 1.0:  # and the CFG does act here (the negative prompt is the empty class)
        off = run_latent(comfy_host, hybrid_sample_graph(prefix=f"cfg1_{prefix}", distilled_cfg=1.0, **overrides))
        assert (off - explicit).abs().max() > 1e-3


def test_an_exact_student_gives_the_same_samples_in_either_convention(comfy_host):
    got = run_latent(comfy_host, hybrid_sample_graph("flow", prefix="hybrid_flow"))
    eps_distilled = run_latent(comfy_host, hybrid_sample_graph("eps", prefix="hybrid_eps"))
    assert (got - eps_distilled).abs().max() < TOLERANCE, "the same exact student in either convention, same samples"


def test_guider_form_in_sampler_custom_advanced_equals_the_hybrid_node(comfy_host):
    guided = run_latent(comfy_host, hybrid_guider_graph())
    node = run_latent(comfy_host, hybrid_sample_graph(prefix="hybrid_same"))
    assert torch.equal(guided, node)


def test_progress_runs_once_over_the_whole_schedule(comfy_host):
    result = comfy_host.run(hybrid_sample_graph(prefix="progress", seed=SEED + 1))  # a new seed: not cached
    assert result.success, result.error()
    assert [value for value, total in result.progress if total == 4] == [1, 2, 3, 4]
    assert all(total == 4 for _, total in result.progress)


def test_cancel_during_the_base_phase_stops_the_run(comfy_host):
    comfy_host.progress_listener = lambda value, total: comfy_host.interrupt() if value == 1 else None
    try:
        result = comfy_host.run(hybrid_sample_graph(prefix="cancel", seed=SEED + 2, handover_steps=2))
    finally:
        comfy_host.progress_listener = None
    assert not result.success
    assert any(kind == "execution_interrupted" for kind, _ in result.messages)
    assert max(value for value, _ in result.progress) < 4


def saved_image(comfy_host, result, node: str) -> np.ndarray:
    return np.asarray(Image.open(comfy_host.output_path(result.outputs[node]["images"][0]))).astype(np.float64) / 255


@pytest.mark.parametrize("form", ["hybrid node", "traced sampler in the guider form"])
def test_trace_grid_shows_every_step_of_both_phases(comfy_host, form):
    if form == "hybrid node":
        graph = hybrid_sample_graph(prefix="traced")
        trace = ["run", 1]
    else:
        graph = hybrid_guider_graph(traced=True)
        trace = ["trace", 1]
    graph["grid"] = {"class_type": "StrideTraceGrid",
                     "inputs": {"trace": trace, "samples": ["run", 0], "max_images": 2}}
    graph["show"] = {"class_type": "SaveImage", "inputs": {"images": ["grid", 0], "filename_prefix": "trace"}}
    result = comfy_host.run(graph)
    assert result.success, result.error()
    grid = saved_image(comfy_host, result, "show")
    tile, gap = 64, 2  # 8x8 latents decoded with the preview colours, upscaled 8x
    bar = tile // 8 + gap  # each row starts with the colour of the model that ran the step
    assert grid.shape == (4 * tile + 3 * gap, bar + 4 * tile + 3 * gap, 3), "4 steps x (x_t | x0 for 2 images)"
    hybrid = sys.modules[comfy_host.nodes.NODE_CLASS_MAPPINGS["StrideTraceGrid"].__module__]
    base, distilled = (np.array(hybrid.PHASE_COLOURS[phase]) for phase in ("base", "distilled"))
    assert np.abs(grid[0, 0] - base).max() <= 1 / 255, "step 0: the base model"
    assert all(np.abs(grid[row * (tile + gap), 0] - distilled).max() <= 1 / 255 for row in (1, 2, 3))
    samples = load_file(str(comfy_host.output_path(result.outputs["save"]["latents"][0])))["latent_tensor"]
    final_x0 = latent_to_rgb(samples[:2].float()).repeat_interleave(8, 1).repeat_interleave(8, 2).numpy()
    last_row = 3 * (tile + gap)
    for item in range(2):
        left = bar + (2 * item + 1) * (tile + gap)
        shown = grid[last_row : last_row + tile, left : left + tile]
        assert np.abs(shown - final_x0[item]).max() <= 1.5 / 255, "the last x0 tile is the sample itself"


def test_image_diversity_node_reports_json(comfy_host):
    graph = hybrid_sample_graph(prefix="div")
    graph["image"] = {"class_type": "StrideLatentToImage", "inputs": {"samples": ["run", 0], "scale": 8}}
    graph["diversity"] = {"class_type": "StrideImageDiversity", "inputs": {"images": ["image", 0], "label": "hybrid"}}
    result = comfy_host.run(graph)
    assert result.success, result.error()
    text = result.outputs["diversity"]["text"][0]
    assert '"label": "hybrid"' in text and '"n": 3' in text and '"diversity"' in text


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
def failure_message(comfy_host, graph: dict) -> str:
    result = comfy_host.run(graph)
    assert not result.success
    return result.error()["exception_message"]


def test_handover_steps_must_leave_a_distilled_step(comfy_host):
    message = failure_message(comfy_host, hybrid_sample_graph(handover_steps=4, prefix="bad"))
    assert "handover_steps" in message and "steps" in message
    message = failure_message(comfy_host, hybrid_guider_graph(handover_steps=4))
    assert "handover_steps" in message and "at most 3" in message


def test_missing_conditioning_is_a_validation_error(comfy_host):
    graph = hybrid_sample_graph(prefix="bad")
    del graph["run"]["inputs"]["base_positive"]
    valid, _, _, node_errors = comfy_host.validate(graph)
    assert not valid and "base_positive" in str(node_errors)


def stride_error(comfy_host) -> type:
    """StrideError as ComfyUI loaded the pack (its package name is ComfyUI's choice)."""
    return sys.modules[comfy_host.nodes.NODE_CLASS_MAPPINGS["StrideHybridSample"].__module__].StrideError


def test_empty_conditioning_names_the_phase(comfy_host):
    nodes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    base = nodes["StrideReferenceModel"].execute("demo", "eps", DENOISER, FLOW_MAP_STEPS)[0]
    prompt = nodes["StrideClassPrompt"].execute("square")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    node = nodes["StrideHybridSample"]
    with pytest.raises(stride_error(comfy_host), match="distilled_positive: the conditioning is empty"):
        node.execute(base, prompt, prompt, 2.0, "euler", base, [], prompt, 1.0, "lcm", "lcm / tcd grid", 4, 1, 0,
                     latent)


def test_models_with_different_latent_formats_are_refused(comfy_host):
    import comfy.latent_formats

    nodes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    base = nodes["StrideReferenceModel"].execute("demo", "eps", DENOISER, FLOW_MAP_STEPS)[0]
    other = base.clone()
    other.add_object_patch("latent_format", comfy.latent_formats.SD3())
    prompt = nodes["StrideClassPrompt"].execute("square")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(stride_error(comfy_host), match=r"distilled_model: .*16 channels.*4 channels.*share one VAE"):
        nodes["StrideHybridSample"].execute(base, prompt, prompt, 2.0, "euler", other, prompt, prompt, 1.0, "lcm",
                                             "lcm / tcd grid", 4, 1, 0, latent)
    guider_node = nodes["StrideHybridGuider"]
    import comfy.samplers

    guiders = []
    for model in (base, other):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(prompt, prompt)
        guiders.append(guider)
    with pytest.raises(stride_error(comfy_host), match=r"distilled_guider: .*latent format"):
        guider_node.execute(guiders[0], guiders[1], comfy.samplers.sampler_object("euler"), 1)


def test_inpainting_masks_are_refused(comfy_host):
    graph = hybrid_sample_graph(prefix="masked")
    graph["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    graph["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["latent", 0], "mask": ["mask", 0]}}
    graph["run"]["inputs"]["latent_image"] = ["masked", 0]
    assert "noise mask" in failure_message(comfy_host, graph)
