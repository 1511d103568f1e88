"""The released pi-Flow adapter layouts (pi-FLUX.1, pi-Qwen-Image, pi-FLUX.2): parsing, family
checks, the mapping onto ComfyUI's transformers (checked against diffusers' architectures and
official converters, full size on the meta device) and head unpacking."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import comfy_host as harness
from distill_core.piflow_adapter import (
    DX_POLICY,
    GM_POLICY,
    packing_factor,
    parse_piflow_adapter,
    split_adapter_state_dict,
    unpack_dx_tokens,
    unpack_gm_tokens,
)

ROOT = Path(__file__).resolve().parents[2]


def _load_families():
    """``nodes/piflow_families.py`` on its own (plain data, no ComfyUI), without importing the node package."""
    spec = importlib.util.spec_from_file_location("stride_piflow_families", ROOT / "nodes" / "piflow_families.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


families = _load_families()
FAMILIES, FLUX1, FLUX2, QWEN_IMAGE = families.FAMILIES, families.FLUX1, families.FLUX2, families.QWEN_IMAGE
check_head, families_of, lora_targets = families.check_head, families.families_of, families.lora_targets

COMFYUI = ROOT / ".cache" / "ComfyUI"


@dataclasses.dataclass(frozen=True)
class FluxShape:
    """Dimensions of a FLUX.1 transformer (defaults: FLUX.1-dev) and its Linear weight shapes in ComfyUI's
    Flux, written out so the mapping tests run without ComfyUI (checked against ComfyUI's full-size Flux
    in test_flux1_map_agrees_with_comfyui_key_map)."""

    hidden_size: int = 3072
    depth: int = 19
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0
    latent_channels: int = 16
    patch_size: int = 2
    context_in_dim: int = 4096
    vec_in_dim: int = 768

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def weight_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each Linear weight of ComfyUI's Flux with these dimensions."""
        h, mlp = self.hidden_size, self.mlp_hidden
        shapes = {"img_in.weight": (h, self.latent_channels * self.patch_size**2),
                  "txt_in.weight": (h, self.context_in_dim),
                  "time_in.in_layer.weight": (h, 256), "time_in.out_layer.weight": (h, h),
                  "guidance_in.in_layer.weight": (h, 256), "guidance_in.out_layer.weight": (h, h),
                  "vector_in.in_layer.weight": (h, self.vec_in_dim), "vector_in.out_layer.weight": (h, h)}
        for i in range(self.depth):
            for stream in ("img", "txt"):
                shapes.update({f"double_blocks.{i}.{stream}_attn.qkv.weight": (3 * h, h),
                               f"double_blocks.{i}.{stream}_attn.proj.weight": (h, h),
                               f"double_blocks.{i}.{stream}_mod.lin.weight": (6 * h, h),
                               f"double_blocks.{i}.{stream}_mlp.0.weight": (mlp, h),
                               f"double_blocks.{i}.{stream}_mlp.2.weight": (h, mlp)})
        for i in range(self.depth_single_blocks):
            shapes.update({f"single_blocks.{i}.linear1.weight": (3 * h + mlp, h),
                           f"single_blocks.{i}.linear2.weight": (h, h + mlp),
                           f"single_blocks.{i}.modulation.lin.weight": (3 * h, h)})
        return shapes


SMALL = FluxShape(hidden_size=64, depth=2, depth_single_blocks=3, mlp_ratio=4.0, context_in_dim=32, vec_in_dim=16)
GM_METADATA = {"policy_config": json.dumps({"type": "GMFlow"})}
DX_METADATA = {"policy_config": json.dumps({"segment_size": 1 / 3.5, "shift": 3.2, "type": "DX"})}

# The official configs' LoRA targets, peft suffix matches (configs/piflux/*_32gpus.py, configs/piqwen/*_32gpus.py).
FLUX1_TARGETS = ["proj_mlp", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                 "timestep_embedder.linear_1", "timestep_embedder.linear_2"]  # + each single block's proj_out


