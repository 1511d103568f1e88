"""Released pi-Flow adapters on ComfyUI's own FLUX.1, FLUX.2 and Qwen-Image models (tiny sizes, real
latents): every key of a random adapter in the released layout is used and lands on the right weights,
the policy the head deposits is a direct computation from the adapter's tensors, the Stride pi-Flow
sampler integrates exactly that policy (DX in grid and polynomial mode; FLUX.2's on its unfolded latent, masks
and temperature included), and wrong files and adapters of another family are refused by name."""
from __future__ import annotations

import importlib.util
import json
import logging
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import comfy_host as harness
from distill_core.piflow_adapter import DX_POLICY, GM_POLICY, parse_piflow_adapter, unpack_dx_tokens, unpack_gm_tokens
from distill_core.sampling import piflow

ROOT = Path(__file__).resolve().parents[2]
SEED = 7
SIGMA = 0.7


def _adapter_builders():
    """The unit tests' builders of adapters in the official key layout and of the tiny model configs."""
    spec = importlib.util.spec_from_file_location("piflow_adapter_builders", ROOT / "tests/unit/test_piflow_adapter.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


BUILDERS = _adapter_builders()
FLUX1, FLUX2, QWEN = BUILDERS.FLUX1, BUILDERS.FLUX2, BUILDERS.QWEN_IMAGE
# (family, ComfyUI's supported-model class, image_model, latent shape of one 64x64 image, Flux guidance)
MODELS = {
    "FLUX.1": (FLUX1, "Flux", "flux", (16, 8, 8), 3.5),
    "FLUX.2": (FLUX2, "Flux2", "flux2", (128, 4, 4), 4.0),
    "Qwen-Image": (QWEN, "QwenImage", "qwen_image", (16, 1, 8, 8), None),
}
# adapter kinds: the policy and, for DX, its mode (the released DX adapters are grid mode; polynomial is the
# official dxqwen_p10 config's, selected by the metadata alone)
GM, DX, DX_POLYNOMIAL = "GM", "DX", "DX polynomial"
POLICY_TYPE = {GM: GM_POLICY, DX: DX_POLICY, DX_POLYNOMIAL: DX_POLICY}
METADATA = {GM: BUILDERS.GM_METADATA, DX: BUILDERS.DX_METADATA,
            DX_POLYNOMIAL: {"policy_config": json.dumps({"mode": "polynomial", "shift": 3.2, "type": "DX"})}}
DX_MODE = {DX: piflow.DX_GRID, DX_POLYNOMIAL: piflow.DX_POLYNOMIAL}
CASES = [("FLUX.1", GM), ("FLUX.1", DX), ("FLUX.2", GM), ("Qwen-Image", GM), ("Qwen-Image", DX),
         ("Qwen-Image", DX_POLYNOMIAL)]


def adapter_file(name: str, kind: str) -> str:
    return f"stride_test_{name.replace('.', '').replace('-', '').lower()}_{kind.replace(' ', '_').lower()}.safetensors"


def adapter_state(name: str, kind: str) -> dict[str, torch.Tensor]:
    """A random adapter in the family's released layout, scaled so a tiny model stays well-conditioned
    (the same tensors for both DX modes)."""
    state = BUILDERS.released_adapter(MODELS[name][0], POLICY_TYPE[kind], size="tiny")
    return {key: 0.1 * value for key, value in state.items()}


ADAPTERS = {adapter_file(name, kind): (adapter_state(name, kind), METADATA[kind]) for name, kind in CASES}
# files the loader must refuse on the tiny FLUX.1: an adapter for a wider FLUX.1, and a plain LoRA (no head)
WIDE_ADAPTER, PLAIN_LORA = "stride_test_flux1_wide_gm.safetensors", "stride_test_flux1_plain_lora.safetensors"
ADAPTERS[WIDE_ADAPTER] = (BUILDERS.official_adapter(BUILDERS.FluxShape(hidden_size=128, depth=2, depth_single_blocks=3,
                                                                       context_in_dim=32, vec_in_dim=16)), None)
ADAPTERS[PLAIN_LORA] = ({k: v for k, v in ADAPTERS[adapter_file("FLUX.1", GM)][0].items() if "lora" in k}, None)
PICKLES = ("stride_test_pickled.pt", "stride_test_pickled_renamed.safetensors")


def tiny_model(name: str):
    """A MODEL of ComfyUI's own classes for this family (tiny, random weights) and a matching CONDITIONING."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    family, config_class, image_model, _, guidance = MODELS[name]
    unet_config = {"image_model": image_model, **BUILDERS.TINY_COMFY[family]}
    if family is not QWEN:
        unet_config = harness.flux_unet_config(unet_config, (3,) if family is FLUX2 else ())
    config = getattr(comfy.supported_models, config_class)(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in base.diffusion_model.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    # FLUX.2's text encoder has no pooled output; ComfyUI's Flux conditioning still carries the key
    extras = {"pooled_output": torch.randn((1, 16), generator=generator) if family is FLUX1 else None}
    if guidance is not None:
        extras["guidance"] = guidance
    return model, [[torch.randn((1, 6, 32), generator=generator), extras]]


@pytest.fixture(scope="module")
def tiny(comfy_host):
    """The three tiny models (also as a graph node, TestTinyPiFlowBase) and the adapter files (good and bad) in
    models/loras."""
    models = {name: tiny_model(name) for name in MODELS}

    class TestTinyPiFlowBase:
        CATEGORY = "testing"
        RETURN_TYPES = ("MODEL", "CONDITIONING")
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"family": (list(MODELS),)}}

        def load(self, family):
            return models[family]

    loras = Path(comfy_host.folder_paths.get_folder_paths("loras")[0])
    for file_name, (state_dict, metadata) in ADAPTERS.items():
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(loras / file_name), metadata=metadata)
    for file_name in PICKLES:
        torch.save({"weights": torch.zeros(2)}, loras / file_name)
    comfy_host.folder_paths.filename_list_cache.clear()
    comfy_host.nodes.NODE_CLASS_MAPPINGS["TestTinyPiFlowBase"] = TestTinyPiFlowBase
    yield models
    del comfy_host.nodes.NODE_CLASS_MAPPINGS["TestTinyPiFlowBase"]
    for file_name in (*ADAPTERS, *PICKLES):  # later tests see the host's models/loras as it was
        (loras / file_name).unlink(missing_ok=True)
    comfy_host.folder_paths.filename_list_cache.clear()


def loader_module(comfy_host):
    """Stride's nodes/piflow_loader.py as ComfyUI imported it."""
    return sys.modules[comfy_host.nodes.NODE_CLASS_MAPPINGS["StridePiFlowAdapterLoader"].__module__]


def load_adapter(comfy_host, model, file_name: str):
    return comfy_host.nodes.NODE_CLASS_MAPPINGS["StridePiFlowAdapterLoader"].execute(model, file_name, 1.0)[0]


def latent_batch(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn((batch, *MODELS[name][3]), generator=torch.Generator().manual_seed(SEED))


def forward(name: str, model, conditioning, x: torch.Tensor, transformer_options: dict | None = None) -> torch.Tensor:
    """One network call through ComfyUI's model loading and BaseModel.apply_model: the denoised x0."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    context, extras = conditioning[0]
    batch = x.shape[0]
    conds = {"c_crossattn": context.repeat(batch, 1, 1)}
    if extras.get("pooled_output") is not None:
        conds["y"] = extras["pooled_output"].repeat(batch, 1)
    if "guidance" in extras:
        conds["guidance"] = torch.full((batch,), extras["guidance"])
    return model.model.apply_model(x, torch.full((batch,), SIGMA), transformer_options=transformer_options or {},
                                   **conds)


class HeadInputs:
    """Records what the policy head is called with (tokens, conditioning) during a model call."""

    def __init__(self, head) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = head.register_forward_pre_hook(lambda module, args: self.calls.append(args[:2]))

    def remove(self) -> None:
        self.handle.remove()


def direct_policy(state: dict[str, torch.Tensor], name: str, kind: str, tokens: torch.Tensor,
                  conditioning: torch.Tensor, latent_shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """The policy tensors computed straight from the adapter's head tensors (diffusers names) and the head's inputs."""
    family = MODELS[name][0]
    packing = 2 if family is FLUX2 else 1
    cond = conditioning.float()
    modulation = F.linear(F.silu(cond), state["norm_out.linear.weight"], state.get("norm_out.linear.bias"))
    scale, shift = modulation.chunk(2, -1)
    hidden = F.layer_norm(tokens.float(), tokens.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    height, width = latent_shape[-2] * packing, latent_shape[-1] * packing
    if kind == GM:
        means = F.linear(hidden, state["proj_out_means.weight"], state["proj_out_means.bias"])
        logits = F.linear(hidden, state["proj_out_logweights.weight"], state["proj_out_logweights.bias"])
        inner = F.linear(F.silu(cond), state["proj_out_logstds.1.weight"], state["proj_out_logstds.1.bias"])
        logstds = F.linear(F.silu(inner), state["proj_out_logstds.3.weight"], state["proj_out_logstds.3.bias"])
        tensors = unpack_gm_tokens(means, logits, logstds, height, width)
    else:
        grid = F.linear(hidden, state["proj_out.weight"], state["proj_out.bias"])
        tensors = (unpack_dx_tokens(grid, 10, height, width),)
    return tuple(t.unsqueeze(3) for t in tensors) if len(latent_shape) == 5 else tensors


def build_policy(name: str, kind: str, tensors: tuple[torch.Tensor, ...], x: torch.Tensor, sigma: float):
    """The policy the sampler should integrate: on the latent itself, or on FLUX.2's unfolded latent."""
    sigma_batch = torch.full((x.shape[0],), sigma)
    folded = MODELS[name][0] is FLUX2
    source = F.pixel_shuffle(x, 2) if folded else x
    if kind == GM:
        policy = piflow.GMPolicy.from_velocity(*tensors, source, sigma_batch)
    else:
        policy = piflow.DXPolicy.from_velocity(tensors[0], source, sigma_batch, 1 / 3.5, piflow.DEFAULT_SHIFT,
                                               DX_MODE[kind])
    return piflow.PackedLatentPolicy(policy, 2) if folded else policy


@pytest.mark.parametrize("name, kind", CASES)
def test_adapter_lands_on_the_right_weights_and_its_head_makes_the_policy(comfy_host, tiny, name, kind):
    import comfy.model_management

    model, conditioning = tiny[name]
    file_name = adapter_file(name, kind)
    state = ADAPTERS[file_name][0]
    family = MODELS[name][0]
    adapter = parse_piflow_adapter(state, METADATA[kind], family.latent_channels)
    assert adapter.policy_config.get("mode", piflow.DX_GRID) == DX_MODE.get(kind, piflow.DX_GRID)
    x = latent_batch(name)
    before = forward(name, model, conditioning, x)
    original = {key: value.clone() for key, value in model.model.diffusion_model.state_dict().items()}

    patched = load_adapter(comfy_host, model, file_name)
    loader = loader_module(comfy_host)
    comfy_family = loader.model_family(model)
    assert comfy_family.spec.name == family.name
    assert not model.patches and not model.object_patches, "the input MODEL is not modified"
    assert sum(len(entries) for entries in patched.patches.values()) == len(adapter.lora) > 0
    head = patched.object_patches[f"diffusion_model.{comfy_family.head_module}"]
    assert isinstance(head, loader.PolicyHead)
    assert all(isinstance(patched.object_patches[f"diffusion_model.{m}"], torch.nn.Identity)
               for m in comfy_family.retired)

    # every LoRA pair lands on its ComfyUI weight (rows of fused q|k|v|mlp weights included), scale 1
    shapes = {key: tuple(value.shape) for key, value in original.items()}
    expected = {key: value.clone() for key, value in original.items()}
    for module, (down, up) in adapter.lora.items():
        target = family.comfy_target(module, shapes)
        offset, size = target.rows or (0, shapes[target.key][0])
        expected[target.key][offset: offset + size] += up @ down
    comfy.model_management.load_models_gpu([patched])
    merged = patched.model.diffusion_model.state_dict()
    changed = [key for key in expected if not torch.equal(expected[key], original[key])]
    assert len(changed) == len(set(patched.patches))
    for key in changed:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-5, rtol=1e-5)

    # one network call: the deposited policy is the head computed from the adapter's tensors, and
    # ComfyUI's denoised output is that policy's x0 at the source
    stash = sys.modules[loader.PolicyOutput.__module__].PolicyStash()
    recorder = HeadInputs(head)
    try:
        denoised = forward(name, patched, conditioning, x, {"wrappers": patched.wrappers, "stride_piflow_stash": stash})
    finally:
        recorder.remove()
    assert len(stash.outputs) == 1 and len(recorder.calls) == 1
    output = stash.outputs[0]
    assert output.mode == DX_MODE.get(kind, piflow.DX_GRID)
    want = direct_policy(state, name, kind, *recorder.calls[0], x.shape)
    assert [tuple(t.shape) for t in output.tensors] == [tuple(t.shape) for t in want]
    for got, direct in zip(output.tensors, want, strict=True):
        torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(build_policy(name, kind, output.tensors, x, SIGMA).denoised, denoised,
                               atol=1e-5, rtol=1e-5)
    assert (denoised - before).abs().max() > 1e-3, "the adapter changes the model"

    after = forward(name, model, conditioning, x)
    assert torch.equal(before, after), "the input MODEL gives the same output after the adapter model ran"


@pytest.mark.parametrize("name, kind", CASES)
def test_stride_sampler_integrates_the_heads_policy(comfy_host, tiny, name, kind):
    """One pi-Flow step through ComfyUI's sample_custom: the preview x0 is the head's policy's x0 and the
    sample is that policy rolled out over the substep grid (then ComfyUI's latent_format.process_out), in
    the DX mode the adapter's metadata names."""
    import comfy.sample

    model, conditioning = tiny[name]
    patched = load_adapter(comfy_host, model, adapter_file(name, kind))
    piflow_nodes = sys.modules[loader_module(comfy_host).PolicyOutput.__module__]
    substeps = 8
    sampler = piflow_nodes.piflow_ksampler(substeps, 1.0, 0.0, piflow.DEFAULT_SHIFT)
    noise = latent_batch(name)
    previews: list[torch.Tensor] = []
    head_module = loader_module(comfy_host).model_family(model).head_module
    recorder = HeadInputs(patched.object_patches[f"diffusion_model.{head_module}"])
    try:
        samples = comfy.sample.sample_custom(patched, noise, 1.0, sampler, torch.tensor([1.0, 0.0]), conditioning, [],
                                             torch.zeros_like(noise),
                                             callback=lambda i, x0, x, total: previews.append(x0),
                                             disable_pbar=True, seed=SEED)
    finally:
        recorder.remove()
    assert len(recorder.calls) == 1 and len(previews) == 1
    tensors = direct_policy(ADAPTERS[adapter_file(name, kind)][0], name, kind, *recorder.calls[0], noise.shape)
    policy = build_policy(name, kind, tensors, noise, 1.0)
    torch.testing.assert_close(previews[0], policy.denoised, atol=1e-5, rtol=1e-5)
    grid = piflow.substep_sigmas(1.0, 0.0, substeps, piflow.DEFAULT_SHIFT)
    want = patched.model.process_latent_out(piflow.rollout(policy, noise, grid))
    print(f"{name} {kind}: 1-step sample vs direct rollout of the head's policy: max |diff| = "
          f"{float((samples - want).abs().max()):.1e} (rms {float(want.pow(2).mean().sqrt()):.2f})")
    torch.testing.assert_close(samples, want, atol=1e-4, rtol=1e-4)
    if kind in DX_MODE:  # the same head output read in the other DX mode is another sample
        other = build_policy(name, DX_POLYNOMIAL if kind == DX else DX, tensors, noise, 1.0)
        assert (patched.model.process_latent_out(piflow.rollout(other, noise, grid)) - samples).abs().max() > 1e-2


def test_flux2_inpaints_and_cools_on_its_unfolded_latent(comfy_host, tiny):
    """Two FLUX.2 steps with "auto" temperature (0.1 on the first) and a noise mask at the resolution of
    ComfyUI's 128-channel latent: the kept region ends exactly at the original, and the sample is the head's
    policies rolled out on the unfolded 32-channel latent (mask covering whole 2x2 patches), folded back."""
    import comfy.sample

    model, conditioning = tiny["FLUX.2"]
    patched = load_adapter(comfy_host, model, adapter_file("FLUX.2", GM))
    piflow_nodes = sys.modules[loader_module(comfy_host).PolicyOutput.__module__]
    substeps = 8
    sampler = piflow_nodes.piflow_ksampler(substeps, "auto", 0.0, piflow.DEFAULT_SHIFT)
    noise = latent_batch("FLUX.2")
    original = torch.randn(noise.shape, generator=torch.Generator().manual_seed(SEED + 1))
    mask = torch.zeros(1, *noise.shape[-2:])
    mask[..., : noise.shape[-1] // 2] = 1  # regenerate the left half
    sigmas = piflow.piflow_sigmas(2).float()
    recorder = HeadInputs(patched.object_patches["diffusion_model.final_layer"])
    try:
        samples = comfy.sample.sample_custom(patched, noise, 1.0, sampler, sigmas, conditioning, [], original,
                                             noise_mask=mask, disable_pbar=True, seed=SEED)
    finally:
        recorder.remove()
    assert len(recorder.calls) == 2

    def direct(first_temperature: float) -> torch.Tensor:
        state = ADAPTERS[adapter_file("FLUX.2", GM)][0]
        unfolded_mask = mask.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[:, None]
        inpainting = piflow.Inpainting(F.pixel_shuffle(original, 2), unfolded_mask)
        x = F.pixel_shuffle(noise, 2)  # at sigma 1 ComfyUI's noise scaling starts from the noise itself
        for i, (call, temperature) in enumerate(zip(recorder.calls, (first_temperature, 1.0), strict=True)):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            tensors = direct_policy(state, "FLUX.2", GM, *call, noise.shape)
            policy = piflow.GMPolicy.from_velocity(*tensors, x, torch.full((x.shape[0],), sigma))
            grid = piflow.substep_sigmas(sigma, sigma_next, substeps, piflow.DEFAULT_SHIFT)
            x = piflow.rollout(policy.with_temperature(temperature), x, grid, inpainting)
        return F.pixel_unshuffle(x, 2)

    want = direct(piflow.resolve_temperature("auto", 2))
    kept = (mask == 0).expand_as(samples)
    kept_error = float((samples - original)[kept].abs().max())
    error = float((samples - want).abs().max())
    print(f"FLUX.2 inpainting, 2 steps, auto temperature: kept region max|out - original| = {kept_error:.1e}; "
          f"max|out - direct rollout on the unfolded latent| = {error:.1e}")
    assert kept_error < 1e-5
    torch.testing.assert_close(samples, want, atol=1e-4, rtol=1e-4)
    assert (samples - original)[~kept].abs().max() > 0.1
    assert (direct(1.0) - want).abs().max() > 1e-3, "the temperature changes the sample"


class WarningRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def sample_graph(name: str, adapter: str, base: dict | None = None) -> dict:
    latent = ({"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}
              if name == "FLUX.2" else
              {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}})
    return {
        "base": base or {"class_type": "TestTinyPiFlowBase", "inputs": {"family": name}},
        "prompt": {"class_type": "TestTinyPiFlowBase", "inputs": {"family": name}},
        "adapter": {"class_type": "StridePiFlowAdapterLoader", "inputs": {
            "model": ["base", 0], "adapter_name": adapter, "strength": 1.0}},
        "latent": latent,
        "run": {"class_type": "StridePiFlowSample", "inputs": {
            "model": ["adapter", 0], "positive": ["prompt", 1], "latent_image": ["latent", 0], "steps": 4,
            "substeps": 128, "diffusion_coefficient": 0.0, "shift": 3.2, "final_step_size_scale": 0.5,
            "temperature": "auto", "manual_temperature": 1.0, "seed": SEED, "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "piflow_loader"}},
    }


@pytest.mark.parametrize("name, kind", [("FLUX.1", GM), ("FLUX.2", GM), ("Qwen-Image", DX)])
def test_graph_samples_with_every_family(comfy_host, tiny, name, kind):
    recorder = WarningRecorder()
    logging.getLogger().addHandler(recorder)
    try:
        result = comfy_host.run(sample_graph(name, adapter_file(name, kind)))
    finally:
        logging.getLogger().removeHandler(recorder)
    assert result.success, result.error()
    samples = load_file(str(comfy_host.output_path(result.outputs["save"]["latents"][0])))["latent_tensor"]
    assert samples.shape == (2, *MODELS[name][3]) and torch.isfinite(samples).all()
    assert [value for value, total in result.progress if total == 4][-1] == 4
    assert not [m for m in recorder.messages if "lora" in m.lower() or "not loaded" in m.lower()], recorder.messages


# ------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_family, model_family, message", [
    ("Qwen-Image", "FLUX.1", r"is a pi-Qwen-Image adapter, but the model is FLUX.1\. Load it onto a Qwen-Image model"),
    ("FLUX.1", "Qwen-Image", r"is a pi-FLUX.1 adapter, but the model is Qwen-Image.*pi-Qwen-Image adapter \(Lakonik"),
    ("FLUX.2", "FLUX.1", r"is a pi-FLUX.2 adapter, but the model is FLUX.1"),
    ("FLUX.1", "FLUX.2", r"is a pi-FLUX.1 adapter, but the model is FLUX.2.*gmflux2_k8_piid_4step"),
])
def test_adapter_of_another_family_is_refused_by_name(comfy_host, tiny, adapter_family, model_family, message):
    file_name = adapter_file(adapter_family, GM)
    with pytest.raises(Exception, match=message) as error:
        load_adapter(comfy_host, tiny[model_family][0], file_name)
    assert type(error.value).__name__ == "StrideError" and f"'{file_name}'" in str(error.value)


def test_second_adapter_and_other_models_are_refused(comfy_host, tiny):
    patched = load_adapter(comfy_host, tiny["Qwen-Image"][0], adapter_file("Qwen-Image", GM))
    with pytest.raises(Exception, match="already has a pi-Flow adapter"):
        load_adapter(comfy_host, patched, adapter_file("Qwen-Image", DX))
    result = comfy_host.run(sample_graph("FLUX.1", adapter_file("FLUX.1", GM),
                                         {"class_type": "StridePiFlowReferenceModel", "inputs": {}}))
    assert not result.success
    message = result.error()["exception_message"]
    assert "a FLUX.1 model, a FLUX.2 model or a Qwen-Image model" in message and "model:" in message, message


def run_error(comfy_host, graph: dict) -> str:
    result = comfy_host.run(graph)
    assert not result.success
    return result.error()["exception_message"]


@pytest.mark.parametrize("adapter", PICKLES)
def test_pickle_files_are_refused_before_unpickling(comfy_host, tiny, monkeypatch, adapter):
    calls = []
    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    message = run_error(comfy_host, sample_graph("FLUX.1", adapter))
    assert not calls, f"unpickling was attempted: {calls}"
    assert "adapter_name" in message and ("safetensors" in message or "pickle" in message), message


@pytest.mark.parametrize("adapter, expected", [
    (PLAIN_LORA, "not a pi-Flow adapter"),
    (WIDE_ADAPTER, f"'{WIDE_ADAPTER}'.*another model"),
])
def test_wrong_adapter_files_are_refused_by_name(comfy_host, tiny, adapter, expected):
    message = run_error(comfy_host, sample_graph("FLUX.1", adapter))
    assert re.search(expected, message), message
