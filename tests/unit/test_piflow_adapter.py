"""The released pi-Flow adapter layout: parsing, validation, ComfyUI Flux mapping, head unpacking."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distill_core.piflow_adapter import (
    DX_POLICY,
    GM_POLICY,
    FluxShape,
    flux_comfy_target,
    flux_head_state_dict,
    flux_lora_targets,
    parse_piflow_adapter,
    split_adapter_state_dict,
    unpack_dx_tokens,
    unpack_gm_tokens,
)

COMFYUI = Path(__file__).resolve().parents[2] / ".cache" / "ComfyUI"
SMALL = FluxShape(hidden_size=64, depth=2, depth_single_blocks=3, mlp_ratio=4.0, context_in_dim=32, vec_in_dim=16)
GM_METADATA = {"policy_config": json.dumps({"type": "GMFlow"})}
DX_METADATA = {"policy_config": json.dumps({"segment_size": 1 / 3.5, "shift": 3.2, "type": "DX"})}


def official_lora_modules(shape: FluxShape) -> dict[str, tuple[int, int]]:
    """pi-FLUX.1's LoRA targets (configs/piflux/*_32gpus.py, GM and DX alike) -> (in, out) features."""
    h, mlp = shape.hidden_size, shape.mlp_hidden
    modules = {"time_text_embed.timestep_embedder.linear_1": (256, h), "time_text_embed.timestep_embedder.linear_2": (h, h)}
    for i in range(shape.depth):
        for stream in ("ff", "ff_context"):
            modules[f"transformer_blocks.{i}.{stream}.net.0.proj"] = (h, mlp)
            modules[f"transformer_blocks.{i}.{stream}.net.2"] = (mlp, h)
    for i in range(shape.depth_single_blocks):
        modules[f"single_transformer_blocks.{i}.proj_mlp"] = (h, mlp)
        modules[f"single_transformer_blocks.{i}.proj_out"] = (h + mlp, h)
    return modules


def official_adapter(shape: FluxShape = SMALL, kind: str = GM_POLICY, components: int = 8, rank: int = 4,
                     device: str = "cpu", prefix: str = "") -> dict[str, torch.Tensor]:
    """A random adapter with the key layout of the official export (tools/export_piflow_to_diffusers.py)."""
    g = torch.Generator().manual_seed(0)

    def tensor(*size):
        if device == "meta":
            return torch.empty(size, device="meta")
        return torch.randn(size, generator=g)

    h, token_channels = shape.hidden_size, shape.latent_channels * shape.patch_size**2
    sd = {}
    for module, (fan_in, fan_out) in official_lora_modules(shape).items():
        sd[f"{module}.lora_A.weight"] = tensor(rank, fan_in)
        sd[f"{module}.lora_B.weight"] = tensor(fan_out, rank)
    sd["norm_out.linear.weight"], sd["norm_out.linear.bias"] = tensor(2 * h, h), tensor(2 * h)
    if kind == GM_POLICY:
        positions = shape.patch_size**2
        sd["proj_out_means.weight"] = tensor(components * token_channels, h)
        sd["proj_out_means.bias"] = tensor(components * token_channels)
        sd["proj_out_logweights.weight"] = tensor(components * positions, h)
        sd["proj_out_logweights.bias"] = tensor(components * positions)
        sd["proj_out_logstds.1.weight"], sd["proj_out_logstds.1.bias"] = tensor(1024, h), tensor(1024)
        sd["proj_out_logstds.3.weight"], sd["proj_out_logstds.3.bias"] = tensor(1, 1024), tensor(1)
    else:
        sd["proj_out.weight"], sd["proj_out.bias"] = tensor(components * token_channels, h), tensor(components * token_channels)
    return {prefix + key: value for key, value in sd.items()}


# -- parsing -----------------------------------------------------------------------------------
def test_parse_gm_adapter():
    sd = official_adapter()
    adapter = parse_piflow_adapter(sd, GM_METADATA)
    assert adapter.policy_type == GM_POLICY and adapter.num_components == 8 and adapter.policy_config == {}
    assert set(adapter.lora) == set(official_lora_modules(SMALL))
    assert set(adapter.head) == {key for key in sd if "lora" not in key}
    down, up = adapter.lora["single_transformer_blocks.2.proj_out"]
    assert down is sd["single_transformer_blocks.2.proj_out.lora_A.weight"] and up.shape == (64, 4)
    # no metadata: the head tells; a 'transformer.' prefix (diffusers pipelines) is accepted
    prefixed = parse_piflow_adapter(official_adapter(prefix="transformer."))
    assert prefixed.policy_type == GM_POLICY and set(prefixed.lora) == set(adapter.lora)
    lora, head = split_adapter_state_dict(official_adapter(prefix="transformer."))
    assert all("lora" in key and not key.startswith("transformer.") for key in lora) and "proj_out_means.weight" in head


