"""LoRA files in the key formats diffusers loads: kohya ``lora_unet_*`` and diffusers' own peft form.

Stride trains on the host's modules and saves ``diffusion_model.<module>.lora_up/lora_down.weight`` + ``.alpha``
(:func:`~distill_core.training.lora.lora_state_dict`), which ComfyUI loads but diffusers does not convert. This
module renames such a LoRA onto diffusers' module names, given a :data:`ModuleMap` from each host module to the
diffusers module(s) holding its weight (the host derives it from its own weight conversion tables). A host module
whose weight diffusers splits (FLUX's fused ``qkv``: ``to_q``, ``to_k``, ``to_v``) becomes one LoRA per part with the
same ``down`` and the part's rows of ``up``: ``up[rows] @ down`` is exactly those rows of the update. Halves that
diffusers stores the other way round (FLUX's final ``norm_out``: scale, shift) swap the halves of ``up``.

Which format, read from diffusers' loaders (``loaders/lora_pipeline.py`` and ``loaders/lora_conversion_utils.py``,
diffusers 0.42.1):

* UNets (SD1.5, SDXL): kohya, ``lora_unet_<diffusers module, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (what diffusers' ``convert_state_dict_to_kohya`` writes). ``StableDiffusion(XL)LoraLoaderMixin``
  converts it with ``_convert_non_diffusers_lora_to_diffusers`` and ComfyUI's LoraLoader maps the same names for
  UNets; diffusers' peft form would not do for ComfyUI, whose map knows attention LoRAs of a UNet only under the old
  ``.processor.to_q`` names. One exception: ``_convert_unet_lora_key`` strips the last index from every name holding
  "emb" unless it is sgm's ``label_emb.0.{0,2}`` (kohya's own SDXL name), which it maps to
  ``add_embedding.linear_{1,2}``; SDXL's added-conditioning MLP is therefore written under the host's (sgm) name,
  which ComfyUI maps as well.
* FLUX: diffusers' peft form, ``transformer.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` with
  ``alpha / rank`` folded into ``lora_B`` (so no alpha is needed). ``FluxLoraLoaderMixin`` loads it as it is, and
  ComfyUI maps ``transformer.<diffusers module>`` for FLUX; diffusers' kohya converter for FLUX hard-codes the
  full model's 19/38 blocks and 3072 width.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

KOHYA, PEFT = "kohya", "peft"
KOHYA_HOST_NAMED = ("add_embedding.",)
"""diffusers modules whose kohya key must carry the host's (sgm) module name; see the module docstring."""


@dataclass(frozen=True)
class Part:
    """Where (part of) a host module's weight lives in diffusers: ``module``, rows ``[start, start + size)`` of the
    host weight (``None``: all of them), and whether diffusers stores the two halves of those rows swapped."""

    module: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


ModuleMap = Mapping[str, Sequence[Part]]
"""Host module name (as in Stride's LoRA keys, without prefix) -> the diffusers parts of its weight."""


def _halves_swapped(up: Tensor) -> Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def convert_lora(state: Mapping[str, Tensor], modules: ModuleMap, form: str, prefix: str = "diffusion_model.",
                 diffusers_prefix: str = "transformer.") -> dict[str, Tensor]:
    """``state`` (Stride's ``<prefix><module>.lora_up/lora_down.weight`` + ``.alpha``) in ``form`` (:data:`KOHYA` or
    :data:`PEFT`) on diffusers' names. Raises ``ValueError`` naming host modules the map does not cover, or kohya
    parts that would need splitting (kohya has no row slices)."""
    if form not in (KOHYA, PEFT):
        raise ValueError(f"LoRA format must be {KOHYA!r} or {PEFT!r}, got {form!r}")
    names = sorted({key[len(prefix):].rsplit(".", 2)[0] for key in state if key.endswith(".lora_down.weight")})
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"{len(missing)} LoRA module(s) have no diffusers name, e.g. {missing[:3]}")
    converted: dict[str, Tensor] = {}
    for name in names:
        down = state[f"{prefix}{name}.lora_down.weight"]
        up = state[f"{prefix}{name}.lora_up.weight"]
        alpha = state[f"{prefix}{name}.alpha"]
        for part in modules[name]:
            part_up = up if part.rows is None else up[part.rows[0]:part.rows[0] + part.rows[1]]
            if part.swap_halves:
                part_up = _halves_swapped(part_up)
            if form == KOHYA:
                if part.rows is not None or part.swap_halves:
                    raise ValueError(f"{name}: the kohya format cannot split or reorder a weight ({part.module})")
                kohya_name = name if part.module.startswith(KOHYA_HOST_NAMED) else part.module
                key = "lora_unet_" + kohya_name.replace(".", "_")
                converted.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": part_up,
                                  f"{key}.alpha": alpha})
            else:
                scale = float(alpha) / down.shape[0]
                key = diffusers_prefix + part.module
                converted.update({f"{key}.lora_A.weight": down.contiguous(),
                                  f"{key}.lora_B.weight": (part_up * scale).contiguous()})
    return converted
