"""LoRAs diffusers loads: Stride's LoRA renamed for diffusers (kohya keys for SD1.5/SDXL UNets, peft keys for FLUX.1),
read by diffusers' own loaders and by ComfyUI's LoraLoader.

* Full-size SD1.5, SDXL and FLUX.1-dev on the meta device (no memory): diffusers' ``lora_state_dict`` +
  ``load_lora_into_unet`` / ``load_lora_into_transformer`` (what ``load_lora_weights`` runs) inject an adapter into
  every diffusers module the file names, with no unexpected key, and ComfyUI's LoraLoader maps every key.
* Tiny configs with random weights, the same weights in both libraries (moved with ComfyUI's own diffusers
  conversion tables): the diffusers model with the file loaded equals ComfyUI's model with the same file loaded, and
  equals the LoRA as Stride trains it (hooks on ComfyUI's model), on the same inputs.
"""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

import comfy_host as host
from distill_core.training.lora import attach_lora, lora_state_dict
from tests.host.test_lora_key_coverage import FLUX1_DEV, SD15, SDXL, meta_model

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loading needs it

RANK = 4
SD15_DIFFUSERS = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                  "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                  "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8}
SDXL_DIFFUSERS = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
                  "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
                  "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                  "projection_class_embeddings_input_dim": 2816}
FLUX1_DEV_DIFFUSERS = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                       "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                       "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
FULL_SIZE = {"SD1.5": (SD15, SD15_DIFFUSERS), "SDXL": (SDXL, SDXL_DIFFUSERS),
             "FLUX.1-dev": (FLUX1_DEV, FLUX1_DEV_DIFFUSERS)}


def lora_export(comfy_host):
    """Stride's ``nodes.lora_export`` as ComfyUI loaded it."""
    package = comfy_host.nodes.NODE_CLASS_MAPPINGS["StrideReferenceModel"].__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{package}.nodes.lora_export")


