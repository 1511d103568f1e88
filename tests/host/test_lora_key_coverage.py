"""A Stride distillation LoRA on full-size SD1.5, SDXL and FLUX.1 maps onto ComfyUI's LoraLoader with
zero unmatched keys. The networks are built on torch's ``meta`` device: full architectures, no memory."""
import pytest
import torch

import comfy_host as host
from distill_core.training.lora import attach_lora, lora_state_dict_keys

SD15 = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
        "use_temporal_resblock": False}
SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
        "use_temporal_resblock": False}
FLUX1_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
             "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
             "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}


def meta_model(unet_config: dict):
    """ComfyUI's own BaseModel subclass for this config (model detection's choice), on the meta device."""
    import comfy.model_detection

    if unet_config.get("image_model") == "flux":
        unet_config = host.flux_unet_config(unet_config)
    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    assert config is not None, "ComfyUI does not recognise the config"
    return config.get_model({}, device="meta")


@pytest.mark.parametrize("name, unet_config, family", [
    ("SD1.5", SD15, "BaseModel"), ("SDXL", SDXL, "SDXL"), ("FLUX.1-dev", FLUX1_DEV, "Flux"),
])
def test_every_lora_key_maps_onto_the_full_size_model(comfy_host, name, unet_config, family):
    import comfy.lora

    model = meta_model(unet_config)
    assert type(model).__name__ == family
    adapters = attach_lora(model.diffusion_model, rank=64, skip_small_layers=True)
    try:
        keys = lora_state_dict_keys(adapters)
    finally:
        adapters.remove()
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in keys}
    unmatched = sorted(module for module in modules if module not in key_map)
    assert len(modules) > 100, f"{name}: only {len(modules)} LoRA modules"
    assert unmatched == [], \
        f"{name}: {len(unmatched)} LoRA modules ComfyUI's LoraLoader would not load, e.g. {unmatched[:3]}"
    weights = dict(model.state_dict())
    for module in modules:
        assert key_map[module] in weights, module


def test_meta_models_hold_no_memory(comfy_host):
    model = meta_model(SDXL)
    assert all(p.device == torch.device("meta") for p in model.diffusion_model.parameters())