def flux1_targets(single_blocks: int) -> list[str]:
    return FLUX1_TARGETS + [f"single_transformer_blocks.{i}.proj_out" for i in range(single_blocks)]


def qwen_targets(blocks: int) -> list[str]:
    return (["img_mlp.net.0.proj", "img_mlp.net.2", "timestep_embedder.linear_1", "timestep_embedder.linear_2"]
            + [f"transformer_blocks.{i}.txt_mlp.net.{part}" for i in range(blocks - 1) for part in ("0.proj", "2")])


def flux2_targets(single_blocks: int) -> list[str]:
    """NOT from an official config (none is published): the FLUX.1 choice carried over to FLUX.2's names."""
    return (["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
             "timestep_embedder.linear_1", "timestep_embedder.linear_2"]
            + [f"single_transformer_blocks.{i}.attn.{name}" for i in range(single_blocks)
               for name in ("to_qkv_mlp_proj", "to_out")])


# -- builders of adapters in the official key layout ---------------------------------------------
def official_lora_modules(shape: FluxShape) -> dict[str, tuple[int, int]]:
    """pi-FLUX.1's LoRA targets (GM and DX alike) -> (in, out) features."""
    h, mlp = shape.hidden_size, shape.mlp_hidden
    modules = {"time_text_embed.timestep_embedder.linear_1": (256, h),
               "time_text_embed.timestep_embedder.linear_2": (h, h)}
    for i in range(shape.depth):
        for stream in ("ff", "ff_context"):
            modules[f"transformer_blocks.{i}.{stream}.net.0.proj"] = (h, mlp)
            modules[f"transformer_blocks.{i}.{stream}.net.2"] = (mlp, h)
    for i in range(shape.depth_single_blocks):
        modules[f"single_transformer_blocks.{i}.proj_mlp"] = (h, mlp)
        modules[f"single_transformer_blocks.{i}.proj_out"] = (h + mlp, h)
    return modules


def adapter_state(modules: dict[str, tuple[int, int]], hidden: int, token_channels: int, kind: str = GM_POLICY,
                  components: int = 8, rank: int = 4, norm_bias: bool = True, device: str = "cpu",
                  prefix: str = "") -> dict[str, torch.Tensor]:
    """A random adapter with the key layout of the official export (tools/export_piflow_to_diffusers.py):
    LoRA on ``modules`` (name -> (in, out)), head for ``hidden`` and ``token_channels`` = C p p."""
    g = torch.Generator().manual_seed(0)

    def tensor(*size):
        if device == "meta":
            return torch.empty(size, device="meta")
        return torch.randn(size, generator=g)

    sd = {}
    for module, (fan_in, fan_out) in modules.items():
        sd[f"{module}.lora_A.weight"] = tensor(rank, fan_in)
        sd[f"{module}.lora_B.weight"] = tensor(fan_out, rank)
    sd["norm_out.linear.weight"] = tensor(2 * hidden, hidden)
    if norm_bias:
        sd["norm_out.linear.bias"] = tensor(2 * hidden)
    if kind == GM_POLICY:
        sd["proj_out_means.weight"] = tensor(components * token_channels, hidden)
        sd["proj_out_means.bias"] = tensor(components * token_channels)
        sd["proj_out_logweights.weight"] = tensor(components * 4, hidden)
        sd["proj_out_logweights.bias"] = tensor(components * 4)
        sd["proj_out_logstds.1.weight"], sd["proj_out_logstds.1.bias"] = tensor(1024, hidden), tensor(1024)
        sd["proj_out_logstds.3.weight"], sd["proj_out_logstds.3.bias"] = tensor(1, 1024), tensor(1)
    else:
        sd["proj_out.weight"] = tensor(components * token_channels, hidden)
        sd["proj_out.bias"] = tensor(components * token_channels)
    return {prefix + key: value for key, value in sd.items()}


def official_adapter(shape: FluxShape = SMALL, kind: str = GM_POLICY, components: int = 8, rank: int = 4,
                     device: str = "cpu", prefix: str = "") -> dict[str, torch.Tensor]:
    """A random pi-FLUX.1 adapter for a FLUX.1 of these dimensions."""
    return adapter_state(official_lora_modules(shape), shape.hidden_size, shape.latent_channels * shape.patch_size**2,
                         kind, components, rank, device=device, prefix=prefix)


