"""pi-Flow nodes inside a real ComfyUI: exact on the reference teacher, released-adapter layout on a
tiny FLUX.1 built from ComfyUI's own classes, and clear refusals of wrong inputs."""
from __future__ import annotations

import importlib.util
import logging
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill_core.piflow import substep_sigmas
from distill_core.piflow_adapter import DX_POLICY, FluxShape, flux_lora_targets, parse_piflow_adapter
from distill_core.spaces import NoiseSpace

SEED = 5
BATCH = 4
ROOT = Path(__file__).resolve().parents[2]


def _adapter_builders():
    """The unit tests' builder of adapters with the official key layout (one definition of that layout)."""
    spec = importlib.util.spec_from_file_location("piflow_adapter_builders", ROOT / "tests/unit/test_piflow_adapter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILDERS = _adapter_builders()
TINY = BUILDERS.SMALL  # hidden 64, 2 double + 3 single blocks, context 32, vec 16
TINY_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=TINY.vec_in_dim,
                 context_in_dim=TINY.context_in_dim, hidden_size=TINY.hidden_size, mlp_ratio=TINY.mlp_ratio, num_heads=2,
                 depth=TINY.depth, depth_single_blocks=TINY.depth_single_blocks, axes_dim=[8, 12, 12], theta=10000,
                 patch_size=2, qkv_bias=True, guidance_embed=True)
ADAPTERS = {
    "pi_tiny_gm.safetensors": (BUILDERS.official_adapter(TINY), BUILDERS.GM_METADATA),
    "pi_tiny_dx.safetensors": (BUILDERS.official_adapter(TINY, kind=DX_POLICY, components=10), BUILDERS.DX_METADATA),
    "pi_wide_gm.safetensors": (BUILDERS.official_adapter(FluxShape(hidden_size=128, depth=2, depth_single_blocks=3,
                                                                   context_in_dim=32, vec_in_dim=16)), None),
    "plain_lora.safetensors": ({k: v for k, v in BUILDERS.official_adapter(TINY).items() if "lora" in k}, None),
}


def piflow_module(comfy_host):
    """Stride's nodes/piflow.py as ComfyUI imported it (the custom-node package name is ComfyUI's choice)."""
    return sys.modules[comfy_host.nodes.NODE_CLASS_MAPPINGS["StridePiFlowSampler"].__module__]


def run_latent(comfy_host, graph: dict) -> torch.Tensor:
    result = comfy_host.run(graph)
    assert result.success, result.error()
    return load_file(str(comfy_host.output_path(result.outputs["save"]["latents"][0])))["latent_tensor"]


def run_error(comfy_host, graph: dict) -> str:
    result = comfy_host.run(graph)
    assert not result.success
    return result.error()["exception_message"]


# ------------------------------------------------------------------------------------------
# (a) exact on the reference teacher
# ------------------------------------------------------------------------------------------
def reference_graph(steps: int, guider: str = "BasicGuider", model: dict | None = None) -> dict:
    graph = {
        "model": model or {"class_type": "StridePiFlowReferenceModel", "inputs": {}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "neg": {"class_type": "StrideClassPrompt", "inputs": {"prompt": "disc"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": BATCH}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "sampler": {"class_type": "StridePiFlowSampler", "inputs": {
            "substeps": 128, "diffusion_coefficient": 0.0, "temperature": "manual", "manual_temperature": 1.0, "shift": 3.2}},
        "sigmas": {"class_type": "StridePiFlowScheduler", "inputs": {
            "model": ["model", 0], "steps": steps, "shift": 3.2, "final_step_size_scale": 0.5, "denoise": 1.0}},
        "run": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": f"piflow{steps}"}},
    }
    if guider == "BasicGuider":
        graph["guider"] = {"class_type": "BasicGuider", "inputs": {"model": ["model", 0], "conditioning": ["pos", 0]}}
    else:
        cfg = float(guider.split()[1])
        graph["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["pos", 0],
                                                                  "negative": ["neg", 0], "cfg": cfg}}
    return graph


