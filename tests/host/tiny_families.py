"""Tiny models of ComfyUI's own classes for every few-step family's architecture (random weights).

Each is built from the host's ``comfy.supported_models`` config class with a tiny ``unet_config``, so the
MODEL carries the class ComfyUI's model detection would choose (architecture detection reads it), its
BaseModel, its default model sampling and its latent format (Qwen-Image and Wan: 5-D latents). The sizes
are not the released ones, so detection by size (Wan 14B, SD3.5 Large) does not apply to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import comfy_host as harness

FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 16, "context_in_dim": 32,
        "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True}


@dataclass(frozen=True)
class Tiny:
    """How to build one tiny model: ComfyUI's config class, its unet_config, the text-encoder output it takes
    (tokens x width, pooled width) and the core node that makes its empty latent."""

    config_class: str
    unet_config: dict
    context: tuple[int, int]
    pooled: int | None = None
    latent: tuple[str, dict] = ("EmptySD3LatentImage", {})
    flux: bool = False
    weight_scale: float = 0.1


TINY = {
    "SDXL": Tiny("SDXL", {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                          "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
                          "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1],
                          "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
                          "context_dim": 32, "transformer_depth_output": [0, 0, 1, 1],
                          "use_temporal_attention": False, "use_temporal_resblock": False},
                 (77, 32), pooled=1280, latent=("EmptyLatentImage", {}), weight_scale=0.02),
    "FLUX.1 schnell": Tiny("FluxSchnell", {**FLUX, "guidance_embed": False}, (6, 32), pooled=16, flux=True),
    "FLUX.1 dev": Tiny("Flux", {**FLUX, "guidance_embed": True}, (6, 32), pooled=16, flux=True),
    "Qwen-Image": Tiny("QwenImage", {"image_model": "qwen_image", "num_layers": 2, "attention_head_dim": 32,
                                     "num_attention_heads": 2, "joint_attention_dim": 32,
                                     "axes_dims_rope": (8, 12, 12)}, (6, 32)),
    # Z-Image's modulation is 256 wide, so its width is at least 256
    "Z-Image": Tiny("ZImage", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256,
                               "cap_feat_dim": 32, "n_layers": 1, "qk_norm": True, "n_heads": 8, "n_kv_heads": 8,
                               "axes_dims": [8, 12, 12], "axes_lens": [64, 32, 32], "rope_theta": 256.0,
                               "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0},
                    (6, 32)),
    "Wan T2V": Tiny("WAN21_T2V", {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2),
                                  "text_len": 16, "in_dim": 16, "dim": 32, "ffn_dim": 64, "freq_dim": 32,
                                  "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2,
                                  "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6},
                    (6, 32), latent=("EmptyHunyuanLatentVideo", {"length": 9})),
}


def tiny_model(name: str, seed: int = 0) -> tuple[Any, list]:
    """A MODEL of ComfyUI's own classes (random weights, float32) and a matching CONDITIONING."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    spec = TINY[name]
    unet_config = harness.flux_unet_config(spec.unet_config) if spec.flux else dict(spec.unet_config)
    config = getattr(comfy.supported_models, spec.config_class)(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in base.diffusion_model.parameters():
            parameter.copy_(spec.weight_scale * torch.randn(parameter.shape, generator=generator))
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    extras = {} if spec.pooled is None else {"pooled_output": torch.randn((1, spec.pooled), generator=generator)}
    return model, [[torch.randn((1, *spec.context), generator=generator), extras]]


def empty_latent(name: str, batch: int = 2) -> dict:
    """The API node that makes this model's empty latent (64 x 64 pixels)."""
    kind, extra = TINY[name].latent
    return {"class_type": kind, "inputs": {"width": 64, "height": 64, "batch_size": batch, **extra}}