def random_stride_lora(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Stride LoRA (rank 4, alpha 2: scale 0.5) with random factors for every layer Stride's trainer adapts."""
    adapters = attach_lora(network, RANK, alpha=2.0, skip_small_layers=True)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, adapter in adapters.adapters.items():
        for part in ("lora_up", "lora_down"):
            shape = getattr(adapter, part).weight.shape
            state[f"diffusion_model.{name}.{part}.weight"] = torch.randn(shape, generator=generator) * 0.1
        state[f"diffusion_model.{name}.alpha"] = torch.tensor(adapter.alpha)
    adapters.remove()
    return state


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def diffusers_load(model, file_state: dict[str, torch.Tensor], flux: bool, meta: bool) -> list[str]:
    """Load ``file_state`` into a diffusers model the way ``load_lora_weights`` does; returns the warnings."""
    captured = Captured()
    logger = logging.getLogger("diffusers")
    logger.addHandler(captured)
    try:
        state = dict(file_state)
        if flux:
            loaded, alphas = diffusers.FluxPipeline.lora_state_dict(state, return_alphas=True)
            diffusers.FluxPipeline.load_lora_into_transformer(loaded, network_alphas=alphas, transformer=model,
                                                               adapter_name="stride", low_cpu_mem_usage=meta)
        else:
            pipeline = diffusers.StableDiffusionXLPipeline if model.config.addition_embed_type else \
                diffusers.StableDiffusionPipeline
            loaded, alphas = pipeline.lora_state_dict(state, unet_config=model.config)
            pipeline.load_lora_into_unet(loaded, alphas, unet=model, adapter_name="stride", low_cpu_mem_usage=meta)
    finally:
        logger.removeHandler(captured)
    return captured.messages


def injected(model) -> int:
    return sum(1 for module in model.modules() if "stride" in getattr(module, "lora_A", {}))


def comfy_loads(model, file_state: dict[str, torch.Tensor], caplog) -> dict:
    """ComfyUI's LoraLoader mapping of ``file_state`` onto ``model`` (patches by weight); no key may be left."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patches = comfy.lora.load_lora(file_state, key_map)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()], "ComfyUI left keys unloaded"
    return patches


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_lora_loads_into_every_module_in_diffusers_and_comfyui(comfy_host, caplog, name):
    comfy_config, diffusers_config = FULL_SIZE[name]
    model = meta_model(comfy_config)
    stride_state = random_stride_lora(model.diffusion_model)
    modules = {key.rsplit(".", 1)[0].rsplit(".", 1)[0] for key in stride_state if key.endswith("lora_down.weight")}
    export = lora_export(comfy_host)
    file_state = export.diffusers_lora(stride_state, *export.diffusers_layout(model))
    flux = name.startswith("FLUX")
    target = diffusers.FluxTransformer2DModel if flux else diffusers.UNet2DConditionModel
    with torch.device("meta"):
        network = target(**diffusers_config)
    expected = len({key.rsplit(".", 2)[0] for key in file_state if key.endswith(("lora_A.weight", "lora_down.weight"))})
    warnings = diffusers_load(network, file_state, flux, meta=True)
    assert warnings == [], warnings
    assert injected(network) == expected >= len(modules) > 100, (name, injected(network), expected, len(modules))
    patched = {key[0] if isinstance(key, tuple) else key for key in comfy_loads(model, file_state, caplog)}
    assert patched == {f"{module}.weight" for module in modules}, "ComfyUI patches exactly the trained weights"


# -- tiny models: equal outputs --------------------------------------------------------------------------------
TINY_SD15 = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
             "channel_mult": [1, 2], "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0],
             "transformer_depth_middle": 1, "context_dim": 32, "num_heads": 8, "num_head_channels": -1,
             "use_linear_in_transformer": False, "use_spatial_transformer": True, "legacy": False,
             "adm_in_channels": None, "use_checkpoint": False, "use_temporal_attention": False,
             "use_temporal_resblock": False}
TINY_SD15_DIFFUSERS = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                       "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                       "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [32, 64],
                       "cross_attention_dim": 32, "attention_head_dim": 8}
TINY_SDXL = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
             "channel_mult": [1, 2], "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2],
             "transformer_depth_middle": 2, "context_dim": 32, "num_head_channels": 16, "num_classes": "sequential",
             "adm_in_channels": 32 + 6 * 8, "use_linear_in_transformer": True, "use_spatial_transformer": True,
             "legacy": False, "use_checkpoint": False, "use_temporal_attention": False, "use_temporal_resblock": False}
TINY_SDXL_DIFFUSERS = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                       "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                       "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [32, 64],
                       "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4], "cross_attention_dim": 32,
                       "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                       "projection_class_embeddings_input_dim": 32 + 6 * 8}
TINY_FLUX = {"image_model": "flux", "in_channels": 4, "out_channels": 4, "vec_in_dim": 32, "context_in_dim": 32,
             "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
             "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
TINY_FLUX_DIFFUSERS = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                       "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                       "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}
OUTPUT_TOLERANCE = 1e-4  # relative to the output's scale: float32 attention kernels differ between the libraries


def comfy_twin(comfy_config: dict, diffusers_model, flux: bool):
    """ComfyUI's BaseModel for ``comfy_config`` holding ``diffusers_model``'s weights (ComfyUI's conversion tables)."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    if flux:
        config = comfy.supported_models.Flux(host.flux_unet_config(comfy_config))
        table = comfy.utils.flux_to_diffusers(comfy_config, output_prefix="")
    else:
        kind = comfy.supported_models.SDXL if comfy_config.get("adm_in_channels") else comfy.supported_models.SD15
        config = kind(dict(comfy_config))
        config.unet_config.update(comfy_config)  # the tiny head layout, not the family's default
        table = comfy.utils.unet_to_diffusers(comfy_config)
    model = config.get_model({}, device=torch.device("cpu"))
    source = diffusers_model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for diffusers_key, target in table.items():
        if diffusers_key not in source:
            continue
        value = source[diffusers_key]
        if isinstance(target, str):
            state[target] = value
        elif target[1] is None:
            state[target[0]] = target[2](value)
        else:
            key, (_, offset, size) = target
            fused = state.setdefault(key, torch.zeros(model.diffusion_model.state_dict()[key].shape))
            fused[offset:offset + size] = value
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def random_diffusers(kind, config: dict):
    torch.manual_seed(0)
    model = kind(**config).eval()
    with torch.no_grad():
        for param in model.parameters():  # non-trivial everywhere (diffusers zero-inits some outputs)
            param.copy_(torch.randn_like(param) * (0.3 / max(1, param[0].numel()) ** 0.5 if param.ndim > 1 else 0.1))
    return model


def unet_pair_outputs(comfy_network, diffusers_model, sdxl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([999.0, 311.0])
    context = torch.randn(2, 7, 32, generator=generator)
    extra, added = {}, {}
    if sdxl:
        pooled = torch.randn(2, 32, generator=generator)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        time_embeds = diffusers_model.add_time_proj(time_ids.flatten()).reshape(2, -1)
        extra = {"y": torch.cat([pooled, time_embeds], dim=1)}
    with torch.no_grad():
        ours = comfy_network(x, timesteps=t, context=context, **extra)
        theirs = diffusers_model(x, t, encoder_hidden_states=context,
                                 added_cond_kwargs=added or None).sample
    return ours, theirs


def flux_pair_outputs(comfy_network, diffusers_model) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    img = torch.randn(2, 16, 16, generator=generator)  # 4 x 4 patches of a 4-channel 8x8 latent
    txt = torch.randn(2, 5, 32, generator=generator)
    pooled = torch.randn(2, 32, generator=generator)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=1)
    txt_ids = torch.zeros(5, 3)
    t, guidance = torch.tensor([0.9, 0.3]), torch.tensor([3.5, 3.5])
    with torch.no_grad():
        ours = comfy_network.forward_orig(img, img_ids[None].expand(2, -1, -1), txt, txt_ids[None].expand(2, -1, -1),
                                          t, pooled, guidance)
        theirs = diffusers_model(img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                                 img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
    return ours, theirs


TINY = {"SD1.5": (TINY_SD15, TINY_SD15_DIFFUSERS), "SDXL": (TINY_SDXL, TINY_SDXL_DIFFUSERS),
        "FLUX.1": (TINY_FLUX, TINY_FLUX_DIFFUSERS)}


@pytest.mark.parametrize("name", list(TINY))
def test_diffusers_with_the_file_equals_comfyui_with_the_file(comfy_host, caplog, name):
    import comfy.model_management
    import comfy.sd

    comfy_config, diffusers_config = TINY[name]
    flux = name.startswith("FLUX")
    kind = diffusers.FluxTransformer2DModel if flux else diffusers.UNet2DConditionModel
    theirs = random_diffusers(kind, diffusers_config)
    patcher = comfy_twin(comfy_config, theirs, flux)

    def outputs(comfy_network):
        return flux_pair_outputs(comfy_network, theirs) if flux else \
            unet_pair_outputs(comfy_network, theirs, sdxl=name == "SDXL")

    def close(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    base_ours, base_theirs = outputs(patcher.model.diffusion_model)
    assert close(base_ours, base_theirs) < OUTPUT_TOLERANCE, "the two libraries hold the same network"

    stride_state = random_stride_lora(patcher.model.diffusion_model)
    export = lora_export(comfy_host)
    file_state = export.diffusers_lora(stride_state, *export.diffusers_layout(patcher.model))
    assert diffusers_load(theirs, file_state, flux, meta=False) == []
    comfy_loads(patcher.model, file_state, caplog)
    adapted, _ = comfy.sd.load_lora_for_models(patcher, None, file_state, 1.0, 0)
    comfy.model_management.load_models_gpu([adapted], force_full_load=True)
    adapted_ours, adapted_theirs = outputs(adapted.model.diffusion_model)
    assert close(adapted_theirs, base_theirs) > 1e-2, "the LoRA changes the output"
    assert close(adapted_ours, adapted_theirs) < OUTPUT_TOLERANCE, "diffusers and ComfyUI apply the same LoRA"
    comfy.model_management.unload_all_models()

    # ... and both equal the LoRA as Stride trains it: hooks on ComfyUI's own (unpatched) network
    from distill_core.training.lora import load_lora_state_dict

    hooked = attach_lora(patcher.model.diffusion_model, RANK, alpha=2.0, skip_small_layers=True)
    load_lora_state_dict(hooked, stride_state)
    trained_ours, _ = outputs(patcher.model.diffusion_model)
    hooked.remove()
    assert close(trained_ours, adapted_theirs) < OUTPUT_TOLERANCE, "the file reproduces the trained LoRA in diffusers"
    assert lora_state_dict(hooked).keys() == stride_state.keys()