def reference_sigmas(comfy_host, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The scheduler's float32 SIGMAS for the reference teacher, as the graph has them."""
    nodes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    model = nodes["StridePiFlowReferenceModel"]().build()[0]
    return nodes["StridePiFlowScheduler"]().schedule(model, steps, 3.2, 0.5, denoise)[0]


def reference_substep_grid(comfy_host, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The sampler's substep sigmas (float64) on the scheduler's SIGMAS."""
    sigmas = reference_sigmas(comfy_host, steps, denoise)
    return torch.cat([substep_sigmas(float(a), float(b), 128, 3.2)[:-1] for a, b in zip(sigmas[:-1], sigmas[1:])]
                     + [sigmas[-1:].double()])


def teacher_euler(comfy_host, steps: int, *, denoise: float = 1.0, latent: torch.Tensor | None = None,
                  seed: int = SEED, grid: torch.Tensor | None = None) -> torch.Tensor:
    """The reference teacher's own Euler ODE (float64) on the sampler's substep grid (or ``grid``), from
    ``latent`` noised to the first sigma with the graph's seeded noise (an empty latent by default)."""
    mixture = comfy_host.nodes.NODE_CLASS_MAPPINGS["StridePiFlowReferenceModel"]().build()[0].model.diffusion_model.mixture
    grid = reference_substep_grid(comfy_host, steps, denoise) if grid is None else grid
    noise = torch.randn((BATCH, 4, 8, 8), generator=torch.manual_seed(seed), dtype=torch.float32).double()
    latent = torch.zeros_like(noise) if latent is None else latent.double()
    sigma0 = float(grid[0])
    x = sigma0 * noise + (1 - sigma0) * latent  # ComfyUI's noise_scaling of the start latent
    space = NoiseSpace.flow()
    for sigma, sigma_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x = x + (sigma_next - sigma) * (x - mixture.denoise(x, sigma, space)) / sigma
    return x


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_reference_teacher_sampling_equals_its_euler_ode(comfy_host, steps):
    got = run_latent(comfy_host, reference_graph(steps))
    want = teacher_euler(comfy_host, steps)
    error = float((got.double() - want).abs().max())
    print(f"pi-Flow {steps} NFE through the host vs teacher Euler on the same substep grid: max |diff| = {error:.2e} "
          f"(latent rms {float(want.pow(2).mean().sqrt()):.2f})")
    assert torch.isfinite(got).all()
    assert error < 2e-5


def test_convenience_node_reports_progress_and_previews_x0(comfy_host):
    graph = {
        "model": {"class_type": "StridePiFlowReferenceModel", "inputs": {}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": BATCH}},
        "run": {"class_type": "StridePiFlowSample", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "latent_image": ["latent", 0], "steps": 4, "substeps": 128,
            "diffusion_coefficient": 0.0, "shift": 3.2, "final_step_size_scale": 0.5, "temperature": "manual",
            "manual_temperature": 1.0, "seed": SEED, "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "piflow_sample"}},
    }
    result = comfy_host.run(graph)
    assert result.success, result.error()
    assert [value for value, total in result.progress if total == 4][-1] == 4
    got = load_file(str(comfy_host.output_path(result.outputs["save"]["latents"][0])))["latent_tensor"]
    assert float((got.double() - teacher_euler(comfy_host, 4)).abs().max()) < 2e-5  # same seed: same noise


# ------------------------------------------------------------------------------------------
# (a2) inpainting: a noise mask keeps the rest of the latent exactly
# ------------------------------------------------------------------------------------------
INPAINT_SEED = 7


def inpainting_graph(mask: dict | None, denoise: float, model: dict | None = None) -> dict:
    """Sample an original latent, then re-sample it (seed INPAINT_SEED) with ``mask`` as its noise mask."""
    graph = {
        "model": {"class_type": "StridePiFlowReferenceModel", "inputs": {}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": BATCH}},
        "original": {"class_type": "StridePiFlowSample", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "latent_image": ["empty", 0], "steps": 4, "substeps": 128,
            "diffusion_coefficient": 0.0, "shift": 3.2, "final_step_size_scale": 0.5, "temperature": "manual",
            "manual_temperature": 1.0, "seed": SEED, "denoise": 1.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": INPAINT_SEED}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["sampling_model", 0], "conditioning": ["pos", 0]}},
        "sampler": {"class_type": "StridePiFlowSampler", "inputs": {
            "substeps": 128, "diffusion_coefficient": 0.0, "temperature": "manual", "manual_temperature": 1.0, "shift": 3.2}},
        "sigmas": {"class_type": "StridePiFlowScheduler", "inputs": {
            "model": ["model", 0], "steps": 4, "shift": 3.2, "final_step_size_scale": 0.5, "denoise": denoise}},
        "run": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["masked", 0] if mask else ["original", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "piflow_inpaint"}},
    }
    graph["sampling_model"] = model or {"class_type": "StridePiFlowReferenceModel", "inputs": {}}
    if mask:
        graph.update(mask)
        graph["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["original", 0], "mask": ["mask", 0]}}
    return graph


def solid_mask(value: float) -> dict:
    return {"mask": {"class_type": "SolidMask", "inputs": {"value": value, "width": 64, "height": 64}}}


LEFT_HALF_MASK = {  # 1 (regenerate) on the left half of the 64x64 image = latent columns 0-3, exactly
    "zeros": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
    "left": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
    "mask": {"class_type": "MaskComposite", "inputs": {"destination": ["zeros", 0], "source": ["left", 0],
                                                       "x": 0, "y": 0, "operation": "add"}},
}


@pytest.fixture(scope="module")
def original(comfy_host) -> torch.Tensor:
    """The original latent of the inpainting graphs (the host caches that branch for later runs)."""
    graph = {name: node for name, node in inpainting_graph(None, 1.0).items() if name in ("model", "pos", "empty", "original")}
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["original", 0], "filename_prefix": "piflow_original"}}
    return run_latent(comfy_host, graph)


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_inpainting_keeps_the_unmasked_region_and_follows_the_teacher_in_the_mask(comfy_host, original, denoise):
    got = run_latent(comfy_host, inpainting_graph(LEFT_HALF_MASK, denoise))
    generated = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    generated[..., :4] = True
    generated = generated.expand_as(got)
    kept_error = float((got - original)[~generated].abs().max())
    # the teacher factorises over latent locations: in the mask, inpainting is plain img2img sampling there, and
    # that is the teacher's Euler ODE (float32 in the graph: from sigma 0.83 a few locations amplify rounding to ~4e-5)
    plain = run_latent(comfy_host, inpainting_graph(None, denoise))
    plain_error = float((got - plain)[generated].abs().max())
    want = teacher_euler(comfy_host, 4, denoise=denoise, latent=original, seed=INPAINT_SEED)
    generated_error = float((got.double() - want)[generated].abs().max())
    change = float((got - original)[generated].abs().max())
    print(f"inpainting, denoise {denoise}: kept region max|out - original| = {kept_error:.1e}; masked region "
          f"max|out - plain sampling| = {plain_error:.1e}, max|out - teacher Euler| = {generated_error:.1e}, "
          f"max|out - original| = {change:.2f}")
    assert kept_error < 1e-5
    assert plain_error < 1e-6
    assert generated_error < 1e-4
    assert change > 0.1


def test_all_ones_mask_is_plain_sampling(comfy_host):
    masked = run_latent(comfy_host, inpainting_graph(solid_mask(1.0), 0.6))
    plain = run_latent(comfy_host, inpainting_graph(None, 0.6))
    assert torch.equal(masked, plain)


def test_differential_diffusion_mask_function_is_applied_per_step(comfy_host, original):
    """Differential Diffusion turns a soft mask into a per-step binary one: 0.5 keeps everything for the
    steps at sigma 1, 0.889 and 0.706 (threshold above 0.5) and regenerates everything in the last one."""
    differential = {"class_type": "DifferentialDiffusion", "inputs": {"model": ["model", 0], "strength": 1.0}}
    got = run_latent(comfy_host, inpainting_graph(solid_mask(0.5), 1.0, model=differential))
    last_step = substep_sigmas(float(reference_sigmas(comfy_host, 4)[3]), 0.0, 128, 3.2)
    want = teacher_euler(comfy_host, 4, latent=original, seed=INPAINT_SEED, grid=last_step)
    error = float((got.double() - want).abs().max())
    print(f"Differential Diffusion, mask 0.5: max|out - teacher Euler over the last step only| = {error:.1e}")
    assert error < 2e-5


def test_policy_output_carries_the_dx_mode(comfy_host):
    piflow_nodes = piflow_module(comfy_host)
    g = torch.Generator().manual_seed(3)
    x, velocities = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    sigma = torch.full((2,), 0.7)
    assert piflow_nodes.PolicyOutput("dx", (velocities,), 1 / 3.5, 3.2).mode == "grid"  # the official default
    stash = piflow_nodes.PolicyStash()
    for rows in (slice(0, 1), slice(1, 2)):
        chunk = piflow_nodes.PolicyOutput("dx", (velocities[rows],), 0.0, 3.2, "polynomial")
        piflow_nodes.deposit_policy({piflow_nodes.STASH_KEY: stash}, chunk)
    policy = stash.policy(x, sigma)
    assert policy.mode == "polynomial"
    torch.testing.assert_close(policy.x0_terms, x.unsqueeze(1) - 0.7 * velocities)
    stash.outputs.append(piflow_nodes.PolicyOutput("dx", (velocities[:1],), 0.0, 3.2, "grid"))
    with pytest.raises(piflow_nodes.StrideError, match="different kinds of pi-Flow policy"):
        stash.policy(torch.cat([x, x[:1]]), torch.full((3,), 0.7))


# ------------------------------------------------------------------------------------------
# (b) released adapter layout on a tiny FLUX.1 made of ComfyUI's own classes
# ------------------------------------------------------------------------------------------
def build_tiny_flux():
    """A FLUX.1-architecture MODEL (ComfyUI's Flux classes) with random weights, plus a matching CONDITIONING."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(dict(TINY_FLUX))
    config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.Flux(config, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in base.diffusion_model.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    context = torch.randn((1, 6, TINY.context_in_dim), generator=generator)
    pooled = torch.randn((1, TINY.vec_in_dim), generator=generator)
    return model, [[context, {"pooled_output": pooled, "guidance": 3.5}]]


@pytest.fixture(scope="module")
def tiny_flux(comfy_host):
    """The tiny FLUX.1 as a graph node, and adapter files (good and bad) in the host's models/loras."""
    model, conditioning = build_tiny_flux()

    class TestTinyFlux:
        CATEGORY = "testing"
        RETURN_TYPES = ("MODEL", "CONDITIONING")
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            return model, conditioning

    loras = Path(comfy_host.folder_paths.get_folder_paths("loras")[0])
    for name, (state_dict, metadata) in ADAPTERS.items():
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(loras / name), metadata=metadata)
    torch.save({"weights": torch.zeros(2)}, loras / "pickled.pt")
    torch.save({"weights": torch.zeros(2)}, loras / "pickled_renamed.safetensors")
    comfy_host.folder_paths.filename_list_cache.clear()
    comfy_host.nodes.NODE_CLASS_MAPPINGS["TestTinyFlux"] = TestTinyFlux
    yield model, conditioning
    del comfy_host.nodes.NODE_CLASS_MAPPINGS["TestTinyFlux"]


def flux_forward(model, conditioning, transformer_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One network call through ComfyUI's model loading and BaseModel.apply_model: (x, denoised)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    context, extras = conditioning[0]
    x = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 0.7)
    denoised = model.model.apply_model(x, sigma, c_crossattn=context.repeat(2, 1, 1), y=extras["pooled_output"].repeat(2, 1),
                                       guidance=torch.full((2,), 3.5), transformer_options=transformer_options or {})
    return x, denoised


def flux_sample_graph(adapter: str) -> dict:
    return {
        "flux": {"class_type": "TestTinyFlux", "inputs": {}},
        "adapter": {"class_type": "StridePiFlowAdapterLoader", "inputs": {
            "model": ["flux", 0], "adapter_name": adapter, "strength": 1.0}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "run": {"class_type": "StridePiFlowSample", "inputs": {
            "model": ["adapter", 0], "positive": ["flux", 1], "latent_image": ["latent", 0], "steps": 4, "substeps": 128,
            "diffusion_coefficient": 0.0, "shift": 3.2, "final_step_size_scale": 0.5, "temperature": "auto",
            "manual_temperature": 1.0, "seed": SEED, "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "piflux"}},
    }


class WarningRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("adapter", ["pi_tiny_gm.safetensors", "pi_tiny_dx.safetensors"])
def test_adapter_loads_every_key_and_samples_in_the_host(comfy_host, tiny_flux, adapter):
    model, conditioning = tiny_flux
    state_dict, metadata = ADAPTERS[adapter]
    parsed = parse_piflow_adapter(state_dict, metadata)
    _, before = flux_forward(model, conditioning)

    patched = comfy_host.nodes.NODE_CLASS_MAPPINGS["StridePiFlowAdapterLoader"]().load(model, adapter, 1.0)[0]
    expected = {f"diffusion_model.{target.key}" for target, _, _ in flux_lora_targets(parsed, TINY).values()}
    assert set(patched.patches) == expected
    assert sum(len(entries) for entries in patched.patches.values()) == len(parsed.lora) == 16
    assert not model.patches and not model.object_patches, "the input MODEL is not modified"

    # the network outputs the policy's mean velocity: ComfyUI's denoised x0 is the policy's x0 at the source
    piflow_nodes = piflow_module(comfy_host)
    stash = piflow_nodes.PolicyStash()
    x, denoised = flux_forward(patched, conditioning, {"wrappers": patched.wrappers, piflow_nodes.STASH_KEY: stash})
    policy = stash.policy(x, torch.full((2,), 0.7))
    torch.testing.assert_close(policy.denoised, denoised, atol=1e-4, rtol=1e-5)
    assert (denoised - before).abs().max() > 1e-2, "the adapter changes the model"

    recorder = WarningRecorder()
    logging.getLogger().addHandler(recorder)
    try:
        samples = run_latent(comfy_host, flux_sample_graph(adapter))
    finally:
        logging.getLogger().removeHandler(recorder)
    assert samples.shape == (2, 16, 8, 8) and torch.isfinite(samples).all()
    assert not [m for m in recorder.messages if "lora" in m.lower() or "not loaded" in m.lower()], recorder.messages

    _, after = flux_forward(model, conditioning)
    assert torch.equal(before, after), "the input MODEL gives the same output after the adapter model ran"


# ------------------------------------------------------------------------------------------
# (c) refusals
# ------------------------------------------------------------------------------------------
def loader_graph(adapter: str, model: dict | None = None) -> dict:
    graph = flux_sample_graph(adapter)
    if model is not None:
        graph["other"] = model
        graph["adapter"]["inputs"]["model"] = ["other", 0]
    return graph


@pytest.mark.parametrize("adapter", ["pickled.pt", "pickled_renamed.safetensors"])
def test_pickle_files_are_refused_before_unpickling(comfy_host, tiny_flux, monkeypatch, adapter):
    calls = []
    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    message = run_error(comfy_host, loader_graph(adapter))
    assert not calls, f"unpickling was attempted: {calls}"
    assert "adapter_name" in message and ("safetensors" in message or "pickle" in message), message


@pytest.mark.parametrize("adapter, expected", [
    ("plain_lora.safetensors", "not a pi-Flow adapter"),
    ("pi_wide_gm.safetensors", "'pi_wide_gm.safetensors'.*another model"),
])
def test_wrong_adapter_files_are_refused_by_name(comfy_host, tiny_flux, adapter, expected):
    message = run_error(comfy_host, loader_graph(adapter))
    assert re.search(expected, message), message


def test_adapter_on_a_non_flux_model_is_refused(comfy_host, tiny_flux):
    message = run_error(comfy_host, loader_graph("pi_tiny_gm.safetensors",
                                                 {"class_type": "StridePiFlowReferenceModel", "inputs": {}}))
    assert "FLUX.1 model" in message


def test_cfg_above_one_gives_the_guidance_message(comfy_host):
    message = run_error(comfy_host, reference_graph(2, guider="CFGGuider 2.0"))
    assert "guidance distilled in" in message and "BasicGuider" in message


def test_plain_flow_model_is_not_a_piflow_model(comfy_host):
    plain = {"class_type": "StrideReferenceModel", "inputs": {"variant": "demo", "prediction": "flow",
                                                              "form": "denoiser (ideal many-step teacher)",
                                                              "flow_map_steps": 8}}
    message = run_error(comfy_host, reference_graph(2, model=plain))
    assert "did not output a pi-Flow policy" in message and "Adapter Loader" in message


def test_scheduler_refuses_eps_models(comfy_host):
    eps = {"class_type": "StrideReferenceModel", "inputs": {"variant": "demo", "prediction": "eps",
                                                            "form": "denoiser (ideal many-step teacher)",
                                                            "flow_map_steps": 8}}
    message = run_error(comfy_host, reference_graph(2, model=eps))
    assert "flow-matching" in message and "an EPS model" in message