def test_parse_dx_adapter():
    adapter = parse_piflow_adapter(official_adapter(kind=DX_POLICY, components=10), DX_METADATA)
    assert adapter.policy_type == DX_POLICY and adapter.num_components == 10
    assert adapter.policy_config == {"segment_size": pytest.approx(1 / 3.5), "shift": 3.2}


@pytest.mark.parametrize("state_dict, metadata, message", [
    ({}, None, "empty"),
    ({k: v for k, v in official_adapter().items() if "lora" in k}, None, "plain LoRA"),
    ({"diffusion_model.final_layer.linear.weight": torch.zeros(64, 64)}, None, "not a pi-Flow adapter"),
    ({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, None, "not a pi-Flow adapter"),
    ({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, None, "not a pi-Flow adapter"),
    ({k: v for k, v in official_adapter().items() if k != "transformer_blocks.0.ff.net.2.lora_B.weight"}, None,
     "incomplete.*lora_B"),
    ({**official_adapter(), "transformer_blocks.0.ff.net.2.lora_B.weight": torch.zeros(64, 5)}, None, "mismatched"),
    ({**official_adapter(), "transformer_blocks.0.ff.net.2.lora_down.weight": torch.zeros(4, 256)}, None, "peft layout"),
    ({**official_adapter(), "proj_out_logweights.weight": torch.zeros(30, 64)}, None, "proj_out_logweights"),
    ({**official_adapter(), "proj_out_means.weight": torch.zeros(8 * 60, 64)}, None, "proj_out_means"),
    ({k: v for k, v in official_adapter().items() if not k.startswith("proj_out_logstds")}, None, "log-std"),
    ({k: v for k, v in official_adapter().items() if k != "norm_out.linear.weight"}, None, "norm_out"),
    (official_adapter(kind=DX_POLICY), None, "segment_size"),
    (official_adapter(kind=DX_POLICY), {"policy_config": json.dumps({"type": "DX", "mode": "polynomial", "segment_size": 1})}, "polynomial"),
    (official_adapter(), DX_METADATA, "metadata says policy 'DX'"),
    (official_adapter(), {"policy_config": "{not json"}, "not valid JSON"),
])
def test_parse_rejects_with_readable_errors(state_dict, metadata, message):
    with pytest.raises(ValueError, match=message):
        parse_piflow_adapter(state_dict, metadata)


# -- ComfyUI Flux mapping ----------------------------------------------------------------------
def test_lora_targets_and_fit_checks():
    adapter = parse_piflow_adapter(official_adapter(), GM_METADATA)
    targets = flux_lora_targets(adapter, SMALL)
    assert set(targets) == set(adapter.lora)
    target, down, up = targets["single_transformer_blocks.1.proj_mlp"]
    assert target.key == "single_blocks.1.linear1.weight" and target.rows == (3 * 64, 256)
    assert targets["transformer_blocks.1.ff_context.net.2"][0].key == "double_blocks.1.txt_mlp.2.weight"
    assert targets["time_text_embed.timestep_embedder.linear_1"][0].key == "time_in.in_layer.weight"
    # the same adapter on a wider or shallower model is refused
    with pytest.raises(ValueError, match="does not fit"):
        flux_lora_targets(adapter, FluxShape(hidden_size=128, depth=2, depth_single_blocks=3))
    with pytest.raises(ValueError, match="not a Linear layer"):
        flux_lora_targets(adapter, FluxShape(hidden_size=64, depth=1, depth_single_blocks=3))
    with pytest.raises(ValueError, match="not a Linear layer"):
        flux_comfy_target("transformer_blocks.0.attn.norm_q", SMALL)


def test_head_in_comfy_names():
    sd = official_adapter()
    head = flux_head_state_dict(parse_piflow_adapter(sd), SMALL)
    modulation = sd["norm_out.linear.weight"]  # diffusers: scale | shift -> ComfyUI: shift | scale
    torch.testing.assert_close(head["final_layer.adaLN_modulation.1.weight"], torch.cat([modulation[64:], modulation[:64]]))
    torch.testing.assert_close(head["final_layer.adaLN_modulation.1.bias"][:64], sd["norm_out.linear.bias"][64:])
    assert head["proj_out_means.weight"] is sd["proj_out_means.weight"] and "proj_out_logstds.3.bias" in head
    dx = flux_head_state_dict(parse_piflow_adapter(official_adapter(kind=DX_POLICY, components=10), DX_METADATA), SMALL)
    assert dx["final_layer.linear.weight"].shape == (640, 64)
    with pytest.raises(ValueError, match="unexpected non-LoRA key 'x_embedder.weight'"):
        flux_head_state_dict(parse_piflow_adapter({**sd, "x_embedder.weight": torch.zeros(64, 64)}), SMALL)
    with pytest.raises(ValueError, match="another model"):
        flux_head_state_dict(parse_piflow_adapter(official_adapter()), FluxShape(hidden_size=128))


def _comfy():
    if not COMFYUI.is_dir():
        pytest.skip(f"ComfyUI checkout not found at {COMFYUI}")
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ldm.flux.model
    import comfy.ops
    import comfy.utils

    return comfy


FLUX1_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                 num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=True)


def test_layout_matches_comfyui_flux1_dev_on_meta():
    comfy = _comfy()
    model = comfy.ldm.flux.model.Flux(**FLUX1_DEV, device="meta", dtype=torch.bfloat16,
                                      operations=comfy.ops.disable_weight_init)
    weights = model.state_dict()
    shape = FluxShape.from_unet_config(FLUX1_DEV)
    assert shape == FluxShape()
    adapter = parse_piflow_adapter(official_adapter(FluxShape(), rank=256, device="meta"), GM_METADATA)
    assert len(adapter.lora) == 4 * 19 + 2 * 38 + 2
    for module, (target, down, up) in flux_lora_targets(adapter, shape).items():
        weight = weights[target.key]
        offset, size = target.rows or (0, weight.shape[0])
        assert down.shape[1] == weight.shape[1] and up.shape[0] == size <= weight.shape[0] - offset, module
    head = flux_head_state_dict(adapter, shape)
    assert head["final_layer.adaLN_modulation.1.weight"].shape == weights["final_layer.adaLN_modulation.1.weight"].shape
    assert head["proj_out_means.weight"].shape == (8 * model.out_channels, model.hidden_size)
    dx = parse_piflow_adapter(official_adapter(FluxShape(), kind=DX_POLICY, components=10, device="meta"), DX_METADATA)
    assert flux_head_state_dict(dx, shape)["final_layer.linear.weight"].shape[0] == 10 * weights["final_layer.linear.weight"].shape[0]

    # every Linear ComfyUI's own diffusers->Flux key map knows lands where it says
    reference = comfy.utils.flux_to_diffusers(FLUX1_DEV)
    checked = 0
    for diffusers_key, comfy_entry in reference.items():
        if not diffusers_key.endswith(".weight"):
            continue
        comfy_key, rows = (comfy_entry, None) if isinstance(comfy_entry, str) else comfy_entry[:2]
        if comfy_key not in weights or weights[comfy_key].ndim != 2:
            continue  # norms (not Linear) and ControlNet-only inputs
        target = flux_comfy_target(diffusers_key[: -len(".weight")], shape)
        weight = weights[comfy_key]
        assert target.key == comfy_key and target.in_features == weight.shape[1], diffusers_key
        if rows is None:
            assert target.rows is None and target.out_features == weight.shape[0], diffusers_key
        else:
            assert target.rows == tuple(rows[1:]) == (rows[1], target.out_features), diffusers_key
        assert target.swap_halves == (not isinstance(comfy_entry, str) and len(comfy_entry) == 3), diffusers_key
        checked += 1
    assert checked == 19 * 14 + 38 * 6 + 10  # double: q,k,v x2 + 8; single: q,k,v + 3; root 10


# -- head outputs -> policy tensors -------------------------------------------------------------
def pack_tokens(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, K, C, H, W) -> tokens (B, h*w, K*C*p*p), rows (K, C, p_y, p_x): the official GM head layout."""
    b, k, c, height, width = image.shape
    grid = image.reshape(b, k, c, height // patch, patch, width // patch, patch)
    return grid.permute(0, 3, 5, 1, 2, 4, 6).reshape(b, (height // patch) * (width // patch), k * c * patch * patch)


def test_unpack_gm_and_dx_tokens():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(2, 3, 16, 4, 6, generator=g)
    logits = torch.randn(2, 3, 1, 4, 6, generator=g)
    logstds = torch.randn(2, 1, generator=g)
    out_means, out_logweights, out_logstds = unpack_gm_tokens(pack_tokens(means, 2), pack_tokens(logits, 2), logstds, 4, 6)
    torch.testing.assert_close(out_means, means)
    torch.testing.assert_close(out_logweights, logits.log_softmax(1))
    assert out_logstds.shape == (2, 1, 1, 1, 1)
    grid = torch.randn(2, 10, 16, 4, 6, generator=g)
    torch.testing.assert_close(unpack_dx_tokens(pack_tokens(grid, 2), 10, 4, 6), grid)
    with pytest.raises(ValueError, match="tokens"):
        unpack_dx_tokens(pack_tokens(grid, 2), 10, 4, 8)


def test_token_order_is_comfyui_flux_patchify():
    """With one component the head layout is exactly how ComfyUI's Flux packs a latent into tokens."""
    comfy = _comfy()
    model = comfy.ldm.flux.model.Flux(**{**FLUX1_DEV, "depth": 0, "depth_single_blocks": 0}, device="meta",
                                      operations=comfy.ops.disable_weight_init)
    latent = torch.randn(1, 16, 4, 6)
    tokens, _ = model.process_img(latent)
    torch.testing.assert_close(unpack_dx_tokens(tokens, 1, 4, 6)[:, 0], latent)
