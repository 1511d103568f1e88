"""Stride's few-step sampler and scheduler nodes inside a real ComfyUI graph.

The graph result must equal the distill_core sampler run directly on the exact teacher with
the same noise: that proves the adapter layer (noise space, KSAMPLER wrapping, guider,
noise node) adds nothing and loses nothing.
"""
import pytest
import torch
from safetensors.torch import load_file

from distill_core.reference.demo import demo_mixture
from distill_core.sampling import lcm, tcd, tdd
from distill_core.spaces import NoiseSpace, scaled_linear_alphas_cumprod

SEED = 11
BATCH = 4
DENOISER = "denoiser (ideal many-step teacher)"
METHODS = {
    # name: (sampler node, sampler inputs, scheduler node, scheduler inputs, library sampler, library options)
    "lcm": ("StrideLCMSampler", {"s_noise": 1.0, "boundary_condition": True},
            "StrideLCMScheduler", {"steps": 4, "original_steps": 50, "denoise": 1.0},
            lcm.sample_lcm, {"s_noise": 1.0, "boundary": True}),
    "tcd": ("StrideTCDSampler", {"gamma": 0.3},
            "StrideHyperSDScheduler", {"mode": "tcd grid", "steps": 4, "denoise": 1.0},
            tcd.sample_tcd, {"gamma": 0.3}),
    "hyper_trailing": ("StrideTCDSampler", {"gamma": 0.0},
                       "StrideHyperSDScheduler", {"mode": "trailing", "steps": 4, "denoise": 1.0},
                       tcd.sample_tcd, {"gamma": 0.0}),
    "hyper_1step": ("StrideTCDSampler", {"gamma": 0.0},
                    "StrideHyperSDScheduler", {"mode": "unet 1-step (t=800)", "steps": 1, "denoise": 1.0},
                    tcd.sample_tcd, {"gamma": 0.0}),
    "tdd": ("StrideTDDSampler", {"eta": 0.2, "clip_x0_steps": 1, "clip_ratio": 0.995},
            "StrideTDDScheduler", {"steps": 5, "special_jump": True, "denoise": 1.0},
            tdd.sample_tdd, {"eta": 0.2, "clip_x0_steps": 1, "clip_ratio": 0.995}),
}


def sampler_graph(method: str, prediction: str, prefix: str, outer: str = "SamplerCustomAdvanced") -> dict:
    sampler_node, sampler_inputs, scheduler_node, scheduler_inputs, _, _ = METHODS[method]
    graph = {
        "model": {"class_type": "StrideReferenceModel",
                  "inputs": {"variant": "demo", "prediction": prediction, "form": DENOISER, "flow_map_steps": 8}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": "square"}},
        "neg": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": BATCH}},
        "sampler": {"class_type": sampler_node, "inputs": sampler_inputs},
        "sigmas": {"class_type": scheduler_node, "inputs": {"model": ["model", 0], **scheduler_inputs}},
    }
    if outer == "SamplerCustomAdvanced":
        graph["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}}
        graph["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["pos", 0],
                                                                  "negative": ["neg", 0], "cfg": 1.0}}
        graph["run"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}}
    else:
        graph["run"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["model", 0], "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}}
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": prefix}}
    return graph


def run_latent(comfy_host, graph: dict) -> torch.Tensor:
    result = comfy_host.run(graph)
    assert result.success, result.error()
    return load_file(str(comfy_host.output_path(result.outputs["save"]["latents"][0])))["latent_tensor"]


def library_reference(comfy_host, method: str, prediction: str) -> torch.Tensor:
    """The same sampling done directly with distill_core on the exact denoiser (float64)."""
    _, _, scheduler_node, scheduler_inputs, sample_fn, options = METHODS[method]
    model = comfy_host.nodes.NODE_CLASS_MAPPINGS["StrideReferenceModel"].execute("demo", prediction, DENOISER, 8)[0]
    sigmas = comfy_host.nodes.NODE_CLASS_MAPPINGS[scheduler_node].execute(model, **scheduler_inputs)[0].double()
    if prediction == "flow":
        space = NoiseSpace.flow(shift=1.0)
    else:
        space = NoiseSpace.from_alphas_cumprod(scaled_linear_alphas_cumprod())
    generator = torch.manual_seed(SEED)
    noise = torch.randn((BATCH, 4, 8, 8), generator=generator, dtype=torch.float32).double()
    sampling = model.get_model_object("model_sampling")
    starts_at_max = bool(torch.isclose(sigmas[0], sampling.sigma_max.double(), rtol=1e-5)
                         or sigmas[0] > sampling.sigma_max)
    x = sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=starts_at_max)
    mixture = demo_mixture()
    square = torch.full((BATCH,), 1)

    def denoiser(z, sigma, **_):
        return mixture.denoise(z, sigma, space, square)

    step_noise = comfy_host.step_noise(x, SEED)  # float32 noise drawn as the host's samplers draw it

    def noise_sampler(sigma, sigma_next):
        return step_noise(sigma, sigma_next).double()

    return sample_fn(denoiser, x, sigmas, space=space, disable=True, noise_sampler=noise_sampler, **options)


