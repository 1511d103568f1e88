"""pi-Flow nodes inside a real ComfyUI: exact on the reference teacher (plain, img2img and inpainting),
and clear refusals of wrong inputs. Released adapters on ComfyUI's own FLUX.1, FLUX.2 and Qwen-Image
classes: tests/host/test_piflow_loader.py."""
from __future__ import annotations

import itertools
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from distill_core.sampling.piflow import substep_sigmas
from distill_core.spaces import NoiseSpace

SEED = 5
BATCH = 4


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
            "substeps": 128, "diffusion_coefficient": 0.0, "temperature": "manual", "manual_temperature": 1.0,
            "shift": 3.2}},
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
    model = nodes["StridePiFlowReferenceModel"].execute()[0]
    return nodes["StridePiFlowScheduler"].execute(model, steps, 3.2, 0.5, denoise)[0]


def reference_substep_grid(comfy_host, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The sampler's substep sigmas (float64) on the scheduler's SIGMAS."""
    sigmas = reference_sigmas(comfy_host, steps, denoise)
    return torch.cat([substep_sigmas(float(a), float(b), 128, 3.2)[:-1] for a, b in itertools.pairwise(sigmas)]
                     + [sigmas[-1:].double()])


def teacher_euler(comfy_host, steps: int, *, denoise: float = 1.0, latent: torch.Tensor | None = None,
                  seed: int = SEED, grid: torch.Tensor | None = None) -> torch.Tensor:
    """The reference teacher's own Euler ODE (float64) on the sampler's substep grid (or ``grid``), from
    ``latent`` noised to the first sigma with the graph's seeded noise (an empty latent by default)."""
    reference = comfy_host.nodes.NODE_CLASS_MAPPINGS["StridePiFlowReferenceModel"].execute()[0]
    mixture = reference.model.diffusion_model.mixture
    grid = reference_substep_grid(comfy_host, steps, denoise) if grid is None else grid
    noise = torch.randn((BATCH, 4, 8, 8), generator=torch.manual_seed(seed), dtype=torch.float32).double()
    latent = torch.zeros_like(noise) if latent is None else latent.double()
    sigma0 = float(grid[0])
    x = sigma0 * noise + (1 - sigma0) * latent  # ComfyUI's noise_scaling of the start latent
    space = NoiseSpace.flow()
    for sigma, sigma_next in itertools.pairwise(grid.tolist()):
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
            "substeps": 128, "diffusion_coefficient": 0.0, "temperature": "manual", "manual_temperature": 1.0,
            "shift": 3.2}},
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
        graph["masked"] = {"class_type": "SetLatentNoiseMask",
                           "inputs": {"samples": ["original", 0], "mask": ["mask", 0]}}
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
    graph = {name: node for name, node in inpainting_graph(None, 1.0).items()
             if name in ("model", "pos", "empty", "original")}
    graph["save"] = {"class_type": "SaveLatent",
                     "inputs": {"samples": ["original", 0], "filename_prefix": "piflow_original"}}
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


def test_stash_builds_flux2_policies_on_the_unfolded_latent(comfy_host):
    """A policy for the 32-channel latent of a 128-channel batch is built there and used folded; a policy
    of an unrelated shape is refused."""
    piflow_nodes = piflow_module(comfy_host)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 128, 2, 3, generator=g)
    means, logweights = torch.randn(2, 3, 32, 4, 6, generator=g), torch.randn(2, 3, 1, 4, 6, generator=g)
    logstds = torch.full((2, 1, 1, 1, 1), -0.5)
    stash = piflow_nodes.PolicyStash()
    stash.outputs.append(piflow_nodes.PolicyOutput("gm", (means, logweights, logstds)))
    policy = stash.policy(x, torch.full((2,), 0.7))
    inner = piflow_nodes.piflow.GMPolicy.from_velocity(means, logweights, logstds, F.pixel_shuffle(x, 2), 0.7)
    assert isinstance(policy, piflow_nodes.piflow.PackedLatentPolicy) and policy.factor == 2
    torch.testing.assert_close(policy.denoised, F.pixel_unshuffle(inner.denoised, 2))
    with pytest.raises(piflow_nodes.StrideError, match="guider: the policy covers latents of shape"):
        stash.policy(torch.randn(2, 64, 2, 3), torch.full((2,), 0.7))


# ------------------------------------------------------------------------------------------
# (b) refusals
# ------------------------------------------------------------------------------------------
def test_cfg_above_one_gives_the_guidance_message(comfy_host):
    message = run_error(comfy_host, reference_graph(2, guider="CFGGuider 2.0"))
    assert "guidance distilled in" in message and "BasicGuider" in message


def test_plain_flow_model_is_not_a_piflow_model(comfy_host):
    plain = {"class_type": "StrideReferenceModel", "inputs": {"variant": "demo", "prediction": "flow",
                                                              "form": "denoiser (ideal many-step teacher)",
                                                              "flow_map_steps": 8}}
    message = run_error(comfy_host, reference_graph(2, model=plain))
    assert "did not output a pi-Flow policy" in message and "Adapter Loader" in message
    assert "FLUX.1, FLUX.2 or Qwen-Image" in message


def test_scheduler_refuses_eps_models(comfy_host):
    eps = {"class_type": "StrideReferenceModel", "inputs": {"variant": "demo", "prediction": "eps",
                                                            "form": "denoiser (ideal many-step teacher)",
                                                            "flow_map_steps": 8}}
    message = run_error(comfy_host, reference_graph(2, model=eps))
    assert "flow-matching" in message and "an EPS model" in message
