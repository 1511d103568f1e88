"""Network factory for headless distillation of a teacher exported by the Stride Distill LoRA node.

``distill_core.training.cli`` loads this file by the path in the exported ``config.json``
(``nodes/headless_teacher.py:comfy_teacher``, run from the Stride folder with the ComfyUI checkout on
``PYTHONPATH``; the node's report gives the whole command). It is loaded on its own, not as part of the
``nodes`` package, so it imports ``distill_core`` absolutely and ComfyUI only inside functions. It rebuilds the
ComfyUI model from ``teacher.safetensors`` (float32, on ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU), so
the headless loop calls the very ``apply_model`` the graph did.
"""
from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import torch

from distill_core.safe_files import read_safetensors
from distill_core.spaces import NoiseSpace
from distill_core.training.cli import TEACHER_FORMAT, HeadlessNetwork, load_training_data
from distill_core.training.config import DistillConfig


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _tell_comfy_the_device(device: torch.device) -> None:
    """Set ComfyUI's device before its model modules load (ComfyUI picks it when model_management is imported)."""
    import comfy.options  # noqa: F401  (must precede cli_args)
    from comfy.cli_args import args

    args.cpu = device.type == "cpu"


def comfy_teacher(options: dict[str, Any], config: DistillConfig) -> HeadlessNetwork:
    """The exported teacher as a ComfyUI model, its noise space and the exported training data."""
    state, metadata = read_safetensors(options["teacher"])
    if metadata.get("format") != TEACHER_FORMAT:
        raise ValueError(f"{options['teacher']} is not a teacher exported by Stride Distill LoRA")
    device = _device()
    _tell_comfy_the_device(device)
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models
    import comfy.supported_models_base

    class UnlistedConfig(comfy.supported_models_base.BASE):
        """A UNet config ComfyUI does not list (e.g. Stride's demo model): SD1.5 latents, default schedule."""

        unet_extra_config: ClassVar[dict[str, Any]] = {}
        latent_format = comfy.latent_formats.SD15
        supported_inference_dtypes: ClassVar[list[torch.dtype]] = [torch.float32]

    config_class = getattr(comfy.supported_models, metadata["config_class"], None) if metadata["config_class"] else None
    model_class = getattr(comfy.model_base, metadata["model_class"])
    model_config = (config_class or UnlistedConfig)(json.loads(metadata["unet_config"]))
    model = model_class(model_config, model_type=comfy.model_base.ModelType[metadata["model_type"]], device=device)
    model.diffusion_model.load_state_dict(state)
    model.diffusion_model.to(device=device, dtype=torch.float32)
    model.model_sampling.to(device)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return model.apply_model(x, sigma, **cond)

    space = NoiseSpace.from_sigma_table("ve", model.model_sampling.sigmas)
    return HeadlessNetwork(denoiser, model.diffusion_model, space, load_training_data(options["data"], device))
