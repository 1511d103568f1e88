"""Renaming a Stride LoRA for diffusers: row slices of fused weights, swapped halves, alpha, refusals."""
from __future__ import annotations

import pytest
import torch

from distill_core.training.lora_formats import KOHYA, PEFT, Part, convert_lora


def stride_state(rank: int = 2, rows: int = 6, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"diffusion_model.block.qkv.lora_up.weight": torch.randn(rows, rank, generator=generator),
            "diffusion_model.block.qkv.lora_down.weight": torch.randn(rank, 5, generator=generator),
            "diffusion_model.block.qkv.alpha": torch.tensor(alpha)}


def update(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * up @ down


def test_peft_parts_are_the_rows_of_the_fused_update_with_alpha_folded_in():
    state = stride_state(alpha=1.0)
    up, down = state["diffusion_model.block.qkv.lora_up.weight"], state["diffusion_model.block.qkv.lora_down.weight"]
    full = update(up, down, 0.5)
    parts = {"block.qkv": [Part("attn.to_q", (0, 2)), Part("attn.to_k", (2, 2)), Part("attn.to_v", (4, 2))]}
    converted = convert_lora(state, parts, PEFT)
    assert sorted(converted) == sorted(f"transformer.attn.to_{x}.lora_{ab}.weight" for x in "qkv" for ab in "AB")
    for index, name in enumerate("qkv"):
        a = converted[f"transformer.attn.to_{name}.lora_A.weight"]
        b = converted[f"transformer.attn.to_{name}.lora_B.weight"]
        assert torch.allclose(b @ a, full[2 * index:2 * index + 2], atol=1e-6, rtol=0)


def test_swapped_halves_and_kohya_keys():
    state = stride_state(rows=4, alpha=2.0)
    up, down = state["diffusion_model.block.qkv.lora_up.weight"], state["diffusion_model.block.qkv.lora_down.weight"]
    swapped = convert_lora(state, {"block.qkv": [Part("norm_out.linear", swap_halves=True)]}, PEFT)
    assert torch.equal(swapped["transformer.norm_out.linear.lora_B.weight"], torch.cat([up[2:], up[:2]]))
    kohya = convert_lora(state, {"block.qkv": [Part("mid_block.attentions.0.proj_in")]}, KOHYA)
    assert kohya == {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": down,
                     "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": up,
                     "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0)}
    sdxl = convert_lora(state, {"block.qkv": [Part("add_embedding.linear_1")]}, KOHYA)
    assert "lora_unet_block_qkv.alpha" in sdxl, "SDXL's added-conditioning MLP keeps the host's name"


def test_refusals_name_the_problem():
    state = stride_state()
    with pytest.raises(ValueError, match=r"no diffusers name.*block\.qkv"):
        convert_lora(state, {}, PEFT)
    with pytest.raises(ValueError, match="kohya format cannot split"):
        convert_lora(state, {"block.qkv": [Part("a", (0, 3)), Part("b", (3, 3))]}, KOHYA)
    with pytest.raises(ValueError, match="format must be"):
        convert_lora(state, {"block.qkv": [Part("a")]}, "comfy")