@pytest.mark.parametrize("prediction", ["eps", "flow"])
@pytest.mark.parametrize("method", list(METHODS))
def test_graph_equals_library_sampler(comfy_host, method, prediction):
    if prediction == "flow" and method == "hyper_1step":
        pytest.skip("the Hyper-SDXL 1-step schedule is for EPS SDXL models")
    got = run_latent(comfy_host, sampler_graph(method, prediction, f"{method}_{prediction}"))
    want = library_reference(comfy_host, method, prediction).float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 2e-3, (got - want).abs().max()


def test_sampler_custom_node_composes(comfy_host):
    got = run_latent(comfy_host, sampler_graph("lcm", "eps", "lcm_custom", outer="SamplerCustom"))
    want = library_reference(comfy_host, "lcm", "eps").float()
    assert (got - want).abs().max() < 2e-3


def few_step_graph(method: str, steps: int = 4, **overrides) -> dict:
    inputs = {"model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
              "method": method, "steps": steps, "cfg": 0.0, "gamma": 0.3, "eta": 0.2, "seed": SEED, "denoise": 1.0}
    inputs.update(overrides)
    return {
        "model": {"class_type": "StrideReferenceModel",
                  "inputs": {"variant": "demo", "prediction": "eps", "form": DENOISER, "flow_map_steps": 8}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": "cross"}},
        "neg": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": BATCH}},
        "run": {"class_type": "StrideFewStepSample", "inputs": inputs},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "few"}},
    }


@pytest.mark.parametrize("method", ["lcm", "tcd / hyper-sd unified", "hyper-sd n-step (ddim trailing)", "tdd"])
def test_convenience_node_reports_progress_per_step(comfy_host, method):
    result = comfy_host.run(few_step_graph(method))
    assert result.success, result.error()
    assert [value for value, total in result.progress if total == 4][-1] == 4


def test_convenience_node_cancel_stops_sampling(comfy_host):
    comfy_host.progress_listener = lambda value, total: comfy_host.interrupt() if value == 1 else None
    try:
        result = comfy_host.run(few_step_graph("lcm"))
    finally:
        comfy_host.progress_listener = None
    assert not result.success
    assert any(kind == "execution_interrupted" for kind, _ in result.messages)
    assert max(value for value, _ in result.progress) < 4
    assert comfy_host.run(few_step_graph("lcm")).success, "the host runs the next prompt normally"


@pytest.mark.parametrize("overrides, words", [
    ({"method": "lcm", "steps": 40, "denoise": 0.5}, ("steps", "Choose fewer steps")),  # the img2img grid has 25
    ({"method": "tdd", "steps": 50, "denoise": 0.1}, ("steps: TDD SDXL LoRA was trained for 4-8 steps, not 50; "
                                                      "choose 4-8",)),  # TDD's published step counts
])
def test_step_counts_above_the_grid_give_clear_errors(comfy_host, overrides, words):
    result = comfy_host.run(few_step_graph(**overrides))
    assert not result.success
    message = result.error()["exception_message"]
    assert all(word in message for word in words), message


def test_step_count_below_one_is_a_validation_error(comfy_host):
    valid, _, _, node_errors = comfy_host.validate(few_step_graph("lcm", steps=0))
    assert not valid and "steps" in str(node_errors)


def test_out_of_range_gamma_is_a_validation_error(comfy_host):
    graph = sampler_graph("tcd", "eps", "bad")
    graph["sampler"]["inputs"]["gamma"] = 1.5
    valid, _, _, node_errors = comfy_host.validate(graph)
    assert not valid
    assert "gamma" in str(node_errors)


def test_one_step_schedule_refuses_partial_denoise(comfy_host):
    graph = sampler_graph("hyper_1step", "eps", "bad1")
    graph["sigmas"]["inputs"]["denoise"] = 0.5
    result = comfy_host.run(graph)
    assert not result.success
    assert "denoise" in result.error()["exception_message"]
