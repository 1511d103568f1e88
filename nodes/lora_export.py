"""Stride LoRAs in diffusers' key formats: ComfyUI's own weight tables give each module's diffusers name.

ComfyUI converts diffusers checkpoints with tables from diffusers keys to its own (``comfy.utils.unet_to_diffusers``
for UNets, ``comfy.utils.flux_to_diffusers`` for FLUX.1, read through :func:`.compat.flux1_diffusers_names`), with
row slices for its fused weights and a scale/shift swap for FLUX's final modulation. Read backwards, they name the
diffusers module(s) of every ComfyUI module that can carry a LoRA; :mod:`distill_core.training.lora_formats`
renames the LoRA with them.
"""
from __future__ import annotations

from typing import Any

import comfy.utils

from ..distill_core.training.lora_formats import KOHYA, PEFT, ModuleMap, Part, convert_lora
from .compat import StrideError, flux1_diffusers_names

WEIGHT = ".weight"
PREFERRED_ALIASES = ("add_embedding.",)
"""ComfyUI names SDXL's ``label_emb`` both ``class_embedding`` and ``add_embedding``; diffusers' SDXL UNet has the
latter."""


def diffusers_layout(model: Any) -> tuple[ModuleMap, str]:
    """``(module map, form)`` of a ComfyUI ``BaseModel``: kohya for SD1.5/SDXL-style UNets, peft for FLUX."""
    unet_config = model.model_config.unet_config
    flux1 = flux1_diffusers_names(model)
    if flux1 is not None:
        table, form = flux1, PEFT
    elif "num_res_blocks" in unet_config:
        table, form = comfy.utils.unet_to_diffusers(unet_config), KOHYA
    else:
        raise StrideError(f"format: saving for diffusers is supported for SD1.5/SDXL UNets and FLUX.1, not for "
                          f"{type(model).__name__}; save in the ComfyUI format")
    parts: dict[str, list[Part]] = {}
    for diffusers_key, target in table.items():
        if not diffusers_key.endswith(WEIGHT):
            continue
        module = diffusers_key[: -len(WEIGHT)]
        if isinstance(target, str):
            source, part = target, Part(module)
        elif len(target) == 2:  # (key, (dim, offset, size)): rows of a fused weight
            source, (dim, offset, size) = target[0], target[1]
            if dim != 0:
                raise StrideError(f"format: ComfyUI splits {source} along dimension {dim}; cannot save it for "
                                  "diffusers")
            part = Part(module, (offset, size))
        elif target[2] is comfy.utils.swap_scale_shift:  # (key, None, swap_scale_shift)
            source, part = target[0], Part(module, swap_halves=True)
        else:
            raise StrideError(f"format: ComfyUI converts {target[0]} with {target[2]}; cannot save it for diffusers")
        if source.endswith(WEIGHT):
            parts.setdefault(source[: -len(WEIGHT)], []).append(part)
    for module, found in parts.items():
        whole = [part for part in found if part.rows is None and not part.swap_halves]
        if len(whole) > 1:  # aliases of one weight, not parts of it: keep the one diffusers' model has
            parts[module] = [next((part for part in whole if part.module.startswith(PREFERRED_ALIASES)), whole[0])]
        else:
            found.sort(key=lambda part: part.rows or (0, 0))
    return parts, form


def diffusers_lora(state: dict, modules: ModuleMap, form: str) -> dict:
    """Stride's LoRA state dict (``diffusion_model.*`` keys) renamed for diffusers' loaders with a model's
    :func:`diffusers_layout`."""
    try:
        return convert_lora(state, modules, form)
    except ValueError as exc:
        raise StrideError(f"format: {exc}; save in the ComfyUI format") from None
