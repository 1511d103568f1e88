"""Fixtures of the LoRA / distillation tests: ComfyUI as a host, a tiny UNet.

Only tests import ComfyUI; ``distill_core`` never does.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

COMFYUI_PATH = (os.environ.get("COMFYUI_PATH")
                or os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "ComfyUI"))


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI 0.3.75 from the project cache, on CPU (imported by these tests only)."""
    if not os.path.isdir(COMFYUI_PATH):
        pytest.skip(f"ComfyUI is not provisioned at {COMFYUI_PATH}")
    if os.path.abspath(COMFYUI_PATH) not in sys.path:
        sys.path.append(os.path.abspath(COMFYUI_PATH))  # last: the project's own `tests`/`nodes` stay first
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_patcher
    import comfy.ops
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


def tiny_comfy_sd15(comfy):
    """ComfyUI's own BaseModel + UNetModel at a tiny SD1.5-style size, built as the host would."""
    unet_config = {
        "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 0,
        "context_dim": 32, "num_heads": 2, "num_head_channels": -1, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "use_spatial_transformer": True, "legacy": False,
        "image_size": 8, "use_checkpoint": False, "dtype": torch.float32,
    }
    torch.manual_seed(0)
    with torch.inference_mode():
        model_config = comfy.supported_models.SD15(unet_config)
        model_config.unet_config["num_heads"] = 2
        model = model_config.get_model({})
        for param in model.diffusion_model.parameters():  # non-trivial weights everywhere
            param.copy_(torch.randn_like(param) * 0.05)
    return model