def peft_modules(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """The Linear layers peft's ``target_modules`` suffix rule picks in ``model`` -> (in, out)."""
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)}


def diffusers_adapter(model: torch.nn.Module, targets: list[str], latent_channels: int, kind: str = GM_POLICY,
                      components: int = 8, rank: int = 4, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A random adapter in the official layout for a diffusers transformer (the official classes' base):
    LoRA where the official target list points, the head sized like the model's own ``norm_out``."""
    norm = model.norm_out.linear
    return adapter_state(peft_modules(model, targets), norm.in_features, latent_channels * 4, kind, components, rank,
                         norm_bias=norm.bias is not None, device=device)


def diffusers_model(family, size: str = "full") -> torch.nn.Module:
    """diffusers' transformer of ``family`` (the official pi-Flow classes subclass these), on meta."""
    import diffusers

    tiny = size == "tiny"
    with torch.device("meta"):
        if family is FLUX1:
            return diffusers.FluxTransformer2DModel(guidance_embeds=True, **(TINY_DIFFUSERS[FLUX1] if tiny else {}))
        if family is FLUX2:
            return diffusers.Flux2Transformer2DModel(**(TINY_DIFFUSERS[FLUX2] if tiny else {}))
        return diffusers.QwenImageTransformer2DModel(**(TINY_DIFFUSERS[QWEN_IMAGE] if tiny else {"num_layers": 60}))


TINY_DIFFUSERS = {
    FLUX1: {"in_channels": 64, "num_layers": 2, "num_single_layers": 3, "attention_head_dim": 32,
            "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
            "axes_dims_rope": (8, 12, 12)},
    FLUX2: {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
            "joint_attention_dim": 32, "axes_dims_rope": (8, 8, 8, 8)},
    QWEN_IMAGE: {"in_channels": 64, "out_channels": 16, "num_layers": 2, "attention_head_dim": 32,
                 "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (8, 12, 12)},
}


def released_adapter(family, kind: str = GM_POLICY, components: int | None = None, size: str = "full",
                     rank: int = 4, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A random adapter laid out like the family's release (K = 8, N = 10) for its diffusers model."""
    model = diffusers_model(family, size)
    if family is QWEN_IMAGE:
        targets = qwen_targets(len(model.transformer_blocks))
    else:
        targets = (flux1_targets if family is FLUX1 else flux2_targets)(len(model.single_transformer_blocks))
    components = components or (8 if kind == GM_POLICY else 10)
    return diffusers_adapter(model, targets, family.latent_channels, kind, components, rank, device)


# -- parsing -----------------------------------------------------------------------------------
def test_parse_gm_adapter():
    sd = official_adapter()
    adapter = parse_piflow_adapter(sd, GM_METADATA)
    assert adapter.policy_type == GM_POLICY and adapter.num_components == 8 and adapter.policy_config == {}
    assert set(adapter.lora) == set(official_lora_modules(SMALL))
    assert set(adapter.head) == {key for key in sd if "lora" not in key}
    assert adapter.hidden_size == 64 and adapter.token_channels == 64
    down, up = adapter.lora["single_transformer_blocks.2.proj_out"]
    assert down is sd["single_transformer_blocks.2.proj_out.lora_A.weight"] and up.shape == (64, 4)
    # no metadata: the head tells; a 'transformer.' prefix (diffusers pipelines) is accepted
    prefixed = parse_piflow_adapter(official_adapter(prefix="transformer."))
    assert prefixed.policy_type == GM_POLICY and set(prefixed.lora) == set(adapter.lora)
    lora, head = split_adapter_state_dict(official_adapter(prefix="transformer."))
    assert all("lora" in key and not key.startswith("transformer.") for key in lora) and "proj_out_means.weight" in head


def test_parse_dx_adapters():
    adapter = parse_piflow_adapter(official_adapter(kind=DX_POLICY, components=10), DX_METADATA)
    assert adapter.policy_type == DX_POLICY and adapter.num_components == 10
    assert adapter.policy_config == {"segment_size": pytest.approx(1 / 3.5), "shift": 3.2}
    polynomial = {"policy_config": json.dumps({"mode": "polynomial", "shift": 3.2, "type": "DX"})}  # dxqwen_p10 config
    adapter = parse_piflow_adapter(official_adapter(kind=DX_POLICY, components=10), polynomial)
    assert adapter.policy_config == {"mode": "polynomial", "shift": 3.2} and adapter.num_components == 10


@pytest.mark.parametrize("family, kind, lora_count", [
    (QWEN_IMAGE, GM_POLICY, 60 * 2 + 59 * 2 + 2), (QWEN_IMAGE, DX_POLICY, 240), (FLUX2, GM_POLICY, 8 * 4 + 48 * 2 + 2),
], ids=["Qwen-Image GM", "Qwen-Image DX", "FLUX.2 GM"])
def test_parse_qwen_and_flux2_layouts(family, kind, lora_count):
    sd = released_adapter(family, kind, device="meta")
    metadata = GM_METADATA if kind == GM_POLICY else DX_METADATA
    adapter = parse_piflow_adapter(sd, metadata, family.latent_channels)
    hidden = 6144 if family is FLUX2 else 3072
    assert (adapter.policy_type, adapter.hidden_size, len(adapter.lora)) == (kind, hidden, lora_count)
    assert adapter.num_components == (8 if kind == GM_POLICY else 10)
    assert adapter.token_channels == (128 if family is FLUX2 else 64)
    assert ("norm_out.linear.bias" in adapter.head) == (family is not FLUX2)  # FLUX.2's norm_out has no bias
    assert families_of(adapter.lora) == [family]


@pytest.mark.parametrize("state_dict, metadata, message", [
    ({}, None, "empty"),
    ({k: v for k, v in official_adapter().items() if "lora" in k}, None, "plain LoRA"),
    ({"diffusion_model.final_layer.linear.weight": torch.zeros(64, 64)}, None, "not a pi-Flow adapter"),
    ({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, None, "not a pi-Flow adapter"),
    ({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, None, "not a pi-Flow adapter"),
    ({k: v for k, v in official_adapter().items() if k != "transformer_blocks.0.ff.net.2.lora_B.weight"}, None,
     "incomplete.*lora_B"),
    ({**official_adapter(), "transformer_blocks.0.ff.net.2.lora_B.weight": torch.zeros(64, 5)}, None, "mismatched"),
    ({**official_adapter(), "transformer_blocks.0.ff.net.2.lora_down.weight": torch.zeros(4, 256)}, None,
     "peft layout"),
    ({**official_adapter(), "proj_out_logweights.weight": torch.zeros(30, 64)}, None, "proj_out_logweights"),
    ({**official_adapter(), "proj_out_means.weight": torch.zeros(8 * 60, 64)}, None, "proj_out_means"),
    ({k: v for k, v in official_adapter().items() if not k.startswith("proj_out_logstds")}, None, "log-std"),
    ({k: v for k, v in official_adapter().items() if k != "norm_out.linear.weight"}, None, "norm_out"),
    ({**official_adapter(), "x_embedder.weight": torch.zeros(64, 64)}, None, "unexpected non-LoRA key 'x_embedder"),
    ({**official_adapter(), "proj_out.weight": torch.zeros(64, 64)}, None, "unexpected non-LoRA key 'proj_out.weight'"),
    (official_adapter(kind=DX_POLICY), None, "segment_size"),
    (official_adapter(kind=DX_POLICY), {"policy_config": json.dumps({"type": "DX", "mode": "spline"})}, "spline"),
    (official_adapter(), DX_METADATA, "metadata says policy 'DX'"),
    (official_adapter(), {"policy_config": "{not json"}, "not valid JSON"),
])
def test_parse_rejects_with_readable_errors(state_dict, metadata, message):
    with pytest.raises(ValueError, match=message):
        parse_piflow_adapter(state_dict, metadata)


def test_wrong_family_is_recognised():
    flux1, qwen = parse_piflow_adapter(official_adapter()), released_adapter(QWEN_IMAGE, device="meta")
    assert families_of(flux1.lora) == [FLUX1]
    assert families_of({key.rsplit(".lora_", 1)[0] for key in qwen if "lora" in key}) == [QWEN_IMAGE]
    assert families_of(["transformer_blocks.0.attn.to_q"]) == list(FAMILIES)  # attention exists in all three
    assert families_of(["transformer_blocks.0.ff.linear_in", "x_embedder"]) == [FLUX2]
    assert families_of([]) == list(FAMILIES)
    # a pi-Qwen-Image adapter parsed as FLUX.2 (32 channels) does not fit its head
    with pytest.raises(ValueError, match="proj_out_means"):
        parse_piflow_adapter(qwen, GM_METADATA, FLUX2.latent_channels)
    with pytest.raises(ValueError, match=r"not a Linear layer of a FLUX\.2"):
        lora_targets(flux1, FLUX2, FluxShape().weight_shapes())


# -- ComfyUI mapping ---------------------------------------------------------------------------
def test_lora_targets_and_fit_checks():
    adapter = parse_piflow_adapter(official_adapter(), GM_METADATA)
    targets = lora_targets(adapter, FLUX1, SMALL.weight_shapes())
    assert set(targets) == set(adapter.lora)
    target, _, _ = targets["single_transformer_blocks.1.proj_mlp"]
    assert target.key == "single_blocks.1.linear1.weight" and target.rows == (3 * 64, 256)
    assert targets["transformer_blocks.1.ff_context.net.2"][0].key == "double_blocks.1.txt_mlp.2.weight"
    assert targets["time_text_embed.timestep_embedder.linear_1"][0].key == "time_in.in_layer.weight"
    # the same adapter on a wider or shallower model is refused
    with pytest.raises(ValueError, match=r"do not fit.*another model"):
        lora_targets(adapter, FLUX1, FluxShape(hidden_size=128, depth=2, depth_single_blocks=3).weight_shapes())
    with pytest.raises(ValueError, match=r"no counterpart in this FLUX\.1 model"):
        lora_targets(adapter, FLUX1, FluxShape(hidden_size=64, depth=1, depth_single_blocks=3).weight_shapes())
    with pytest.raises(ValueError, match="not a Linear layer"):
        FLUX1.comfy_target("transformer_blocks.0.attn.norm_q", SMALL.weight_shapes())
    with pytest.raises(ValueError, match="not a Linear layer"):  # the head replaces these layers: no LoRA there
        FLUX1.comfy_target("norm_out.linear", SMALL.weight_shapes())


def test_head_checks():
    adapter = parse_piflow_adapter(official_adapter())
    check_head(adapter, FLUX1, 64, 64)
    with pytest.raises(ValueError, match="another model"):
        check_head(adapter, FLUX1, 128, 64)
    with pytest.raises(ValueError, match=r"values per token.*another model"):
        check_head(adapter, FLUX1, 64, 128)


def _comfy():
    if not COMFYUI.is_dir():
        pytest.skip(f"ComfyUI checkout not found at {COMFYUI}")
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ldm.flux.model
    import comfy.ldm.qwen_image.model
    import comfy.ops
    import comfy.utils

    return comfy


FLUX1_DEV = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072,
             "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
             "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
# ComfyUI's model detection for flux2-dev (comfy/model_detection.py)
FLUX2_DEV = {"in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 15360, "hidden_size": 6144,
             "mlp_ratio": 3.0, "num_heads": 48, "depth": 8, "depth_single_blocks": 48, "axes_dim": [32, 32, 32, 32],
             "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True, "global_modulation": True,
             "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0}
# tiny sizes with the real latents (FLUX.1 and Qwen-Image 16 channels, FLUX.2 128 at patch 1), as in TINY_DIFFUSERS
TINY_COMFY = {
    FLUX1: dict(FLUX1_DEV, vec_in_dim=16, context_in_dim=32, hidden_size=64, num_heads=2, depth=2,
                depth_single_blocks=3, axes_dim=[8, 12, 12]),
    FLUX2: dict(FLUX2_DEV, context_in_dim=32, hidden_size=64, num_heads=2, depth=1, depth_single_blocks=2,
                axes_dim=[8, 8, 8, 8]),
    QWEN_IMAGE: {"num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
                 "axes_dims_rope": (8, 12, 12)},
}


def comfy_model(comfy, family, config: dict | None = None, device: str | None = "meta"):
    """ComfyUI's own diffusion model of ``family`` (full size by default)."""
    ops = comfy.ops.disable_weight_init
    if family is QWEN_IMAGE:
        return comfy.ldm.qwen_image.model.QwenImageTransformer2DModel(**(config or {}), device=device, operations=ops)
    config = harness.flux_unet_config(dict(config or (FLUX1_DEV if family is FLUX1 else FLUX2_DEV)),
                                         (3,) if family is FLUX2 else ())
    return comfy.ldm.flux.model.Flux(**config, device=device, operations=ops)


def weight_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_full_size_layout_on_meta(family):
    """Every key of a full-size adapter in the released layout maps onto ComfyUI's full-size model, and so
    does every Linear of diffusers' architecture (the official classes' base) but the replaced head."""
    comfy = _comfy()
    model = comfy_model(comfy, family)
    shapes = weight_shapes(model)
    adapter = parse_piflow_adapter(released_adapter(family, rank=256, device="meta"), GM_METADATA,
                                   family.latent_channels)
    assert len(adapter.lora) == {FLUX1: 4 * 19 + 2 * 38 + 2, FLUX2: 4 * 8 + 2 * 48 + 2, QWEN_IMAGE: 240}[family]
    targets = lora_targets(adapter, family, shapes)
    assert set(targets) == set(adapter.lora)
    final = shapes["final_layer.linear.weight" if family is not QWEN_IMAGE else "proj_out.weight"]
    check_head(adapter, family, shapes["img_in.weight"][0], final[0])

    reference = diffusers_model(family)
    checked = 0
    for name, module in reference.named_modules():
        if not isinstance(module, torch.nn.Linear) or name in ("norm_out.linear", "proj_out"):
            continue
        target = family.comfy_target(name, shapes)
        out_features, in_features = shapes[target.key]
        assert module.in_features == in_features, name
        assert module.out_features == (target.rows[1] if target.rows else out_features), name
        checked += 1
    assert checked == {FLUX1: 19 * 14 + 38 * 6 + 8, FLUX2: 8 * 12 + 48 * 2 + 9, QWEN_IMAGE: 60 * 14 + 4}[family]
    assert all(p.device == torch.device("meta") for p in model.parameters())


def test_flux1_map_agrees_with_comfyui_key_map():
    """FLUX.1: every Linear ComfyUI's own diffusers->Flux key map knows lands where it says."""
    comfy = _comfy()
    shapes = weight_shapes(comfy_model(comfy, FLUX1))
    assert all(shapes[key] == shape for key, shape in FluxShape().weight_shapes().items())
    checked = 0
    for diffusers_key, comfy_entry in comfy.utils.flux_to_diffusers(FLUX1_DEV).items():
        comfy_key, rows = (comfy_entry, None) if isinstance(comfy_entry, str) else comfy_entry[:2]
        module = diffusers_key[: -len(".weight")]
        head = module in ("norm_out.linear", "proj_out")
        if not diffusers_key.endswith(".weight") or len(shapes.get(comfy_key, ())) != 2 or head:
            continue  # norms, ControlNet inputs, the head
        target = FLUX1.comfy_target(module, shapes)
        assert target.key == comfy_key and target.rows == (tuple(rows[1:]) if rows else None), diffusers_key
        checked += 1
    assert checked == 19 * 14 + 38 * 6 + 8


@pytest.mark.parametrize("family", [FLUX2, QWEN_IMAGE], ids=lambda family: family.name)
def test_map_agrees_with_official_conversion(family):
    """A tiny ComfyUI model's weights, converted to diffusers names the official way (FLUX.2: diffusers'
    single-file converter; Qwen-Image: the same names), load strictly into diffusers' model, and each
    diffusers Linear equals the rows of the ComfyUI weight the map names."""
    comfy = _comfy()
    from diffusers.loaders import single_file_utils

    model = comfy_model(comfy, family, TINY_COMFY[family], device=None)
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(value.shape, generator=generator) for key, value in model.state_dict().items()}
    converted = (single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers(dict(state))
                 if family is FLUX2 else dict(state))
    reference = diffusers_model(family, "tiny").to_empty(device="cpu")
    reference.load_state_dict(converted, strict=True)
    shapes = weight_shapes(model)
    checked = 0
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in ("norm_out.linear", "proj_out"):
            target = family.comfy_target(name, shapes)
            weight = state[target.key]
            if target.rows:
                weight = weight[target.rows[0]: target.rows[0] + target.rows[1]]
            assert torch.equal(weight, module.weight), name
            checked += 1
    assert checked == {FLUX2: 12 + 2 * 2 + 9, QWEN_IMAGE: 2 * 14 + 4}[family]


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
    out_means, out_logweights, out_logstds = unpack_gm_tokens(pack_tokens(means, 2), pack_tokens(logits, 2), logstds,
                                                              4, 6)
    torch.testing.assert_close(out_means, means)
    torch.testing.assert_close(out_logweights, logits.log_softmax(1))
    assert out_logstds.shape == (2, 1, 1, 1, 1)
    grid = torch.randn(2, 10, 16, 4, 6, generator=g)
    torch.testing.assert_close(unpack_dx_tokens(pack_tokens(grid, 2), 10, 4, 6), grid)
    with pytest.raises(ValueError, match="tokens"):
        unpack_dx_tokens(pack_tokens(grid, 2), 10, 4, 8)


def test_token_order_is_comfyui_patchify():
    """With one component the head layout is how ComfyUI's FLUX.1 and Qwen-Image pack a latent into tokens,
    and how ComfyUI's FLUX.2 latent (patch 1) holds the 32-channel latent."""
    comfy = _comfy()
    latent = torch.randn(1, 16, 4, 6)
    flux = comfy_model(comfy, FLUX1, {**FLUX1_DEV, "depth": 0, "depth_single_blocks": 0})
    torch.testing.assert_close(unpack_dx_tokens(flux.process_img(latent)[0], 1, 4, 6)[:, 0], latent)
    qwen = comfy_model(comfy, QWEN_IMAGE, {"num_layers": 0})
    torch.testing.assert_close(unpack_dx_tokens(qwen.process_img(latent[:, :, None])[0], 1, 4, 6)[:, 0], latent)
    # ComfyUI's FLUX.2 VAE folds each 2x2 patch into channels as "(c pi pj)" (comfy/ldm/models/autoencoder.py)
    import einops

    unfolded = torch.randn(1, 32, 4, 6)
    folded = einops.rearrange(unfolded, "b c (i pi) (j pj) -> b (c pi pj) i j", pi=2, pj=2)
    torch.testing.assert_close(F.pixel_unshuffle(unfolded, 2), folded)
    tokens = folded.flatten(2).transpose(1, 2)  # FLUX.2 at patch 1: one token per folded location
    torch.testing.assert_close(unpack_dx_tokens(tokens, 1, 4, 6)[:, 0], unfolded)


def test_packing_factor():
    assert packing_factor((32, 8, 12), (128, 4, 6)) == 2
    assert packing_factor((16, 1, 8, 8), (16, 1, 8, 8)) == 1
    assert packing_factor((32, 8, 12), (64, 4, 6)) == 0
    assert packing_factor((16, 8, 8), (16, 4, 4)) == 0
    assert packing_factor((32, 7, 12), (128, 4, 6)) == 0
    assert packing_factor((32, 1, 8, 12), (128, 1, 4, 6)) == 0  # only image latents are folded
